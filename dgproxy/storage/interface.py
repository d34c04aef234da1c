"""The seat every storage backend fills.

A backend stores opaque blobs under I{stored keys} (C{prefix/name},
C{prefix/name.delta}, C{prefix/reference.bin}) inside buckets, each with an
L{ObjectMetadata}. It knows nothing of deltas: the engine above decides what
to store; the backend only keeps it safe.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Optional

from zope.interface import Attribute, Interface

from dgproxy.storage.metadata import ObjectMetadata


_RANGE = re.compile(r"^\s*bytes\s*=\s*([0-9]*)\s*-\s*([0-9]*)\s*$")
_MAX_DIGITS = 19  # past this a number is "beyond any object" (and int() may refuse it)
_BEYOND = 2 ** 63


@dataclass(frozen=True)
class ByteRange:
    """One C{Range: bytes=…} before the object's size is known: C{first}-C{last}
    (C{last} None: to the end), or the last C{suffix} bytes. A backend can ask
    for it as it is, so a ranged read needs no lookup of the size first."""

    first: Optional[int] = None
    last: Optional[int] = None
    suffix: Optional[int] = None

    @classmethod
    def parse(cls, header: Optional[str]) -> Optional["ByteRange"]:
        """The range of a header, or None where S3 reads the whole object: no
        header, or one it does not understand (multiple ranges, bad syntax,
        last before first), which RFC 9110 says to ignore."""
        m = _RANGE.match(header or "")
        if not m or m.groups() == ("", ""):
            return None
        first, last = (None if not g else _BEYOND if len(g) > _MAX_DIGITS else int(g)
                       for g in m.groups())
        if first is None:
            return cls(suffix=last)
        if last is not None and last < first:
            return None
        return cls(first=first, last=last)

    def resolve(self, size: int) -> Optional[tuple[int, int]]:
        """(first, last) byte of an object of C{size} bytes; None when the range
        is unsatisfiable (S3's InvalidRange)."""
        if self.suffix is not None:
            if self.suffix == 0 or size == 0:
                return None
            return max(0, size - self.suffix), size - 1
        if self.first >= size:
            return None
        return self.first, size - 1 if self.last is None else min(self.last, size - 1)

    def header(self) -> str:
        if self.suffix is not None:
            return f"bytes=-{self.suffix}"
        return f"bytes={self.first}-{'' if self.last is None else self.last}"


class StorageError(Exception):
    """A backend failed in a way the client cannot fix (disk full, I/O error)."""


class BackendUnavailable(StorageError):
    """The backend cannot be reached (or keeps failing); its buckets answer 503."""

    def __init__(self, backend: str, detail: str):
        super().__init__(f"backend '{backend}' is unavailable: {detail}")
        self.backend = backend


class UpstreamError(StorageError):
    """An upstream S3 service answered with an error."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"upstream {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class BucketMissing(StorageError):
    """The bucket does not exist on the backend."""


class BucketNotEmptyError(StorageError):
    """DeleteBucket on a bucket that still holds objects."""


class AlreadyExists(StorageError):
    """An exclusive commit found the key already present."""


class NameTooLong(StorageError):
    """A key has a part longer than this backend can name (a filesystem's 255 bytes)."""


class KeyConflict(StorageError):
    """The key cannot be stored because part of its path is an object."""


@dataclass(frozen=True)
class StoredObject:
    """One blob on a backend: its stored key, stored size and metadata."""

    key: str
    size: int
    modified: datetime
    metadata: Optional[ObjectMetadata]
    etag: Optional[str] = None  # the backend's own ETag, when it has one


@dataclass(frozen=True)
class BucketInfo:
    name: str
    created: datetime


class IObjectWriter(Interface):
    """A blob being written; invisible until L{commit}."""

    hashes_needed = Attribute(
        "Whether L{commit} needs the body's MD5 and SHA-256 in its metadata. A writer "
        "that sent the metadata ahead of the body (a streamed S3 PUT) does not.")

    def write(data: bytes):
        """Append data; the returned Deferred fires when more may be written."""

    def commit(metadata: ObjectMetadata, exclusive: bool = False):
        """Make the blob and its metadata visible atomically and durably;
        with C{exclusive}, fail with L{AlreadyExists} instead of replacing.
        Fires with the backend's own digest of the blob (an S3 ETag) when the
        backend made one, else None."""

    def abort():
        """Throw the partial blob away. Safe after commit (does nothing)."""


class IBackend(Interface):
    """Blob storage for one backend (filesystem or S3).

    Two capabilities are optional, looked up with C{getattr} and passed down
    by the routing and encrypting layers: C{local_file(bucket, key)}, the
    path of a blob stored as plaintext on this machine (or None), and
    C{can_assemble(bucket)} / C{assemble(bucket, key, sources, metadata)},
    which makes C{key} the concatenation of stored blobs where they are."""

    name = Attribute("The backend's configured name.")

    def list_buckets():
        """Deferred list of L{BucketInfo}, sorted by name."""

    def bucket_exists(bucket: str):
        """Deferred bool."""

    def create_bucket(bucket: str):
        """Deferred bool: True if created, False if it already existed."""

    def delete_bucket(bucket: str):
        """Deferred; fails with L{BucketNotEmptyError} or L{BucketMissing}."""

    def stat(bucket: str, key: str):
        """Deferred L{StoredObject} or None."""

    def open_read(bucket: str, key: str, offset: int = 0, length: Optional[int] = None,
                  stored: Optional[StoredObject] = None):
        """Deferred L{IByteSource} over the stored bytes, or None if absent.
        C{stored}, when the caller has just looked the blob up, saves a lookup."""

    def open_with_stat(bucket: str, key: str, byte_range: Optional[ByteRange] = None):
        """Deferred (L{StoredObject}, L{IByteSource}) or None: metadata and
        content together (one request on S3). The source is the whole blob, or
        with C{byte_range} the bytes it resolves to against the blob's size
        (its plaintext size where the blob is encrypted), or None when it
        does not resolve."""

    def discard(bucket: str, key: str):
        """Deferred: delete if present, without reporting whether it was."""

    def open_write(bucket: str, key: str, size: Optional[int] = None,
                   hint: Optional[ObjectMetadata] = None):
        """Deferred L{IObjectWriter}; fails with L{BucketMissing}/L{KeyConflict}.
        C{size} and C{hint} (the metadata minus the hashes) are known up front
        for some writes; a backend may use them to stream rather than spool."""

    def delete(bucket: str, key: str):
        """Deferred bool: whether something was deleted."""

    def list(bucket: str, prefix: str, delimiter: Optional[str],
             start_after: Optional[str] = None, more=None):
        """Deferred (objects, prefixes): stored objects whose key starts with
        C{prefix} (sorted by key) and, with delimiter '/', the sub-prefixes.

        Both keywords are hints: a backend may skip keys up to C{start_after},
        and after each page (S3) or batch (filesystem) it asks
        C{more(objects, prefixes)} (all listed so far) how many more entries
        are wanted: it stops at 0, and may size its next page by the answer.
        A backend may also ignore them and return everything."""


async def open_span(backend, bucket: str, key: str, stored: StoredObject,
                    byte_range: Optional[ByteRange], size: int):
    """(C{stored}, a source over what C{byte_range} resolves to against
    C{size}: the whole blob without one, None when it does not resolve),
    or None if the blob went away: L{IBackend.open_with_stat} for a blob
    already looked up."""
    offset, length = 0, None
    if byte_range is not None:
        span = byte_range.resolve(size)
        if span is None:
            return stored, None
        offset, length = span[0], span[1] - span[0] + 1
    source = await backend.open_read(bucket, key, offset, length, stored)
    return None if source is None else (stored, source)
