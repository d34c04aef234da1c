"""HTTP conditionals and byte ranges, as S3 applies them."""

from __future__ import annotations

from datetime import datetime
from typing import Callable, Optional

from dgproxy.s3 import errors
from dgproxy.storage.interface import ByteRange
from dgproxy.wire import parse_http_date


class NotModified(Exception):
    """The client's cached copy is current (304)."""


def parse_range(header: Optional[str], size: int) -> Optional[tuple[int, int]]:
    """(first, last) byte of a single C{Range}, None for a whole-object read.

    A header S3 would not understand (multiple ranges, bad syntax) is
    ignored, as RFC 9110 says; an unsatisfiable one raises InvalidRange."""
    byte_range = ByteRange.parse(header)
    if byte_range is None:
        return None
    span = byte_range.resolve(size)
    if span is None:
        raise errors.InvalidRange(ActualObjectSize=str(size))
    return span


def _etag_matches(header: str, etag: str, weak: bool = False) -> bool:
    """Strong comparison, or weak (C{W/} ignored) for If-None-Match."""
    bare = etag.strip('"')
    for tag in (t.strip() for t in header.split(",")):
        if weak and tag.startswith("W/"):
            tag = tag[2:]
        if tag == "*" or tag.strip('"') == bare:
            return True
    return False


def check_read(header: Callable[[str], Optional[str]], etag: str,
               modified: datetime, prefix: str = "") -> None:
    """GET/HEAD conditionals (RFC 9110 §13.2.2 order), or copy-source ones with
    C{prefix="x-amz-copy-source-"} (where a failed not-modified test is 412)."""
    modified = modified.replace(microsecond=0)
    if_match = header(prefix + "if-match")
    if if_match is not None:
        if not _etag_matches(if_match, etag):
            raise errors.PreconditionFailed(Condition="If-Match")
    else:
        since = parse_http_date(header(prefix + "if-unmodified-since"))
        if since is not None and modified > since:
            raise errors.PreconditionFailed(Condition="If-Unmodified-Since")
    if_none = header(prefix + "if-none-match")
    if if_none is not None:
        if _etag_matches(if_none, etag, weak=True):
            if prefix:
                raise errors.PreconditionFailed(Condition="If-None-Match")
            raise NotModified()
    else:
        since = parse_http_date(header(prefix + "if-modified-since"))
        if since is not None and modified <= since:
            if prefix:
                raise errors.PreconditionFailed(Condition="If-Modified-Since")
            raise NotModified()


def check_write(header: Callable[[str], Optional[str]], current_etag: Optional[str],
                key: str = "") -> None:
    """Conditional write (PUT, CompleteMultipartUpload, CopyObject):
    C{If-None-Match: *} and C{If-Match: <etag>}. As on AWS, If-Match on a
    key with no object is 404 NoSuchKey, not 412."""
    if_none = header("if-none-match")
    if if_none is not None and current_etag is not None and _etag_matches(if_none, current_etag):
        raise errors.PreconditionFailed(Condition="If-None-Match")
    if_match = header("if-match")
    if if_match is not None and current_etag is None:
        raise errors.NoSuchKey(Key=key)
    if if_match is not None and not _etag_matches(if_match, current_etag):
        raise errors.PreconditionFailed(Condition="If-Match")
