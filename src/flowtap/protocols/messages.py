"""HTTP messages as the passive parsers produce them (HTTP/1.x and HTTP/2 alike)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Side = Literal["client", "server"]


@dataclass(slots=True)
class Body:
    data: bytearray = field(default_factory=bytearray)  # kept up to the cap
    size: int = 0  # bytes seen in total (may exceed len(data))
    truncated: bool = False  # data holds fewer bytes than size


@dataclass(slots=True)
class Request:
    method: str
    target: str  # path (+query) as sent; for h2 the :path
    version: str  # "1.0", "1.1", "2"
    headers: list[tuple[str, str]]  # in order, as sent (names lower-cased for h2)
    authority: str | None = None  # Host header or :authority
    scheme: str | None = None  # h2 :scheme, else None
    body: Body = field(default_factory=Body)
    start_ns: int = 0  # timestamp of the first byte
    end_ns: int = 0  # timestamp of the last byte


@dataclass(slots=True)
class Response:
    status: int
    reason: str
    version: str
    headers: list[tuple[str, str]]
    body: Body = field(default_factory=Body)
    start_ns: int = 0
    end_ns: int = 0
    informational: list[int] = field(default_factory=list)  # 1xx seen before it


@dataclass(slots=True)
class Transaction:
    request: Request | None  # None: a response without a request we saw (capture began mid-stream)
    response: Response | None  # None: no response (connection closed, or still waiting at close)
    stream_id: int | None = None  # h2 stream
    error: str | None = None  # why it is incomplete, if it is
    count: int = 1  # h2 streams it stands for: more on a summary of streams reset unanswered


class ParseError(ValueError):
    """Input that is not the protocol; the connection's parser gives up and counts it."""
