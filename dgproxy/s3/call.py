"""One S3 call as the operation handlers see it, and what they return."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional
from urllib.parse import unquote

from dgproxy.s3.names import Target


@dataclass
class Response:
    """What an operation answers; the front writes it out."""

    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: Any = None  # bytes, an IByteSource, or None
    length: Optional[int] = None


def parse_query(raw: bytes) -> dict[str, str]:
    """Query parameters, percent-decoded; '+' stays '+' (S3 clients send %20)."""
    out: dict[str, str] = {}
    if not raw:
        return out
    for part in raw.split(b"&"):
        if not part:
            continue
        name, _, value = part.partition(b"=")
        try:
            k = unquote(name.decode("utf-8"), errors="strict")
            v = unquote(value.decode("utf-8"), errors="strict")
        except UnicodeDecodeError:
            continue
        out.setdefault(k, v)
    return out


@dataclass
class S3Call:
    """The parsed request plus what authentication learned about it."""

    request: Any  # StreamingRequest
    target: Target
    query: dict[str, str]
    auth: Any = None  # AuthResult or None (open access / anonymous)

    @property
    def bucket(self) -> str:
        assert self.target.bucket is not None
        return self.target.bucket

    @property
    def key(self) -> str:
        assert self.target.key is not None
        return self.target.key

    @property
    def method(self) -> str:
        return self.request.method.decode("latin-1").upper()

    def header(self, name: str) -> Optional[str]:
        return self.request.header(name)
