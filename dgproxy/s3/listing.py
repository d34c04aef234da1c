"""ListObjects pagination: merge keys and common prefixes, then page them.

Pure functions over already-listed keys, so the rules (delimiter
collapsing, markers, max-keys counting both kinds) are tested on their own.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Generic, Optional, Sequence, TypeVar

from dgproxy.engine.keys import common_prefix_of
from dgproxy.s3 import errors

T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    objects: list[tuple[str, T]]
    prefixes: list[str]
    truncated: bool
    last: Optional[str]  # last key or prefix emitted, the next marker


def encode_token(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode("utf-8")).decode("ascii")


def decode_token(token: str) -> str:
    try:
        return base64.urlsafe_b64decode(token.encode("ascii")).decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        raise errors.InvalidArgument("The continuation token provided is incorrect.") from None


def parse_max_keys(value: Optional[str]) -> int:
    if value is None or value == "":
        return 1000
    try:
        n = int(value)
    except ValueError:
        raise errors.InvalidArgument("Provided max-keys not an integer or within integer range") from None
    if n < 0:
        raise errors.InvalidArgument("Argument maxKeys must be an integer between 0 and 2147483647")
    return min(n, 1000)


def paginate(objects: Sequence[tuple[str, T]], prefixes: Sequence[str], prefix: str,
             delimiter: Optional[str], marker: Optional[str], max_keys: int) -> Page[T]:
    """One page of keys strictly after C{marker}; objects and prefixes both count."""
    collapsed: set[str] = set(p for p in prefixes if p.startswith(prefix))
    kept: list[tuple[str, T]] = []
    for key, value in objects:
        if not key.startswith(prefix):
            continue
        common = common_prefix_of(key, prefix, delimiter)
        if common is not None:
            collapsed.add(common)
            continue
        kept.append((key, value))
    entries: list[tuple[bytes, str, Optional[T], bool]] = (
        [(k.encode("utf-8"), k, v, False) for k, v in kept] +
        [(p.encode("utf-8"), p, None, True) for p in collapsed])
    entries.sort(key=lambda e: e[0])
    if marker:
        m = marker.encode("utf-8")
        entries = [e for e in entries if e[0] > m]
    page = entries[:max_keys]
    truncated = len(entries) > max_keys
    return Page(
        objects=[(k, v) for _, k, v, is_prefix in page if not is_prefix],
        prefixes=[k for _, k, _, is_prefix in page if is_prefix],
        truncated=truncated,
        last=page[-1][1] if page else None,
    )
