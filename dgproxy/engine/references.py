"""Reference bytes for the codec: an in-memory LRU, and local files for xdelta3.

xdelta3 needs its source as a seekable file, so every codec run gets the
reference materialised in the spool, written from the cache on a hit or
streamed from the backend (and SHA-256 checked) on a miss. References larger
than a quarter of the cache are never held in memory.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

from twisted.logger import Logger

from dgproxy.engine.keys import reference_key
from dgproxy.engine.spool import Spool, SpoolFile
from dgproxy.storage.metadata import ObjectMetadata
from dgproxy.streams import CHUNK

log = Logger(namespace="dgproxy.cache")


class ReferenceCorrupt(Exception):
    """The stored reference does not match its own SHA-256."""


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0

    @property
    def miss_rate(self) -> float:
        total = self.hits + self.misses
        return self.misses / total if total else 0.0


class ReferenceCache:
    """LRU of reference bytes keyed by (backend, bucket, deltaspace), bounded in bytes."""

    def __init__(self, capacity_bytes: int):
        self.capacity = capacity_bytes
        self.size = 0
        self.stats = CacheStats()
        self._entries: OrderedDict[tuple, tuple[str, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def admits(self, size: int) -> bool:
        return size <= self.capacity // 4

    def get(self, key: tuple, sha256: str) -> Optional[bytes]:
        entry = self._entries.get(key)
        if entry is None or entry[0] != sha256:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return entry[1]

    def put(self, key: tuple, sha256: str, data: bytes) -> None:
        if not self.admits(len(data)):
            return
        self.evict(key)
        self._entries[key] = (sha256, data)
        self.size += len(data)
        while self.size > self.capacity and self._entries:
            _, (_, old) = self._entries.popitem(last=False)
            self.size -= len(old)

    def evict(self, key: tuple) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.size -= len(entry[1])


@dataclass
class ReferenceFile:
    """A verified local copy of a deltaspace's reference, for one codec run."""

    path: str
    metadata: ObjectMetadata
    spool: Optional[SpoolFile]

    def release(self) -> None:
        if self.spool is not None:
            self.spool.release()


class References:
    """Finds, verifies and materialises references of one backend."""

    def __init__(self, backend, cache: ReferenceCache, spool: Spool):
        self.backend = backend
        self.cache = cache
        self.spool = spool

    def _key(self, bucket: str, deltaspace: str) -> tuple:
        return (self.backend.name, bucket, deltaspace)

    def evict(self, bucket: str, deltaspace: str) -> None:
        self.cache.evict(self._key(bucket, deltaspace))

    def remember(self, bucket: str, deltaspace: str, sha256: str, data: bytes) -> None:
        self.cache.put(self._key(bucket, deltaspace), sha256, data)

    def _link_local(self, bucket: str, deltaspace: str, stored, meta) -> Optional[ReferenceFile]:
        """On a plaintext filesystem backend, hard-link reference.bin into the
        spool instead of copying it: a stable inode for xdelta3 at no cost
        (counted as a cache hit: the point of the cache is not to read the
        backend, and this does not).
        Not re-hashed here: a delta encoded against these bytes rebuilds
        against the same bytes, and every rebuild is checked by SHA-256."""
        local = getattr(self.backend, "local_file", None)
        path = local(bucket, reference_key(deltaspace)) if local else None
        if path is None:
            return None
        spool = self.spool.link(path, "ref")
        if spool is None:
            return None
        if spool.size != stored.size:  # replaced between stat and link
            spool.release()
            return None
        return ReferenceFile(spool.path, meta, spool)

    async def materialise(self, bucket: str, deltaspace: str) -> Optional[ReferenceFile]:
        """The reference as a local file, or None when the deltaspace has none."""
        stored = await self.backend.stat(bucket, reference_key(deltaspace))
        if stored is None:
            return None
        if stored.metadata is None:
            raise ReferenceCorrupt(f"{bucket}/{reference_key(deltaspace)} has no metadata")
        meta = stored.metadata
        linked = self._link_local(bucket, deltaspace, stored, meta)
        if linked is not None:
            self.cache.stats.hits += 1  # served without reading the backend
            return linked
        key = self._key(bucket, deltaspace)
        cached = self.cache.get(key, meta.file_sha256)
        spool = self.spool.create("ref")
        try:
            if cached is not None:
                spool.write(cached)
                spool.flush()
                return ReferenceFile(spool.path, meta, spool)
            source = await self.backend.open_read(bucket, reference_key(deltaspace))
            if source is None:
                spool.release()
                return None
            sha = hashlib.sha256()
            keep = [] if self.cache.admits(stored.size) else None
            try:
                while True:
                    chunk = await source.read(CHUNK)
                    if not chunk:
                        break
                    sha.update(chunk)
                    spool.write(chunk)
                    if keep is not None:
                        keep.append(chunk)
            finally:
                source.close()
            spool.flush()
            if meta.file_sha256 and sha.hexdigest() != meta.file_sha256:
                log.error("Reference {bucket}/{ds} fails its SHA-256 check (stored {stored}, "
                          "read {actual})", bucket=bucket, ds=deltaspace or "(root)",
                          stored=meta.file_sha256, actual=sha.hexdigest())
                raise ReferenceCorrupt(f"{bucket}/{reference_key(deltaspace)}")
            if keep is not None:
                self.cache.put(key, meta.file_sha256, b"".join(keep))
            return ReferenceFile(spool.path, meta, spool)
        except BaseException:
            spool.release()
            raise
