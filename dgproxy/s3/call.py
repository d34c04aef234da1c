"""One S3 call as the operation handlers see it, and what they return."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from dgproxy.auth import sigv4
from dgproxy.s3.names import Target


@dataclass
class Response:
    """What an operation answers; the front writes it out."""

    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: Any = None  # bytes, an IByteSource, or None
    length: Optional[int] = None


def parse_query(raw: bytes) -> dict[str, str]:
    """Query parameters decoded exactly as the signature check decoded them
    (so '+' is a space); the first of repeated names wins; names or values
    that are not UTF-8 are dropped."""
    out: dict[str, str] = {}
    for name, value in sigv4.parse_query(raw):
        try:
            out.setdefault(name.decode("utf-8"), value.decode("utf-8"))
        except UnicodeDecodeError:
            continue
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
