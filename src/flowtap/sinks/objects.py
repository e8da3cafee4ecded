"""Qtap's `services.object_stores`: bodies and headers as content-addressed S3 objects.

The key is the sha256 of the bytes, so the object's URL is known before it is uploaded: the
HTTP record is emitted at once with the URL, and the upload follows on this store's own
thread behind a bounded queue (the consumer never waits for S3). The same bytes are
uploaded once per run. What cannot be queued (the queue is full) stays inline in the record
and is counted `object_upload_dropped`; an upload that fails is counted
`object_upload_errors` and logged (rate-limited): that record's URL then names an object
that is not in the bucket. Credentials are read when the store opens and never logged.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("flowtap")

DEFAULT_ACCESS_URL = "{endpoint}/{bucket}/{digest}"
_QUEUE = 1000  # objects waiting for upload at most
_KNOWN = 100_000  # digests remembered as uploaded (or on their way), oldest forgotten
_WARN_S = 10.0
_STOP = object()


@dataclass(frozen=True)
class Secret:
    """A credential from an environment variable (read when the store opens) or text.
    Its repr never shows the text: a configuration dump must not leak it."""

    env: str | None = None
    text: str | None = field(default=None, repr=False)

    def value(self, environ: Mapping[str, str]) -> str | None:
        return environ.get(self.env) if self.env else self.text


@dataclass(frozen=True)
class S3Settings:
    endpoint: str  # host:port, or a URL (its scheme wins over insecure)
    bucket: str
    region: str = "us-east-1"
    insecure: bool = False  # http:// instead of https://
    access_url: str = DEFAULT_ACCESS_URL
    access_key: Secret | None = None
    secret_key: Secret | None = None

    @property
    def endpoint_url(self) -> str:
        if "://" in self.endpoint:
            return self.endpoint.rstrip("/")
        return f"{'http' if self.insecure else 'https'}://{self.endpoint.rstrip('/')}"

    def url(self, digest: str) -> str:
        """The access_url template: {endpoint} {bucket} {digest}, or Qtap's {{ENDPOINT}}
        {{BUCKET}} {{DIGEST}}."""
        url = self.access_url
        for name, value in (
            ("endpoint", self.endpoint_url),
            ("bucket", self.bucket),
            ("digest", digest),
        ):
            url = url.replace("{{" + name.upper() + "}}", value).replace("{" + name + "}", value)
        return url


@dataclass(slots=True)
class ObjectStats:
    uploaded: int = 0
    deduplicated: int = 0  # references to bytes already uploaded or queued
    errors: int = 0  # uploads S3 refused or that failed: the object is missing
    dropped: int = 0  # the queue was full (the bytes stayed inline) or the exit's wait ran out


def _credentials(settings: S3Settings, environ: Mapping[str, str]) -> dict[str, str]:
    """boto3's keyword arguments: the configured keys, else FLOWTAP_S3_*, else boto3's own
    chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws)."""
    access = settings.access_key.value(environ) if settings.access_key else None
    secret = settings.secret_key.value(environ) if settings.secret_key else None
    access = access or environ.get("FLOWTAP_S3_ACCESS_KEY")
    secret = secret or environ.get("FLOWTAP_S3_SECRET_KEY")
    if access and secret:
        return {"aws_access_key_id": access, "aws_secret_access_key": secret}
    return {}


class ObjectStore:
    """put() on the consumer's thread (hash, queue); uploads on this store's thread."""

    def __init__(
        self,
        settings: S3Settings,
        *,
        capacity: int = _QUEUE,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        import boto3  # noqa: PLC0415 - only runs that configure S3 pay for importing it
        from botocore.config import Config  # noqa: PLC0415

        # botocore's debug log prints each request's Authorization header (the access key
        # id) under -v: the libraries' own messages stay at warnings.
        for name in ("boto3", "botocore", "s3transfer", "urllib3"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self.settings = settings
        self.stats = ObjectStats()
        self._client: Any = boto3.client(
            "s3",
            endpoint_url=settings.endpoint_url,
            region_name=settings.region,
            config=Config(retries={"max_attempts": 2}, connect_timeout=5, read_timeout=30),
            **_credentials(settings, os.environ if environ is None else environ),
        )
        self._queue: queue.Queue[object] = queue.Queue(capacity)
        self._known: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()  # _known and stats: both threads
        self._in_flight = False  # an upload is under way (counted lost if abandoned)
        self._abandoned = False  # the exit's wait ran out: nothing more is counted
        self._failing = False
        self._failed_since_warning = 0
        self._next_warning = 0.0
        self._thread = threading.Thread(target=self._run, name="flowtap-objects", daemon=True)
        self._thread.start()

    def put(self, data: bytes) -> str | None:
        """The URL the bytes will have; None if they cannot be queued (keep them inline)."""
        digest = hashlib.sha256(data).hexdigest()
        with self._lock:
            if digest in self._known:
                self._known.move_to_end(digest)
                self.stats.deduplicated += 1
                return self.settings.url(digest)
            try:
                self._queue.put_nowait((digest, data))
            except queue.Full:
                self.stats.dropped += 1
                return None
            self._known[digest] = None
            if len(self._known) > _KNOWN:
                self._known.popitem(last=False)
        return self.settings.url(digest)

    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            assert isinstance(item, tuple)
            digest: str = item[0]
            data: bytes = item[1]
            with self._lock:
                if self._abandoned:  # taken after close() gave up: lost, counted here
                    self.stats.dropped += 1
                    continue
                self._in_flight = True
            try:
                self._client.put_object(Bucket=self.settings.bucket, Key=digest, Body=data)
            except Exception as exc:  # any failure is counted, never fatal
                with self._lock:
                    self._in_flight = False
                    if self._abandoned:
                        continue  # already counted dropped by close()
                    self.stats.errors += 1
                    self._known.pop(digest, None)  # the next reference tries again
                self._failed(exc)
                continue
            with self._lock:
                self._in_flight = False
                if self._abandoned:
                    continue
                self.stats.uploaded += 1
            if self._failing:
                self._failing = False
                log.warning("object store: uploads succeed again (%d failed)", self.stats.errors)

    def _failed(self, exc: Exception) -> None:
        """One warning when uploads start failing, then one per _WARN_S with a count. The
        message is the exception's: botocore's never carry the keys."""
        self._failed_since_warning += 1
        now = time.monotonic()
        if self._failing and now < self._next_warning:
            return
        log.warning(
            "could not upload an object to s3 bucket %s at %s: %s: %s; %d failed so far "
            "(object_upload_errors: those records' URLs name missing objects; check the "
            "bucket exists, the keys may write to it and the endpoint is reachable)",
            self.settings.bucket,
            self.settings.endpoint_url,
            type(exc).__name__,
            exc,
            self.stats.errors,
        )
        self._failing = True
        self._failed_since_warning = 0
        self._next_warning = now + _WARN_S

    def close(self, timeout_s: float = 5.0) -> None:
        """Uploads what is queued, for timeout_s at most; the rest is counted dropped."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                self._queue.put(_STOP, timeout=0.05)
                break
            except queue.Full:
                continue
        self._thread.join(max(deadline - time.monotonic(), 0.0))
        if not self._thread.is_alive():
            return
        with self._lock:
            self._abandoned = True
            lost = int(self._in_flight)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                lost += 1
        with self._lock:
            self.stats.dropped += lost
        log.warning(
            "object store: %d uploads not done within %.0f s at exit (object_upload_dropped)",
            lost,
            timeout_s,
        )
        self._queue.put_nowait(_STOP)
