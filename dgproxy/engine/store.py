"""The object store the S3 layer talks to: client keys in, stored blobs out.

It decides how each object is stored (SPEC §4: C{reference}, C{delta} or
C{passthrough}), resolves a key to the blob that currently represents it,
rebuilds delta objects through xdelta3 (sending nothing until the SHA-256
matches), and turns a backend listing into client keys with their original
sizes and ETags.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Mapping, Optional

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from dgproxy import TOOL_NAME
from dgproxy.engine.codec import Codec, CodecError, OutputTooLarge
from dgproxy.engine.keys import (
    INTERNAL_PREFIX, ObjectKey, common_prefix_of, listing_frontier, reference_key, user_key_of)
from dgproxy.engine.policy import DeltaPolicy
from dgproxy.engine.references import ReferenceCorrupt, ReferenceFile, References
from dgproxy.engine.spool import Spool, SpoolFile
from dgproxy.storage.interface import AlreadyExists, ByteRange, StoredObject
from dgproxy.storage.metadata import (
    DELTA, EMPTY_MD5, INTERNAL_REFERENCE_NAME, PASSTHROUGH, REFERENCE, REFERENCE_NAME,
    ObjectMetadata)
from dgproxy.streams import (
    CHUNK, SOCKET_CHUNK, BodyTooLarge, FileSource, HashingSource, drain)

log = Logger(namespace="dgproxy.engine")


PYTHON_TOOL = "deltaglider/"  # the Python tool's dg-tool value (no -D when it encodes)


class ChecksumMismatch(Exception):
    """The body's MD5 differs from the client's Content-MD5."""


class IntegrityError(Exception):
    """A delta object cannot be rebuilt byte-exact (missing or corrupt data)."""


@dataclass
class EngineStats:
    """What the engine reports about its work; the metrics layer subclasses
    this to feed Prometheus (the engine never imports it)."""

    decisions: Counter = field(default_factory=Counter)
    bytes_saved: int = 0
    encodes: int = 0
    decodes: int = 0

    def decision(self, label: str) -> None:
        self.decisions[label] += 1

    def delta_stored(self, original: int, delta: int) -> None:
        self.bytes_saved += original - delta

    def encoded(self, seconds: float) -> None:
        self.encodes += 1

    def decoded(self, seconds: float) -> None:
        self.decodes += 1


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
    """Metadata for a blob without ours: size, time and ETag from the backend
    (on a filesystem, the Rust proxy's synthetic ETag, fact sheet storage §2.2)."""
    multipart = None
    if stored.etag and "-" in stored.etag:
        md5, multipart = "", f'"{stored.etag}"'
    elif stored.etag and len(stored.etag) == 32:
        md5 = stored.etag
    elif stored.size == 0:
        md5 = EMPTY_MD5
    else:
        ts = stored.modified.timestamp()
        secs, nanos = int(ts), int(round((ts - int(ts)) * 1e9))
        raw = b"dg-unmanaged-etag-v1\0" + struct.pack("<QQI", stored.size, secs, nanos)
        md5 = hashlib.sha256(raw).hexdigest()[:32]
    return ObjectMetadata(
        tool="", original_name=name, file_sha256="", file_size=stored.size,
        md5=md5, created_at=stored.modified, note=PASSTHROUGH, multipart_etag=multipart)


def _effective(stored: StoredObject) -> ObjectMetadata:
    if stored.metadata is not None:
        return stored.metadata
    return unmanaged_metadata(stored, stored.key.rpartition("/")[2])


class _Rebuild:
    """One rebuild and everyone waiting for it."""

    def __init__(self):
        self.spool: Optional[SpoolFile] = None
        self.waiters: list[defer.Deferred] = []
        self.timer = None

    def wait(self) -> defer.Deferred:
        if self.spool is not None:
            return defer.succeed(self.spool)
        d = defer.Deferred()
        self.waiters.append(d)
        return d

    def settle(self, result) -> None:
        """Hand the outcome (a SpoolFile or a Failure) to every waiter."""
        if isinstance(result, SpoolFile):
            self.spool = result
        waiters, self.waiters = self.waiters, []
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)


class Rebuilt:
    """Recently rebuilt delta objects, kept in the spool for a short while.

    Clients fetch large objects as parallel ranged GETs (the aws CLI uses
    8 MiB ranges); each would otherwise rebuild the whole object. Concurrent
    reads of one version share one rebuild, and later ones reuse it until
    C{ttl} seconds after its last use. Readers hold their own open file, so
    eviction never cuts a response short. A failed rebuild is forgotten at
    once: the next read tries again."""

    def __init__(self, reactor, ttl: float = 30.0, max_bytes: int = 4 * 1024**3):
        self._reactor = reactor
        self.ttl = ttl
        self.max_bytes = max_bytes
        self._entries: dict[tuple, _Rebuild] = {}

    async def open(self, key: tuple, build, offset: int, length: Optional[int]) -> FileSource:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Rebuild()
            d = defer.ensureDeferred(build())
            d.addErrback(lambda f: (self._entries.pop(key, None), f)[1])
            d.addBoth(entry.settle)
        spool = await entry.wait()
        try:
            f = open(spool.path, "rb")
        except FileNotFoundError:  # evicted in between: rebuild
            self._entries.pop(key, None)
            return await self.open(key, build, offset, length)
        self._touch(key, entry)
        return FileSource(f, offset, length)

    def _touch(self, key: tuple, entry: _Rebuild) -> None:
        if self._entries.get(key) is not entry:
            return
        if entry.timer is not None and entry.timer.active():
            entry.timer.reset(self.ttl)
        else:
            entry.timer = self._reactor.callLater(self.ttl, self._evict, key)
        total = sum(e.spool.size for e in self._entries.values() if e.spool is not None)
        if total > self.max_bytes:
            for k, e in list(self._entries.items()):
                if k != key and e.spool is not None:
                    self._evict(k)
                    break

    def _evict(self, key: tuple) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        if entry.timer is not None and entry.timer.active():
            entry.timer.cancel()
        if entry.spool is not None:
            entry.spool.release()

    def clear(self) -> None:
        for key in list(self._entries):
            self._evict(key)


class KeyedLocks:
    """One L{DeferredLock} per key (a deltaspace, an upload), dropped when unused."""

    def __init__(self):
        self._locks: dict[tuple, list] = {}

    async def run(self, key: tuple, fn):
        entry = self._locks.setdefault(key, [defer.DeferredLock(), 0])
        entry[1] += 1
        try:
            await entry[0].acquire()
            try:
                return await fn()
            finally:
                entry[0].release()
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._locks[key]


class _SpoolTail:
    """Feeds xdelta3 from the spool file while the body is still arriving.

    The receiver only appends to the spool (so the client is never held up
    by the encoder), and this reader follows it from the page cache at the
    encoder's pace: no memory grows whichever side is faster."""

    def __init__(self, path: str):
        self._file = open(path, "rb")
        self._written = 0
        self._done = False
        self._wake: Optional[defer.Deferred] = None

    def grew(self, n: int) -> None:
        self._written += n
        self._poke()

    def finish(self) -> None:
        self._done = True
        self._poke()

    def _poke(self) -> None:
        d, self._wake = self._wake, None
        if d is not None:
            d.callback(None)

    async def feed(self, run) -> None:
        pos = 0
        try:
            while run.failed is None:
                if pos < self._written:
                    chunk = self._file.read(min(CHUNK, self._written - pos))
                    pos += len(chunk)
                    await run.write(chunk)
                elif self._done:
                    return
                else:
                    self._wake = defer.Deferred()
                    await self._wake
        except CodecError:
            pass  # a losing or failed delta: the original is kept
        finally:
            self._file.close()


@dataclass
class _Body:
    """A fully received body: where it is and what it hashed to."""

    spool: SpoolFile
    size: int
    md5: str
    sha256: str


class ObjectStore:
    """Client-key operations over one backend (the router picks the backend)."""

    def __init__(self, backend, max_object_size: int, policy: DeltaPolicy, codec: Codec,
                 references: References, spool: Spool, stats: Optional[EngineStats] = None):
        self.backend = backend
        self.max_object_size = max_object_size
        self.policy = policy
        self.codec = codec
        self.references = references
        self.spool = spool
        self.stats = stats or EngineStats()
        self.locks = KeyedLocks()
        from twisted.internet import reactor
        self.rebuilt = Rebuilt(reactor)

    # -- writes ---------------------------------------------------------------
    async def put(self, bucket: str, key: str, body, *, content_type: Optional[str],
                  user_metadata: Mapping[str, str], expected_md5: Optional[str] = None,
                  multipart_etag: Optional[str] = None, size_hint: Optional[int] = None,
                  expected_sha256: Optional[str] = None,
                  max_size: Optional[int] = None) -> ObjectMetadata:
        """Store C{body} under C{key}; nothing is visible unless all of it arrived.
        C{max_size} overrides the single-PUT limit (an assembled multipart upload)."""
        okey = ObjectKey(key)
        limit = max_size or self.max_object_size
        fields = dict(content_type=content_type, user_metadata=dict(user_metadata),
                      multipart_etag=multipart_etag)
        if not self.policy.eligible(bucket, okey.filename, size_hint):
            joined = getattr(body, "blob_keys", None)
            if joined and size_hint is not None and self._can_assemble(bucket):
                return await self._put_assembled(bucket, okey, body, fields, size_hint, limit)
            return await self._put_passthrough(bucket, okey, body, expected_md5, fields, size_hint,
                                               expected_sha256, limit)
        return await self._put_candidate(bucket, okey, body, expected_md5, size_hint, fields,
                                         limit)

    def _metadata(self, okey: ObjectKey, size: int, md5: str, sha256: str, note: str,
                  fields: dict, **extra) -> ObjectMetadata:
        return ObjectMetadata(
            tool=TOOL_NAME, original_name=okey.filename, file_sha256=sha256, file_size=size,
            md5=md5, created_at=datetime.now(timezone.utc), note=note, **fields, **extra)

    def _can_assemble(self, bucket: str) -> bool:
        can = getattr(self.backend, "can_assemble", None)
        return bool(can and can(bucket))

    async def _put_assembled(self, bucket, okey: ObjectKey, body, fields, size: int,
                             limit: int) -> ObjectMetadata:
        """A passthrough object made of blobs already stored (a multipart
        upload's parts), joined by the backend where they are: on an S3
        backend no byte of it passes through dgproxy. Its ETag is the
        multipart one; no digest of the whole is taken."""
        body.close()
        if size > limit:
            raise BodyTooLarge(size)
        meta = self._metadata(okey, size, "", "", PASSTHROUGH, fields)
        await self.backend.assemble(bucket, okey.passthrough_key, list(body.blob_keys), meta)
        if self.policy.delta_named(okey.filename):
            await self.backend.discard(bucket, okey.delta_key)
        self.stats.decision(PASSTHROUGH)
        return meta

    async def _put_passthrough(self, bucket, okey: ObjectKey, body, expected_md5, fields,
                               size_hint: Optional[int] = None,
                               expected_sha256: Optional[str] = None, limit: int = 0):
        # The metadata as far as it is known before the body (hashes the client
        # declared, and checked by the end): a backend that must send metadata
        # first (S3) can then stream instead of spooling.
        if size_hint == 0:
            expected_md5, expected_sha256 = EMPTY_MD5, hashlib.sha256(b"").hexdigest()
        hint = self._metadata(okey, size_hint or 0, expected_md5 or "", expected_sha256 or "",
                              PASSTHROUGH, fields)
        writer = await self.backend.open_write(bucket, okey.passthrough_key, size=size_hint,
                                               hint=hint)
        # A writer that sent the metadata ahead needs no digests: the backend
        # hashes what it stores (its ETag), so hash only to check the client.
        hashes = writer.hashes_needed
        source = HashingSource(body, want_md5=hashes or expected_md5 is not None,
                               want_sha256=hashes)
        try:
            await drain(source, writer.write, limit or self.max_object_size)
            md5 = source.md5.hexdigest() if source.md5 is not None else ""
            if expected_md5 is not None and md5 != expected_md5:
                raise ChecksumMismatch(md5)
            sha256 = (source.sha256.hexdigest() if source.sha256 is not None
                      else expected_sha256 or "")
            meta = self._metadata(okey, source.size, md5, sha256, PASSTHROUGH, fields)
            stored_md5 = await writer.commit(meta)
        except BaseException:
            writer.abort()
            raise
        if not md5:
            meta = meta.with_changes(md5=stored_md5 or "")
        # A passthrough write supersedes any delta of the same key (only another
        # tool can have made one of a name dgproxy never stores as a delta, and
        # then reads and listings prefer this newer object anyway).
        if self.policy.delta_named(okey.filename):
            await self.backend.discard(bucket, okey.delta_key)
        self.stats.decision(PASSTHROUGH)
        return meta

    async def _put_candidate(self, bucket, okey: ObjectKey, body, expected_md5, size_hint,
                             fields, limit: int = 0) -> ObjectMetadata:
        """Spool the body while encoding it against the reference (if there is
        one yet), then keep whichever of delta and original is smaller."""
        ds = okey.deltaspace
        ratio = self.policy.ratio(bucket)
        spool = self.spool.create("body")
        delta: Optional[SpoolFile] = None
        run = None
        ref: Optional[ReferenceFile] = None
        try:
            ref = await self._reference(bucket, ds)
            if ref is not None and size_hint:
                # Encode while the body arrives, if a codec slot is free now;
                # otherwise encode from the spool once it is complete.
                delta = self.spool.create("delta")
                run = self.codec.try_start("encode", ref.path, delta.write,
                                           cap=int(size_hint * ratio))
            started = time.monotonic()
            source = HashingSource(body)
            tail = _SpoolTail(spool.path) if run is not None else None
            feeding = defer.ensureDeferred(tail.feed(run)) if tail is not None else None
            try:
                while True:
                    chunk = await source.read(SOCKET_CHUNK)
                    if not chunk:
                        break
                    if source.size > (limit or self.max_object_size):
                        raise BodyTooLarge(source.size)
                    spool.write(chunk)
                    if tail is not None:
                        spool.flush()
                        tail.grew(len(chunk))
            finally:
                source.close()
                if tail is not None:
                    tail.finish()
            spool.flush()
            received_at = time.monotonic()
            if feeding is not None:
                await feeding
            received = _Body(spool, source.size, source.md5.hexdigest(),
                             source.sha256.hexdigest())
            if expected_md5 is not None and received.md5 != expected_md5:
                raise ChecksumMismatch(received.md5)
            delta_size = None
            encoded = False
            if run is not None:
                delta_size, encoded = await self._finish_encode(run)
                self.stats.encoded(time.monotonic() - started)
                run = None
            if ref is None:
                return await self.locks.run(
                    (self.backend.name, bucket, ds),
                    lambda: self._put_first(bucket, okey, received, ratio, fields))
            if not encoded:
                if delta is not None:
                    delta.release()
                delta = self.spool.create("delta")
                delta_size = await self._encode_file(ref.path, spool, delta, received.size, ratio)
            encoded_at = time.monotonic()
            meta = await self.locks.run(
                (self.backend.name, bucket, ds),
                lambda: self._decide(bucket, okey, received, ref, delta, delta_size, ratio,
                                     fields, recheck=True))
            log.debug("Delta PUT {bucket}/{key}: body {body:.3f}s, encode done +{encode:.3f}s, "
                      "stored +{store:.3f}s", bucket=bucket, key=okey.key,
                      body=received_at - started, encode=encoded_at - received_at,
                      store=time.monotonic() - encoded_at)
            return meta
        except BaseException:
            if run is not None:
                run.abort()
            raise
        finally:
            spool.release()
            if delta is not None:
                delta.release()
            if ref is not None:
                ref.release()

    async def _reference(self, bucket: str, ds: str) -> Optional[ReferenceFile]:
        try:
            return await self.references.materialise(bucket, ds)
        except ReferenceCorrupt:
            self.references.evict(bucket, ds)
            raise IntegrityError(f"reference of {bucket}/{ds or '(root)'} is corrupt") from None

    @staticmethod
    async def _finish_encode(run) -> tuple[Optional[int], bool]:
        """(delta size or None when the delta lost, whether the answer is final);
        a failed run is not final: the caller may encode again from the spool."""
        try:
            return await run.finish(), True
        except OutputTooLarge:
            return None, True
        except CodecError as e:
            log.warn("Delta encode failed: {error}", error=str(e))
            return None, False

    async def _encode_file(self, ref_path: str, body: SpoolFile, out: SpoolFile, size: int,
                           ratio: float) -> Optional[int]:
        """Encode a spooled body against a reference; None when the delta loses."""
        started = time.monotonic()
        run = await self.codec.start("encode", ref_path, out.write, cap=int(size * ratio))
        try:
            await run.feed(FileSource(open(body.path, "rb")))
        except CodecError:
            pass  # finish() says whether the delta lost or failed
        result, _ = await self._finish_encode(run)
        self.stats.encoded(time.monotonic() - started)
        return result

    async def _put_first(self, bucket, okey: ObjectKey, body: _Body, ratio, fields):
        """Under the deltaspace lock: become the reference if there still is none."""
        ds = okey.deltaspace
        ref = await self._reference(bucket, ds)
        created = False
        if ref is None and body.size > 0:
            ref_meta = ObjectMetadata(
                tool=TOOL_NAME, original_name=INTERNAL_REFERENCE_NAME, file_sha256=body.sha256,
                file_size=body.size, md5=body.md5, created_at=datetime.now(timezone.utc),
                note=REFERENCE, content_type=fields["content_type"], source_name=okey.key)
            try:
                await self._store_file(bucket, okey.reference_key, body.spool, ref_meta,
                                       exclusive=True)
                created = True
                ref = ReferenceFile(body.spool.path, ref_meta, None)
            except AlreadyExists:  # another process won the race
                ref = await self._reference(bucket, ds)
        if ref is None:
            return await self._store_passthrough_file(bucket, okey, body, fields)
        delta = self.spool.create("delta")
        try:
            delta_size = await self._encode_file(ref.path, body.spool, delta, body.size, ratio)
            meta = await self._decide(bucket, okey, body, ref, delta, delta_size, ratio, fields,
                                      created_reference=created)
        finally:
            delta.release()
            ref.release()
        return meta

    async def _decide(self, bucket, okey: ObjectKey, body: _Body, ref: ReferenceFile,
                      delta: Optional[SpoolFile], delta_size: Optional[int], ratio: float,
                      fields, created_reference: bool = False,
                      recheck: bool = False) -> ObjectMetadata:
        """Under the deltaspace lock: keep the delta or the original.

        With C{recheck}, the reference the delta was made against must still
        be the deltaspace's reference (the last object's delete may have
        removed it meanwhile); if not, the original is stored."""
        keep = (delta is not None and delta_size is not None and body.size > 0
                and delta_size / body.size < ratio)
        if keep and recheck:
            current = await self.backend.stat(bucket, okey.reference_key)
            if (current is None or current.metadata is None
                    or current.metadata.file_sha256 != ref.metadata.file_sha256):
                log.info("Reference of {bucket}/{ds} changed during the upload of {key}; "
                         "storing it whole", bucket=bucket, ds=okey.deltaspace or "(root)",
                         key=okey.key)
                keep = False
        if not keep:
            meta = await self._store_passthrough_file(bucket, okey, body, fields)
            if created_reference:
                await self._drop_reference(bucket, okey.deltaspace)
            return meta
        meta = self._metadata(
            okey, body.size, body.md5, body.sha256, DELTA, fields,
            ref_path=REFERENCE_NAME, ref_sha256=ref.metadata.file_sha256, delta_size=delta_size,
            delta_cmd=f"xdelta3 -e -9 -s {REFERENCE_NAME} {okey.filename} {okey.filename}.delta")
        await self._store_file(bucket, okey.delta_key, delta, meta)
        await self.backend.discard(bucket, okey.passthrough_key)
        if created_reference:
            self.stats.decision(REFERENCE)  # stored whole, as reference.bin: nothing saved
        else:
            self.stats.decision(DELTA)
            self.stats.delta_stored(body.size, delta_size)
        return meta

    async def _store_passthrough_file(self, bucket, okey: ObjectKey, body: _Body, fields):
        meta = self._metadata(okey, body.size, body.md5, body.sha256, PASSTHROUGH, fields)
        await self._store_file(bucket, okey.passthrough_key, body.spool, meta)
        await self.backend.discard(bucket, okey.delta_key)
        self.stats.decision(PASSTHROUGH)
        return meta

    async def _store_file(self, bucket: str, stored_key: str, spool: SpoolFile,
                          meta: ObjectMetadata, exclusive: bool = False) -> None:
        spool.flush()
        writer = await self.backend.open_write(bucket, stored_key)
        try:
            await drain(FileSource(open(spool.path, "rb")), writer.write)
            await writer.commit(meta, exclusive=exclusive)
        except BaseException:
            writer.abort()
            raise

    async def _drop_reference(self, bucket: str, ds: str) -> None:
        await self.backend.delete(bucket, reference_key(ds))
        self.references.evict(bucket, ds)

    # -- reads ------------------------------------------------------------------
    async def _blobs(self, bucket: str, okey: ObjectKey, read_plain):
        """(C{read_plain} of the passthrough blob, stat of the delta blob). Both
        at once for a delta-eligible name; for a name dgproxy never stores as a
        delta, its .delta (another tool may have made one) is looked for only
        when there is no plain blob: one round trip to an S3 backend."""
        if not self.policy.delta_named(okey.filename):
            plain = await read_plain(bucket, okey.passthrough_key)
            delta = None if plain is not None else await self.backend.stat(bucket, okey.delta_key)
            return plain, delta
        return await defer.gatherResults(
            [defer.maybeDeferred(read_plain, bucket, okey.passthrough_key),
             defer.maybeDeferred(self.backend.stat, bucket, okey.delta_key)],
            consumeErrors=True).addErrback(lambda f: f.value.subFailure)

    async def head(self, bucket: str, key: str) -> Optional[ObjectVersion]:
        """The current version of C{key}: the newer of its passthrough and delta blobs."""
        plain, delta = await self._blobs(bucket, ObjectKey(key), self.backend.stat)
        best = None
        for stored in (plain, delta):
            if stored is None:
                continue
            meta = _effective(stored)
            if best is None or meta.created_at > best.metadata.created_at:
                best = ObjectVersion(key, stored, meta)
        return best

    async def get(self, bucket: str, key: str, byte_range: Optional[ByteRange] = None):
        """(current version, source of its content, or of C{byte_range} of it)
        or None, starting the passthrough read while the delta variant is
        looked up: one round trip to an S3 backend for the common case. The
        source is None when the delta is current (open it with L{open}) or
        the range does not resolve."""
        def read_plain(bucket: str, key: str):
            return self.backend.open_with_stat(bucket, key, byte_range)

        plain, delta = await self._blobs(bucket, ObjectKey(key), read_plain)
        best, source = None, None
        if plain is not None:
            stored, source = plain
            best = ObjectVersion(key, stored, _effective(stored))
        if delta is not None:
            meta = _effective(delta)
            if best is None or meta.created_at > best.metadata.created_at:
                if source is not None:
                    source.close()
                return ObjectVersion(key, delta, meta), None
        return (best, source) if best is not None else None

    async def open(self, bucket: str, version: ObjectVersion, offset: int = 0,
                   length: Optional[int] = None):
        """An L{IByteSource} over the original bytes of C{version} (or a slice)."""
        if version.metadata.note != DELTA:
            return await self.backend.open_read(bucket, version.stored.key, offset, length,
                                                version.stored)
        meta = version.metadata
        key = (bucket, version.key, meta.file_sha256, meta.created_at)
        return await self.rebuilt.open(key, lambda: self._reconstruct(bucket, version),
                                       offset, length)

    async def _reconstruct(self, bucket: str, version: ObjectVersion) -> SpoolFile:
        """Rebuild a delta object into the spool and check its SHA-256."""
        meta = version.metadata
        ds = ObjectKey(version.key).deltaspace
        ref = await self._reference(bucket, ds)
        if ref is None:
            log.error("Delta {bucket}/{key} has no reference in its deltaspace",
                      bucket=bucket, key=version.key)
            raise IntegrityError("missing reference")
        out = self.spool.create("out")
        sha = hashlib.sha256()

        def sink(data: bytes) -> None:
            out.write(data)
            sha.update(data)

        started = time.monotonic()
        try:
            source = await self.backend.open_read(bucket, version.stored.key,
                                                  stored=version.stored)
            if source is None:
                raise IntegrityError("delta blob vanished")
            run = await self.codec.start("decode", ref.path, sink, cap=meta.file_size,
                                         raw=not meta.tool.startswith(PYTHON_TOOL))
            try:
                await run.feed(source)
                await run.finish()
            except CodecError as e:
                run.abort()
                self.references.evict(bucket, ds)
                log.error("Rebuilding {bucket}/{key} failed: {error}", bucket=bucket,
                          key=version.key, error=str(e))
                raise IntegrityError(str(e)) from None
            actual = sha.hexdigest()
            if out.size != meta.file_size or actual != meta.file_sha256:
                self.references.evict(bucket, ds)
                log.error("Rebuilt {bucket}/{key} fails its checksum: expected {size} bytes "
                          "sha256 {expected}, got {actual_size} bytes sha256 {actual}",
                          bucket=bucket, key=version.key, size=meta.file_size,
                          expected=meta.file_sha256, actual_size=out.size, actual=actual)
                raise IntegrityError("checksum mismatch")
            self.stats.decoded(time.monotonic() - started)
            out.flush()
            return out
        except BaseException:
            out.release()
            raise
        finally:
            ref.release()

    # -- deletes ------------------------------------------------------------------
    async def delete(self, bucket: str, key: str) -> bool:
        """Delete both variants of C{key}; the last object out takes the reference."""
        okey = ObjectKey(key)
        a = await self.backend.delete(bucket, okey.passthrough_key)
        b = await self.backend.delete(bucket, okey.delta_key)
        if a or b:
            await self.locks.run((self.backend.name, bucket, okey.deltaspace),
                                 lambda: self._reclaim(bucket, okey.deltaspace))
        return a or b

    async def _reclaim(self, bucket: str, ds: str) -> None:
        prefix = f"{ds}/" if ds else ""
        objects, _ = await self.backend.list(bucket, prefix, "/")
        if any(user_key_of(o.key) is not None for o in objects):
            return
        if any(o.key == reference_key(ds) for o in objects):
            await self._drop_reference(bucket, ds)

    # -- listing -----------------------------------------------------------------
    async def list(self, bucket: str, prefix: str, delimiter: Optional[str],
                   after: Optional[str] = None, limit: Optional[int] = None):
        """(versions sorted by key, common prefixes) under C{prefix}.

        With C{limit}, the backend (S3 pages, filesystem metadata batches) stops once more than
        C{limit} entries after C{after} are complete, instead of listing the
        whole prefix for every page a client asks for; entries past that
        point are left out, so a page cut at C{limit} is whole and correct.
        (C{after} is only a hint: entries up to it may still be returned.)"""
        backend_delim = "/" if delimiter == "/" else None
        stop: list[str] = []  # the frontier, once the backend stopped early

        def more(objects: list[StoredObject], prefixes: list[str]) -> int:
            """How many more complete entries the page needs (0: it is certain)."""
            last = max(objects[-1].key if objects else "", prefixes[-1] if prefixes else "")
            if not last:
                return limit + 1
            bound = listing_frontier(last)
            entries = set()
            for obj in objects:
                key = user_key_of(obj.key)
                if key is not None and key.startswith(prefix) and key < bound:
                    entries.add(common_prefix_of(key, prefix, delimiter) or key)
            entries.update(p for p in prefixes if p < bound and not p.startswith(INTERNAL_PREFIX))
            if after is not None:
                entries = {e for e in entries if e > after}
            if len(entries) > limit:
                stop.append(bound)
                return 0
            return limit + 1 - len(entries)

        stored, prefixes = await self.backend.list(
            bucket, prefix, backend_delim, start_after=after,
            more=more if limit is not None else None)
        bound = stop[0] if stop else None
        latest: dict[str, ObjectVersion] = {}
        for obj in stored:
            user_key = user_key_of(obj.key)
            if user_key is None or not user_key.startswith(prefix):
                continue
            if bound is not None and user_key >= bound:
                continue
            meta = _effective(obj)
            seen = latest.get(user_key)
            if seen is None or meta.created_at > seen.metadata.created_at:
                latest[user_key] = ObjectVersion(user_key, obj, meta)
        versions = sorted(latest.values(), key=lambda v: v.key.encode("utf-8"))
        if bound is not None:
            prefixes = [p for p in prefixes if p < bound]
        return versions, [p for p in prefixes if not p.startswith(INTERNAL_PREFIX)]
