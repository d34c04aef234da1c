"""The metadata of stored blobs, kept for listings of S3 backends (SPEC §3 ⚑).

An S3 listing gives each blob's stored size and ETag. The size and ETag a
client must see for a delta (and, on an encrypted backend, for every blob)
are in the blob's metadata, which costs a HEAD. Kept here by backend,
bucket, key and upstream ETag, a repeated listing costs none. A blob that is
written again gets a new upstream ETag, so an entry is never wrong, only
unused.

The entries' size is estimated, not measured. Once it passes the budget
(C{DGP_METADATA_CACHE_MB}), entries chosen at random make room. Not the least
recently used: listings walk the same keys in the same order again and
again, and with more keys than fit, dropping the least recently used would
drop each key just before the next walk needs it (no walk would find any),
where random choice leaves each walk a share in proportion to the budget.
Random choice also clears out, in time, the entries of blobs since written
again. One cache serves every S3 backend of the process.
"""

from __future__ import annotations

import random
from typing import Optional

from dgproxy.storage.metadata import ObjectMetadata

DEFAULT_MB = 50
# Bytes an entry takes besides the text it holds: the key tuple, the metadata
# object and its fields, the dict slot. With these, an entry for a delta holds
# 986 bytes of objects (sys.getsizeof, each object once) and is estimated at
# 985; with eight client metadata pairs, 2,110 and 2,157.
ENTRY_OVERHEAD = 650
ITEM_OVERHEAD = 130  # per client metadata pair: two str objects and a dict slot

Place = tuple[str, str, str, str]  # backend, bucket, key, upstream ETag


def entry_size(place: Place, meta: ObjectMetadata) -> int:
    """The estimated bytes one entry holds."""
    text = place + (meta.tool, meta.original_name, meta.file_sha256, meta.md5,
                    meta.content_type, meta.multipart_etag, meta.source_name, meta.ref_path,
                    meta.ref_sha256, meta.delta_cmd)
    return (ENTRY_OVERHEAD + sum(len(t) for t in text if t)
            + sum(len(k) + len(v) + ITEM_OVERHEAD for k, v in meta.user_metadata.items()))


class MetadataCache:
    """Blob metadata within a byte budget (0: keep none), random entries
    making room."""

    def __init__(self, budget_bytes: int = DEFAULT_MB * 1024 * 1024,
                 choose: Optional[random.Random] = None):
        self.budget = budget_bytes
        self.size = 0
        self._choose = choose or random.Random()
        self._entries: dict[Place, tuple[ObjectMetadata, int, int]] = {}  # meta, size, slot
        self._slots: list[Place] = []  # every place once, for a choice in O(1)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, place: Place) -> Optional[ObjectMetadata]:
        entry = self._entries.get(place)
        return None if entry is None else entry[0]

    def put(self, place: Place, meta: ObjectMetadata) -> None:
        size = entry_size(place, meta)
        if size > self.budget:
            return
        old = self._entries.get(place)
        if old is None:
            self._entries[place] = (meta, size, len(self._slots))
            self._slots.append(place)
        else:
            self._entries[place] = (meta, size, old[2])
            self.size -= old[1]
        self.size += size
        while self.size > self.budget:  # never the entry just put: it fits alone
            slot = self._choose.randrange(len(self._slots))
            if self._slots[slot] == place:
                slot = (slot + 1) % len(self._slots)
            self._drop(slot)

    def _drop(self, slot: int) -> None:
        """Forget the entry in C{slot}; the last slot's entry moves into it."""
        place = self._slots[slot]
        last = self._slots.pop()
        if last != place:
            self._slots[slot] = last
            meta, size, _ = self._entries[last]
            self._entries[last] = (meta, size, slot)
        self.size -= self._entries.pop(place)[1]
