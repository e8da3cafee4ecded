"""Command lines without their credentials: `curl -H "Authorization: Bearer ..."`,
`--password x`, `https://user:pass@host/`, `API_TOKEN=...` are redacted by default."""

from __future__ import annotations

import functools
import re

REDACTED = "[REDACTED]"

# Query parameters whose values are credentials (names compared lower-cased).
_SECRET_PARAMS = frozenset(
    {"key", "sig", "code", "auth", "apikey", "x-amz-credential", "x-amz-security-token"}
)
_SECRET_PARAM_PATTERN = re.compile(
    r"(api[-_]?key|access[-_]?key|token|secret|password|passwd|signature|credential|session)"
)
_QUERY_PAIR = re.compile(r"([^&=;#]+)=([^&;#]*)")

# Flags whose value is a secret, as `--flag value` or `--flag=value`.
_SECRET_FLAG = re.compile(
    r"^--?[\w-]*(pass(word|wd|phrase)?|token|secret|api[-_]?key|access[-_]?key|"
    r"credentials?|auth|private[-_]?key|client[-_]?secret|bearer)$",
    re.I,
)
# curl's -u/--user user:password (also --proxy-user, -U).
_USER_FLAGS = frozenset({"-u", "--user", "-U", "--proxy-user"})
_HEADER_FLAGS = frozenset({"-H", "--header", "--proxy-header"})
_SECRET_HEADER = re.compile(
    r"^\s*(authorization|proxy-authorization|cookie|set-cookie|x-[\w-]*(token|key|secret|"
    r"auth)[\w-]*|[\w-]*(api[-_]?key|token|secret|password|session|signature|csrf|auth[-_]?key|access[-_]?key|credential)[\w-]*)\s*:",
    re.I,
)
_SECRET_NAME = re.compile(
    r"(pass(word|wd)?|token|secret|api[-_]?key|access[-_]?key|credential|auth)", re.I
)
# Authorization schemes worth keeping (an unknown first word may be the secret itself),
# on command lines and in HTTP records (records/http.py).
AUTH_SCHEMES = frozenset(
    {
        "basic",
        "bearer",
        "digest",
        "negotiate",
        "ntlm",
        "kerberos",
        "hoba",
        "mutual",
        "token",
        "aws4-hmac-sha256",
        "gssapi",
        "scram-sha-1",
        "scram-sha-256",
        "vapid",
        "dpop",
        "privatetoken",
    }
)
_URL_USERINFO = re.compile(r"(\w[\w+.-]*://)([^/@\s:]+):([^/@\s]*)@")
_KEY_VALUE = re.compile(r"^([A-Za-z_][\w.-]*)=(.+)$", re.S)


__all__ = ["AUTH_SCHEMES", "REDACTED", "redact_cmdline", "redact_query"]


def redact_query(target: str) -> str:
    """A path or URL with the values of credential-looking query parameters replaced
    (and a password in user:password@)."""
    if "@" in target and "://" in target:
        target = re.sub(r"(://[^/@:]*):[^/@]*@", rf"\1:{REDACTED}@", target, count=1)
    base, question, query = target.partition("?")
    if not question:
        return target
    query, hash_, fragment = query.partition("#")

    def value(match: re.Match[str]) -> str:
        name = match.group(1).lower()
        if name in _SECRET_PARAMS or _SECRET_PARAM_PATTERN.search(name):
            return f"{match.group(1)}={REDACTED}"
        return match.group(0)

    return f"{base}?{_QUERY_PAIR.sub(value, query)}{hash_}{fragment}"


def _header(value: str) -> str:
    if not _SECRET_HEADER.match(value):
        return value
    name, _, rest = value.partition(":")
    scheme = rest.strip().split(" ", 1)
    if (
        name.strip().lower() in ("authorization", "proxy-authorization")
        and len(scheme) == 2
        and scheme[0].lower() in AUTH_SCHEMES
    ):
        return f"{name}: {scheme[0]} {REDACTED}"
    return f"{name}: {REDACTED}"


def _argument(arg: str) -> str:
    arg = _URL_USERINFO.sub(lambda m: f"{m.group(1)}{m.group(2)}:{REDACTED}@", arg)
    if "://" in arg or arg.startswith("/"):
        arg = redact_query(arg)
    flag, eq, value = arg.partition("=")
    if eq and flag.startswith("-"):
        if _SECRET_FLAG.match(flag) or (flag in _USER_FLAGS and ":" in value):
            return (
                f"{flag}={REDACTED}"
                if _SECRET_FLAG.match(flag)
                else f"{flag}={value.split(':')[0]}:{REDACTED}"
            )
        if flag in _HEADER_FLAGS:
            return f"{flag}={_header(value)}"
        return arg
    match = _KEY_VALUE.match(arg)
    if match and not arg.startswith("-") and _SECRET_NAME.search(match.group(1)):
        return f"{match.group(1)}={REDACTED}"
    return arg


@functools.lru_cache(maxsize=4096)
def redact_cmdline(argv: tuple[str, ...]) -> tuple[str, ...]:
    """argv with credential-looking values replaced by [REDACTED]; the rest kept."""
    out: list[str] = []
    pending: str | None = None  # the flag whose value comes next
    for arg in argv:
        if pending is not None:
            if pending in _HEADER_FLAGS:
                out.append(_header(arg))
            elif pending in _USER_FLAGS:
                user, colon, _ = arg.partition(":")
                out.append(f"{user}:{REDACTED}" if colon else arg)
            else:
                out.append(REDACTED)
            pending = None
            continue
        if (
            arg in _HEADER_FLAGS
            or arg in _USER_FLAGS
            or (arg.startswith("-") and "=" not in arg and _SECRET_FLAG.match(arg))
        ):
            pending = arg
            out.append(arg)
            continue
        out.append(_argument(arg))
    return tuple(out)
