"""Multipart uploads whose state lives on the backend, not in the process.

An upload is a directory of internal blobs in its bucket:
C{.dg/multipart/<upload id>/upload.json} (key, content type, metadata,
initiation time) and one C{part-NNNNN} blob per part (its metadata holds the
part's size and MD5). Any process sharing the backend can add parts to,
list, complete or abort it, and a restart loses nothing. Completing streams
the parts, in order, through the normal store path (so the SPEC §4 delta
decision runs on the assembled object) and records a short-lived
C{completed.json} so a retried Complete gets the same answer.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Mapping, Optional

from twisted.internet import defer
from twisted.logger import Logger

from dgproxy import TOOL_NAME
from dgproxy.engine.store import ChecksumMismatch, KeyedLocks
from dgproxy.storage.metadata import PASSTHROUGH, ObjectMetadata, format_timestamp, parse_timestamp
from dgproxy.streams import CHUNK, HashingSource, drain, read_all

log = Logger(namespace="dgproxy.multipart")

ROOT = ".dg/multipart/"
COMPLETED = ".dg/completed/"
MAX_PARTS = 10000
MIN_PART_SIZE = 5 * 1024 * 1024
MAX_OBJECT_SIZE = 5 * 1024**4  # S3's limit for an object assembled from parts


class NoSuchUpload(Exception):
    pass


class InvalidPart(Exception):
    pass


class InvalidPartOrder(Exception):
    pass


class EntityTooSmall(Exception):
    def __init__(self, part_number: int, size: int):
        super().__init__(f"part {part_number} is {size} bytes")
        self.part_number = part_number
        self.size = size


class TooManyUploads(Exception):
    pass


@dataclass(frozen=True)
class Upload:
    upload_id: str
    key: str
    initiated: datetime
    content_type: Optional[str]
    user_metadata: Mapping[str, str]

    def to_json(self) -> bytes:
        return json.dumps({"upload_id": self.upload_id, "key": self.key,
                           "initiated": format_timestamp(self.initiated),
                           "content_type": self.content_type,
                           "user_metadata": dict(self.user_metadata)}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "Upload":
        d = json.loads(raw)
        return cls(d["upload_id"], d["key"], parse_timestamp(d["initiated"]),
                   d.get("content_type"), d.get("user_metadata") or {})


@dataclass(frozen=True)
class Part:
    number: int
    size: int
    md5: str
    modified: datetime

    @property
    def etag(self) -> str:
        return f'"{self.md5}"'


def multipart_etag(md5s: list[str], count: int) -> str:
    digest = hashlib.md5(b"".join(bytes.fromhex(m) for m in md5s)).hexdigest()
    return f'"{digest}-{count}"'


# The part sizes of an object completed from parts, kept among its metadata so
# that GET ?partNumber=N (how some SDKs download) can serve each part:
# runs of equal sizes, "8388608*12,1048576". Longer than PARTS_TEXT_LIMIT
# (thousands of sizes all different) it is not kept.
PARTS_KEY = "dg-parts"
PARTS_TEXT_LIMIT = 256


def parts_text(sizes: list[int]) -> Optional[str]:
    runs: list[list[int]] = []
    for size in sizes:
        if runs and runs[-1][0] == size:
            runs[-1][1] += 1
        else:
            runs.append([size, 1])
    text = ",".join(str(size) if n == 1 else f"{size}*{n}" for size, n in runs)
    return text if len(text) <= PARTS_TEXT_LIMIT else None


def part_spans(text: Optional[str], total: int) -> Optional[list[tuple[int, int]]]:
    """(first, last) byte of each part, from L{parts_text}'s form; None when
    there is none, or it does not add up to C{total} bytes."""
    if not text or len(text) > PARTS_TEXT_LIMIT:
        return None
    spans, at = [], 0
    try:
        for run in text.split(","):
            size, _, count = run.partition("*")
            size, count = int(size), int(count or 1)
            if size < 0 or not 1 <= count <= MAX_PARTS - len(spans):
                return None
            for _ in range(count):
                spans.append((at, at + size - 1))
                at += size
    except ValueError:
        return None
    return spans if at == total else None


def _upload_dir(upload_id: str) -> str:
    return f"{ROOT}{upload_id}/"


def _part_key(upload_id: str, number: int) -> str:
    return f"{_upload_dir(upload_id)}part-{number:05d}"


def _valid_id(upload_id: str) -> bool:
    return len(upload_id) == 32 and all(c in "0123456789abcdef" for c in upload_id)


def _internal_meta(name: str, size: int, md5: str, sha256: str = "") -> ObjectMetadata:
    return ObjectMetadata(tool=TOOL_NAME, original_name=name, file_sha256=sha256, file_size=size,
                          md5=md5, created_at=datetime.now(timezone.utc), note=PASSTHROUGH)


class _ConcatSource:
    """The parts of an upload, one after another, as one L{IByteSource}."""

    def __init__(self, backend, bucket: str, keys: list[str]):
        self._backend = backend
        self._bucket = bucket
        self._keys = list(keys)
        self._current = None
        self.blob_keys = tuple(keys)  # for a backend that can join them in place

    async def _read(self, size: int) -> bytes:
        while True:
            if self._current is None:
                if not self._keys:
                    return b""
                key = self._keys.pop(0)
                self._current = await self._backend.open_read(self._bucket, key)
                if self._current is None:
                    raise InvalidPart(f"part {key} vanished")
            chunk = await self._current.read(size)
            if chunk:
                return chunk
            self._current.close()
            self._current = None

    def read(self, size: int = CHUNK):
        return defer.ensureDeferred(self._read(size))

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None
        self._keys = []


class Multipart:
    """Multipart uploads over the backend of an L{ObjectStore}."""

    def __init__(self, store, max_uploads: int, idle_ttl_hours: int):
        self.store = store
        self.backend = store.backend
        self.max_uploads = max_uploads
        self.idle_ttl = timedelta(hours=idle_ttl_hours)
        self._open_counts: dict[str, int] = {}
        self._completing = KeyedLocks()

    async def _write_blob(self, bucket: str, key: str, data: bytes) -> None:
        writer = await self.backend.open_write(bucket, key)
        try:
            await writer.write(data)
            await writer.commit(_internal_meta(key.rpartition("/")[2], len(data),
                                               hashlib.md5(data).hexdigest()))
        except BaseException:
            writer.abort()
            raise

    async def _read_blob(self, bucket: str, key: str) -> Optional[bytes]:
        source = await self.backend.open_read(bucket, key)
        if source is None:
            return None
        return await read_all(source, 1024 * 1024)

    async def _open_uploads(self, bucket: str) -> list[str]:
        _, prefixes = await self.backend.list(bucket, ROOT, "/")
        return [p[len(ROOT):].rstrip("/") for p in prefixes if _valid_id(p[len(ROOT):].rstrip("/"))]

    def open_uploads(self) -> int:
        """Open uploads this process knows of (buckets it has counted)."""
        return sum(self._open_counts.values())

    async def _count(self, bucket: str) -> int:
        """Open uploads: this bucket's counted on the backend now (another
        process may have opened or closed some), the others as last seen."""
        self._open_counts[bucket] = len(await self._open_uploads(bucket))
        return sum(self._open_counts.values())

    # -- operations -------------------------------------------------------------
    async def create(self, bucket: str, key: str, content_type: Optional[str],
                     user_metadata: Mapping[str, str]) -> Upload:
        if await self._count(bucket) >= self.max_uploads:
            raise TooManyUploads()
        upload = Upload(secrets.token_hex(16), key, datetime.now(timezone.utc), content_type,
                        dict(user_metadata))
        await self._write_blob(bucket, _upload_dir(upload.upload_id) + "upload.json",
                               upload.to_json())
        self._open_counts[bucket] = self._open_counts.get(bucket, 0) + 1
        return upload

    async def get(self, bucket: str, key: str, upload_id: str) -> Upload:
        if not _valid_id(upload_id):
            raise NoSuchUpload(upload_id)
        raw = await self._read_blob(bucket, _upload_dir(upload_id) + "upload.json")
        if raw is None:
            raise NoSuchUpload(upload_id)
        upload = Upload.from_json(raw)
        if upload.key != key:
            raise NoSuchUpload(upload_id)
        return upload

    async def upload_part(self, bucket: str, key: str, upload_id: str, number: int, body,
                          expected_md5: Optional[str] = None, max_size: int = 5 * 1024**3) -> Part:
        """Stream one part to the backend; the previous copy of the part stays
        until the new one is complete."""
        await self.get(bucket, key, upload_id)
        source = HashingSource(body, want_sha256=False)
        writer = await self.backend.open_write(bucket, _part_key(upload_id, number))
        try:
            await drain(source, writer.write, max_size)
            md5 = source.md5.hexdigest()
            if expected_md5 is not None and md5 != expected_md5:
                raise ChecksumMismatch(md5)
            await writer.commit(_internal_meta(f"part-{number:05d}", source.size, md5))
        except BaseException:
            writer.abort()
            raise
        return Part(number, source.size, md5, datetime.now(timezone.utc))

    async def parts(self, bucket: str, upload_id: str) -> list[Part]:
        objects, _ = await self.backend.list(bucket, _upload_dir(upload_id), None)
        out = []
        for o in objects:
            name = o.key.rpartition("/")[2]
            if name.startswith("part-") and name[5:].isdigit() and o.metadata is not None:
                out.append(Part(int(name[5:]), o.metadata.file_size, o.metadata.md5,
                                o.metadata.created_at))
            elif name.startswith("part-") and o.metadata is None:
                stored = await self.backend.stat(bucket, o.key)  # lite listings (S3)
                if stored is not None and stored.metadata is not None:
                    out.append(Part(int(name[5:]), stored.metadata.file_size,
                                    stored.metadata.md5, stored.metadata.created_at))
        return sorted(out, key=lambda p: p.number)

    async def completed(self, bucket: str, key: str, upload_id: str) -> Optional[dict]:
        if not _valid_id(upload_id):
            return None
        raw = await self._read_blob(bucket, f"{COMPLETED}{upload_id}.json")
        if raw is None:
            return None
        result = json.loads(raw)
        return result if result.get("key") == key else None

    async def validate(self, bucket: str, key: str, upload_id: str,
                       requested: list[tuple[int, str]]) -> list[Part]:
        """The parts a Complete names, checked (ascending, ETags matching,
        non-final parts at least 5 MiB) before any work starts."""
        await self.get(bucket, key, upload_id)
        stored = {p.number: p for p in await self.parts(bucket, upload_id)}
        if not requested:
            raise InvalidPart("no parts")
        previous = 0
        chosen: list[Part] = []
        for number, etag in requested:
            if number <= previous:
                raise InvalidPartOrder()
            previous = number
            part = stored.get(number)
            if part is None or etag.strip().strip('"') != part.md5:
                raise InvalidPart(f"part {number}")
            chosen.append(part)
        for part in chosen[:-1]:
            if part.size < MIN_PART_SIZE:
                raise EntityTooSmall(part.number, part.size)
        return chosen

    async def complete(self, bucket: str, key: str, upload_id: str,
                       requested: list[tuple[int, str]]) -> str:
        """Assemble the requested parts into the object; returns its ETag. One
        Complete per upload runs at a time here; a second one waits, then
        finds the completion record and gets the same answer."""
        return await self._completing.run((bucket, upload_id),
                                          lambda: self._complete(bucket, key, upload_id, requested))

    async def _complete(self, bucket: str, key: str, upload_id: str,
                        requested: list[tuple[int, str]]) -> str:
        done = await self.completed(bucket, key, upload_id)
        if done is not None:
            return done["etag"]
        upload = await self.get(bucket, key, upload_id)
        chosen = await self.validate(bucket, key, upload_id, requested)
        etag = multipart_etag([p.md5 for p in chosen], len(chosen))
        body = _ConcatSource(self.backend, bucket,
                             [_part_key(upload_id, p.number) for p in chosen])
        user_metadata = dict(upload.user_metadata)
        sizes = parts_text([p.size for p in chosen])
        if sizes is not None:
            user_metadata[PARTS_KEY] = sizes
        await self.store.put(bucket, key, body, content_type=upload.content_type,
                                    user_metadata=user_metadata, multipart_etag=etag,
                                    size_hint=sum(p.size for p in chosen),
                                    max_size=MAX_OBJECT_SIZE)
        await self._write_blob(bucket, f"{COMPLETED}{upload_id}.json",
                               json.dumps({"key": key, "etag": etag}).encode())
        await self._remove(bucket, upload_id)
        return etag

    async def abort(self, bucket: str, key: str, upload_id: str) -> None:
        await self.get(bucket, key, upload_id)
        await self._remove(bucket, upload_id)

    async def _remove(self, bucket: str, upload_id: str) -> None:
        """Parts first, the upload record last: a crash in between leaves an
        upload that can still be aborted or swept."""
        objects, _ = await self.backend.list(bucket, _upload_dir(upload_id), None)
        for o in objects:
            if not o.key.endswith("/upload.json"):
                await self.backend.delete(bucket, o.key)
        removed = await self.backend.delete(bucket, _upload_dir(upload_id) + "upload.json")
        if removed and self._open_counts.get(bucket, 0) > 0:
            self._open_counts[bucket] -= 1

    def forget_bucket(self, bucket: str) -> None:
        """The bucket was deleted: its uploads went with it."""
        self._open_counts.pop(bucket, None)

    async def list_uploads(self, bucket: str, prefix: str = "") -> list[Upload]:
        uploads = []
        for upload_id in await self._open_uploads(bucket):
            raw = await self._read_blob(bucket, _upload_dir(upload_id) + "upload.json")
            if raw is None:
                continue
            try:
                upload = Upload.from_json(raw)
            except (ValueError, KeyError):
                continue
            if upload.key.startswith(prefix):
                uploads.append(upload)
        return sorted(uploads, key=lambda u: (u.key.encode("utf-8"), u.initiated))

    async def sweep(self, bucket: str, now: Optional[datetime] = None) -> int:
        """Abort uploads idle longer than the TTL and drop old completion records."""
        now = now or datetime.now(timezone.utc)
        swept = 0
        for upload_id in await self._open_uploads(bucket):
            objects, _ = await self.backend.list(bucket, _upload_dir(upload_id), None)
            if not objects:
                continue
            last = max(o.modified for o in objects)
            if now - last > self.idle_ttl:
                log.info("Sweeping multipart upload {upload_id} in {bucket}, idle since {last}",
                         upload_id=upload_id, bucket=bucket, last=last.isoformat())
                await self._remove(bucket, upload_id)
                swept += 1
        records, _ = await self.backend.list(bucket, COMPLETED, None)
        for o in records:
            if now - o.modified > self.idle_ttl:
                await self.backend.delete(bucket, o.key)
        self._open_counts.pop(bucket, None)
        return swept

    async def sweep_all(self) -> int:
        swept = 0
        for bucket in await self.backend.list_buckets():
            try:
                swept += await self.sweep(bucket.name)
            except Exception as e:
                log.warn("Multipart sweep of {bucket} failed: {error}", bucket=bucket.name,
                         error=str(e))
        return swept
