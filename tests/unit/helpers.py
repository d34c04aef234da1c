"""Small helpers shared by the unit tests."""

from __future__ import annotations

import functools
import hashlib
from datetime import datetime, timezone

from twisted.internet import defer

from dgproxy.storage.metadata import ObjectMetadata

WHEN = datetime(2026, 7, 10, 12, 34, 56, 123456, tzinfo=timezone.utc)


def inline(fn):
    """Run an C{async def} test method under trial."""
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        return defer.ensureDeferred(fn(self, *args, **kwargs))
    return wrapper


def meta_for(key: str, data: bytes, **changes) -> ObjectMetadata:
    """Passthrough metadata for C{data} stored under C{key}."""
    return ObjectMetadata(
        tool="dgproxy/test", original_name=key.rpartition("/")[2],
        file_sha256=hashlib.sha256(data).hexdigest(), file_size=len(data),
        md5=hashlib.md5(data).hexdigest(), created_at=WHEN).with_changes(**changes)
