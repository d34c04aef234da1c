"""The object store the S3 layer talks to: client keys in, stored blobs out.

It decides how each object is stored (for now always passthrough; the delta
decision of SPEC §4 plugs in at L{ObjectStore.put}), resolves a key to the
blob that currently represents it, and turns a backend listing into client
keys with their original sizes and ETags.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Mapping, Optional

from dgproxy import TOOL_NAME
from dgproxy.engine.keys import ObjectKey, user_key_of
from dgproxy.storage.interface import StoredObject
from dgproxy.storage.metadata import (
    DELTA, EMPTY_MD5, PASSTHROUGH, ObjectMetadata)
from dgproxy.streams import CHUNK, HashingSource


class ChecksumMismatch(Exception):
    """The body's MD5 differs from the client's Content-MD5."""


class BodyTooLarge(Exception):
    """The body grew past the configured maximum object size."""


@dataclass(frozen=True)
class ObjectVersion:
    """The blob currently representing a client key."""

    key: str
    stored: StoredObject
    metadata: ObjectMetadata

    @property
    def size(self) -> int:
        return self.metadata.file_size

    @property
    def etag(self) -> str:
        return self.metadata.etag

    @property
    def last_modified(self) -> datetime:
        return self.metadata.created_at


def unmanaged_metadata(stored: StoredObject, name: str) -> ObjectMetadata:
    """Metadata for a blob without ours: size and time from the backend,
    the Rust proxy's synthetic ETag (fact sheet storage §2.2)."""
    if stored.size == 0:
        md5 = EMPTY_MD5
    else:
        ts = stored.modified.timestamp()
        secs, nanos = int(ts), int(round((ts - int(ts)) * 1e9))
        raw = b"dg-unmanaged-etag-v1\0" + struct.pack("<QQI", stored.size, secs, nanos)
        md5 = hashlib.sha256(raw).hexdigest()[:32]
    return ObjectMetadata(
        tool="", original_name=name, file_sha256="", file_size=stored.size,
        md5=md5, created_at=stored.modified, note=PASSTHROUGH)


def _effective(stored: StoredObject) -> ObjectMetadata:
    if stored.metadata is not None:
        return stored.metadata
    return unmanaged_metadata(stored, stored.key.rpartition("/")[2])


class ObjectStore:
    """Client-key operations over one backend (the router picks the backend)."""

    def __init__(self, backend, max_object_size: int):
        self.backend = backend
        self.max_object_size = max_object_size

    async def put(self, bucket: str, key: str, body, *, content_type: Optional[str],
                  user_metadata: Mapping[str, str], expected_md5: Optional[str] = None,
                  multipart_etag: Optional[str] = None) -> ObjectMetadata:
        """Store C{body} under C{key}; nothing is visible unless all of it arrived."""
        okey = ObjectKey(key)
        source = HashingSource(body)
        writer = await self.backend.open_write(bucket, okey.passthrough_key)
        try:
            while True:
                chunk = await source.read(CHUNK)
                if not chunk:
                    break
                if source.size > self.max_object_size:
                    raise BodyTooLarge(source.size)
                await writer.write(chunk)
            md5 = source.md5.hexdigest()
            if expected_md5 is not None and md5 != expected_md5:
                raise ChecksumMismatch(md5)
            meta = ObjectMetadata(
                tool=TOOL_NAME, original_name=okey.filename,
                file_sha256=source.sha256.hexdigest(), file_size=source.size, md5=md5,
                created_at=datetime.now(timezone.utc), note=PASSTHROUGH,
                content_type=content_type, user_metadata=dict(user_metadata),
                multipart_etag=multipart_etag)
            await writer.commit(meta)
        except BaseException:
            writer.abort()
            source.close()
            raise
        # A passthrough write supersedes any delta of the same key.
        await self.backend.delete(bucket, okey.delta_key)
        return meta

    async def head(self, bucket: str, key: str) -> Optional[ObjectVersion]:
        """The current version of C{key}: the newer of its passthrough and delta blobs."""
        okey = ObjectKey(key)
        plain = await self.backend.stat(bucket, okey.passthrough_key)
        delta = await self.backend.stat(bucket, okey.delta_key)
        best = None
        for stored in (plain, delta):
            if stored is None:
                continue
            meta = _effective(stored)
            if best is None or meta.created_at > best.metadata.created_at:
                best = ObjectVersion(key, stored, meta)
        return best

    async def open(self, bucket: str, version: ObjectVersion, offset: int = 0,
                   length: Optional[int] = None):
        """An L{IByteSource} over the original bytes of C{version}."""
        if version.metadata.note == DELTA:
            raise NotImplementedError("delta reconstruction arrives with the delta engine")
        return await self.backend.open_read(bucket, version.stored.key, offset, length)

    async def delete(self, bucket: str, key: str) -> bool:
        okey = ObjectKey(key)
        a = await self.backend.delete(bucket, okey.passthrough_key)
        b = await self.backend.delete(bucket, okey.delta_key)
        return a or b

    async def list(self, bucket: str, prefix: str, delimiter: Optional[str]):
        """(versions sorted by key, common prefixes) under C{prefix}."""
        backend_delim = "/" if delimiter == "/" else None
        stored, prefixes = await self.backend.list(bucket, prefix, backend_delim)
        latest: dict[str, ObjectVersion] = {}
        for obj in stored:
            user_key = user_key_of(obj.key)
            if user_key is None or not user_key.startswith(prefix):
                continue
            meta = _effective(obj)
            seen = latest.get(user_key)
            if seen is None or meta.created_at > seen.metadata.created_at:
                latest[user_key] = ObjectVersion(user_key, obj, meta)
        versions = sorted(latest.values(), key=lambda v: v.key.encode("utf-8"))
        return versions, list(prefixes)
