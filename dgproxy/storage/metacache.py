"""The metadata of stored blobs, kept for listings of S3 backends (SPEC §3 ⚑).

An S3 listing gives each blob's stored size and ETag. The size and ETag a
client must see for a delta (and, on an encrypted backend, for every blob)
are in the blob's metadata, which costs a HEAD. Kept here by backend,
bucket, key and upstream ETag, a repeated listing costs none. A blob that is written again
gets a new upstream ETag, so an entry is never wrong, only unused.

The entries' size is estimated, not measured. Once it passes the budget
(C{DGP_METADATA_CACHE_MB}), the least recently used entries are dropped.
One cache serves every S3 backend of the process.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

from dgproxy.storage.metadata import ObjectMetadata

DEFAULT_MB = 50
# Bytes an entry takes besides the text it holds: the key tuple, the metadata
# object and its fields, the dict slot. With these, tracemalloc counted 1,040
# bytes for a delta's entry estimated at 1,000, and 2,340 for one with eight
# client metadata pairs estimated at 2,400.
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
    """Least-recently-used blob metadata within a byte budget (0: keep none)."""

    def __init__(self, budget_bytes: int = DEFAULT_MB * 1024 * 1024):
        self.budget = budget_bytes
        self.size = 0
        self._entries: OrderedDict[Place, tuple[ObjectMetadata, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, place: Place) -> Optional[ObjectMetadata]:
        entry = self._entries.get(place)
        if entry is None:
            return None
        self._entries.move_to_end(place)
        return entry[0]

    def put(self, place: Place, meta: ObjectMetadata) -> None:
        size = entry_size(place, meta)
        if size > self.budget:
            return
        old = self._entries.pop(place, None)
        if old is not None:
            self.size -= old[1]
        self._entries[place] = (meta, size)
        self.size += size
        while self.size > self.budget:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.size -= dropped
