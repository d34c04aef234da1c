"""Encryption at rest: a transform between the engine and any backend.

Writes become the DGE1 chunked AES-256-GCM format (fact sheet encryption
§A2): C{"DGE1"}, a random 12-byte base IV, then frames of C{u32le length ||
ciphertext || tag}, 64 KiB of plaintext each; chunk i's nonce is the base IV
with its last four bytes XOR-ed with i (big-endian), and its AAD binds the
index and whether it is the final chunk, so frames cannot be reordered,
dropped or cut off. Reads also take the Rust proxy's single-shot format
(C{IV || ciphertext+tag}). The object's metadata (never encrypted) carries
the markers C{dg-encrypted} and C{dg-encryption-key-id}; the metadata's
plaintext size tells which chunk is final. The wrapper stays in the stack
even when a backend does not encrypt, so it can refuse to serve ciphertext
as plaintext and read through the legacy-key shim.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from typing import Optional

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from dgproxy.storage.interface import IBackend, IObjectWriter, StorageError, open_span
from dgproxy.storage.metadata import DELTA, ObjectMetadata
from dgproxy.streams import CHUNK, SOCKET_CHUNK

log = Logger(namespace="dgproxy.encryption")

MAGIC = b"DGE1"
HEADER_LEN = 16
CHUNK_PLAIN = 65536
TAG_LEN = 16
FRAME_WIRE = 4 + CHUNK_PLAIN + TAG_LEN
MAX_FRAME = CHUNK_PLAIN + TAG_LEN + 1024
CHUNKED = "aes-256-gcm-chunked-v1"
SINGLE = "aes-256-gcm-v1"
MARKER = "dg-encrypted"
KEY_ID = "dg-encryption-key-id"
NATIVE = "dg-encrypted-native"
SINGLE_SHOT_LIMIT = 1024**3

NO_KEY = "object is encrypted but no key is configured"
STRIPPED = ("object body begins with chunked-encryption magic but metadata has no dg-encrypted "
            "marker — xattrs may have been stripped during backup/restore. Refusing to serve "
            "ciphertext as plaintext.")


class EncryptionError(StorageError):
    """An encrypted object cannot be read (the detail goes to the log, not the client)."""


def derive_key_id(backend_name: str, key: bytes) -> str:
    """16 hex chars: SHA-256(name || 0x00 || key)[:8], as the Rust proxy derives it."""
    return hashlib.sha256(backend_name.encode() + b"\0" + key).hexdigest()[:16]


def parse_key(hex_key: str, what: str) -> bytes:
    try:
        key = bytes.fromhex(hex_key.strip())
    except ValueError as e:
        raise ValueError(f"{what}: invalid hex key: {e}") from None
    if len(key) != 32:
        raise ValueError(f"{what}: key must be 32 bytes (64 hex chars), got {len(key)}")
    return key


@dataclass(frozen=True)
class KeyRing:
    """The keys of one backend: the primary (for writes) and an optional legacy shim."""

    backend: str
    key: Optional[bytes] = None
    key_id: Optional[str] = None
    legacy_key: Optional[bytes] = None
    legacy_key_id: Optional[str] = None

    @property
    def encrypts(self) -> bool:
        return self.key is not None

    def for_object(self, stamp: Optional[str]) -> bytes:
        """The key that decrypts an object stamped with C{stamp} (fact sheet §A3)."""
        if stamp is None or stamp == self.key_id:
            if self.key is None:
                raise EncryptionError(NO_KEY)
            return self.key
        if stamp == self.legacy_key_id and self.legacy_key is not None:
            return self.legacy_key
        if self.key is None and self.key_id is None:
            raise EncryptionError(
                f"object was encrypted with key id '{stamp}', but this backend has NO encryption "
                "key configured. The object can't be decrypted until the key is restored. Set "
                "`encryption.key` in YAML or the DGP_*_ENCRYPTION_KEY env var on this backend. "
                "If the object shouldn't be here (e.g. bucket routed to the wrong backend), fix "
                "routing instead.")
        raise EncryptionError(
            f"object was encrypted with key id '{stamp}', but this backend is configured with key "
            f"id '{self.key_id or '<unset>'}' (no legacy-shim match either). This usually means: "
            "(a) the key was rotated without `legacy_key` set — restore the old key alongside the "
            "new one to read historical objects; (b) this bucket is routed to the wrong backend; "
            "(c) two backends share physical storage with different keys. Refusing to run AEAD — "
            "the underlying auth failure would be opaque.")


def _nonce(base_iv: bytes, index: int) -> bytes:
    tail = struct.unpack(">I", base_iv[8:12])[0] ^ index
    return base_iv[:8] + struct.pack(">I", tail)


def _aad(index: int, final: bool) -> bytes:
    return MAGIC + struct.pack("<I", index) + (b"\x01" if final else b"\x00") + b"\0" * 7


def final_index(plain_size: int) -> int:
    return max(0, (plain_size - 1) // CHUNK_PLAIN)


def wire_size(plain_size: int) -> int:
    frames = final_index(plain_size) + 1
    return HEADER_LEN + plain_size + frames * (4 + TAG_LEN)


class ChunkEncryptor:
    """Frames plaintext into DGE1, one window behind so only the last frame is final."""

    def __init__(self, key: bytes, base_iv: Optional[bytes] = None):
        self._aead = AESGCM(key)
        self._iv = base_iv or os.urandom(12)
        self._index = 0
        self._window = bytearray()
        self._started = False

    def update(self, data: bytes) -> bytes:
        out = []
        if not self._started:
            self._started = True
            out.append(MAGIC + self._iv)
        self._window += data
        while len(self._window) > CHUNK_PLAIN:  # more follows: this chunk is not final
            out.append(self._frame(bytes(self._window[:CHUNK_PLAIN]), False))
            del self._window[:CHUNK_PLAIN]
        return b"".join(out)

    def finish(self) -> bytes:
        head = b"" if self._started else MAGIC + self._iv
        self._started = True
        return head + self._frame(bytes(self._window), True)

    def _frame(self, plain: bytes, final: bool) -> bytes:
        if self._index >= 2**32:
            raise EncryptionError("chunk index overflow (object too large)")
        ct = self._aead.encrypt(_nonce(self._iv, self._index), plain, _aad(self._index, final))
        self._index += 1
        return struct.pack("<I", len(ct)) + ct


class ChunkDecryptor:
    """Parses DGE1 frames (from chunk C{first} on) and yields verified plaintext."""

    def __init__(self, key: bytes, plain_size: int, first: int = 0,
                 base_iv: Optional[bytes] = None):
        self._aead = AESGCM(key)
        self._final = final_index(plain_size)
        self._index = first
        self._iv = base_iv
        self._buf = bytearray()
        self._done = False

    def update(self, data: bytes) -> bytes:
        self._buf += data
        out = []
        if self._iv is None:
            if len(self._buf) < HEADER_LEN:
                return b""
            if bytes(self._buf[:4]) != MAGIC:
                raise EncryptionError(f"bad chunked-encryption magic: {bytes(self._buf[:4]).hex()}")
            self._iv = bytes(self._buf[4:HEADER_LEN])
            del self._buf[:HEADER_LEN]
        while not self._done and len(self._buf) >= 4:
            length = struct.unpack("<I", self._buf[:4])[0]
            if length > MAX_FRAME:
                raise EncryptionError(f"frame length {length} exceeds ceiling {MAX_FRAME} — "
                                      "rejecting (possible DOS)")
            if length < TAG_LEN:
                raise EncryptionError(f"chunk {self._index} ciphertext too short: {length} bytes")
            if len(self._buf) < 4 + length:
                break
            ct = bytes(self._buf[4:4 + length])
            del self._buf[:4 + length]
            final = self._index == self._final
            try:
                out.append(self._aead.decrypt(_nonce(self._iv, self._index), ct,
                                              _aad(self._index, final)))
            except InvalidTag:
                raise EncryptionError(f"chunk {self._index} decryption failed (wrong key, "
                                      "tampered, or reordered)") from None
            self._index += 1
            if final:
                self._done = True
        return b"".join(out)

    def finish(self) -> None:
        if self._iv is None:
            raise EncryptionError("stream ended before encryption header")
        if not self._done:
            if self._buf:
                raise EncryptionError("stream truncated mid-frame-body")
            raise EncryptionError(f"stream truncated before chunk {self._index} "
                                  f"(expected final index {self._final})")
        if self._buf:
            log.warn("Ignoring {n} trailing bytes after final frame", n=len(self._buf))


def decrypt_single(key: bytes, blob: bytes) -> bytes:
    if len(blob) < 12 + TAG_LEN:
        raise EncryptionError(f"blob too short: {len(blob)} bytes")
    try:
        return AESGCM(key).decrypt(blob[:12], blob[12:], None)
    except InvalidTag:
        raise EncryptionError("decryption failed (wrong key or tampered data)") from None


class _DecryptingSource:
    """Plaintext bytes C{skip}..C{skip+length} of a decrypted frame stream."""

    def __init__(self, source, decryptor: ChunkDecryptor, skip: int, length: Optional[int]):
        self._source = source
        self._dec = decryptor
        self._skip = skip
        self._left = length
        self._pending = b""
        self._ended = False

    async def _read(self, size: int) -> bytes:
        while not self._pending and not self._ended:
            data = await self._source.read(CHUNK)
            if data:
                self._pending = self._dec.update(data)
            else:
                self._dec.finish()
                self._ended = True
            if self._skip and self._pending:
                cut = min(self._skip, len(self._pending))
                self._pending = self._pending[cut:]
                self._skip -= cut
        if self._left is not None and len(self._pending) > self._left:
            self._pending = self._pending[:self._left]
        out, self._pending = self._pending[:size], self._pending[size:]
        if self._left is not None:
            self._left -= len(out)
            if self._left == 0:
                self._ended = True
                self._pending = b""
        return out

    def read(self, size: int = CHUNK):
        return defer.ensureDeferred(self._read(size))

    def close(self) -> None:
        self._source.close()


class _PrefixedSource:
    """A source whose first chunk was already read (to look at it). That
    chunk is as large as the source had at hand, so it is handed on whole to
    a reader that takes as much, and read from an offset (not re-sliced) by
    one that reads less."""

    def __init__(self, first: bytes, source):
        self._first = first
        self._at = 0
        self._source = source

    def read(self, size: int = CHUNK):
        first, at = self._first, self._at
        if at < len(first):
            out = first if at == 0 and size >= len(first) else first[at:at + size]
            self._at = at + len(out)
            return defer.succeed(out)
        return self._source.read(size)

    def relay_stream(self):
        """The inner source's stream for L{pump_to_request}, with what is
        left of the first chunk to write before it; None if it has none."""
        take = getattr(self._source, "relay_stream", None)
        found = take() if take is not None else None
        if found is None:
            return None
        rest = self._first[self._at:] if self._at else self._first
        self._at = len(self._first)
        return rest + found[0], found[1]

    def close(self) -> None:
        self._first = b""
        self._source.close()


async def _peek(source) -> bytes:
    """The source's first chunk, as large as it comes (no cutting and copying),
    and at least long enough to hold the magic unless the blob is shorter."""
    first = await source.read(SOCKET_CHUNK)
    while first and len(first) < len(MAGIC):
        more = await source.read(SOCKET_CHUNK)
        if not more:
            break
        first += more
    return first


def blob_size(meta: ObjectMetadata) -> int:
    """Plaintext size of the stored blob: a delta's own size, not its original's."""
    if meta.note == DELTA and meta.delta_size is not None:
        return meta.delta_size
    return meta.file_size


def strip_markers(meta: ObjectMetadata) -> ObjectMetadata:
    user = {k: v for k, v in meta.user_metadata.items() if k not in (MARKER, KEY_ID, NATIVE)}
    return meta.with_changes(user_metadata=user)


@implementer(IObjectWriter)
class _EncryptingWriter:
    hashes_needed = True  # the plaintext's digests go into the metadata

    def __init__(self, inner, keys: KeyRing):
        self._inner = inner
        self._keys = keys
        self._enc = ChunkEncryptor(keys.key)

    def write(self, data: bytes):
        out = self._enc.update(data)
        return self._inner.write(out) if out else defer.succeed(None)

    async def commit(self, metadata: ObjectMetadata, exclusive: bool = False) -> None:
        await self._inner.write(self._enc.finish())
        user = dict(strip_markers(metadata).user_metadata)
        user[MARKER] = CHUNKED
        user[KEY_ID] = self._keys.key_id
        await self._inner.commit(metadata.with_changes(user_metadata=user), exclusive=exclusive)

    def abort(self) -> None:
        self._inner.abort()


@implementer(IObjectWriter)
class _PlainWriter:
    """Unencrypted writes still drop any stale encryption markers."""

    def __init__(self, inner):
        self._inner = inner
        self.hashes_needed = inner.hashes_needed

    def write(self, data: bytes):
        return self._inner.write(data)

    def commit(self, metadata: ObjectMetadata, exclusive: bool = False):
        return self._inner.commit(strip_markers(metadata), exclusive=exclusive)

    def abort(self) -> None:
        self._inner.abort()


@implementer(IBackend)
class EncryptingBackend:
    """Wraps one backend; plaintext above, ciphertext below."""

    def __init__(self, inner, keys: KeyRing):
        self.inner = inner
        self.keys = keys
        self.name = inner.name
        # A ranged read of an unmarked blob costs one more (4-byte) read to
        # look for lost markers: worth it where keys exist or reads are local.
        self._sniff_ranges = (keys.key is not None or keys.legacy_key is not None
                              or hasattr(inner, "local_file"))

    # Buckets and listings pass straight through.
    def list_buckets(self):
        return self.inner.list_buckets()

    def bucket_exists(self, bucket):
        return self.inner.bucket_exists(bucket)

    def create_bucket(self, bucket):
        return self.inner.create_bucket(bucket)

    def delete_bucket(self, bucket):
        return self.inner.delete_bucket(bucket)

    def stat(self, bucket, key):
        return self.inner.stat(bucket, key)

    def local_file(self, bucket, key):
        """The plaintext file, when the stored bytes are plaintext (no key here)."""
        if self.keys.key is not None or self.keys.legacy_key is not None:
            return None
        local = getattr(self.inner, "local_file", None)
        return local(bucket, key) if local else None

    def can_assemble(self, bucket) -> bool:
        """Blobs can be joined where they are only when no key is configured:
        each encrypted blob is a stream of its own, and with a legacy key an
        upload's parts may be ciphertext."""
        if self.keys.key is not None or self.keys.legacy_key is not None:
            return False
        can = getattr(self.inner, "can_assemble", None)
        return bool(can and can(bucket))

    def assemble(self, bucket, key, sources, meta):
        return self.inner.assemble(bucket, key, sources, strip_markers(meta))

    def delete(self, bucket, key):
        return self.inner.delete(bucket, key)

    def discard(self, bucket, key):
        return self.inner.discard(bucket, key)

    def list(self, bucket, prefix, delimiter, **hints):
        return self.inner.list(bucket, prefix, delimiter, **hints)

    async def open_write(self, bucket: str, key: str, size: Optional[int] = None, hint=None):
        if self.keys.encrypts:  # ciphertext: the inner backend spools it
            return _EncryptingWriter(await self.inner.open_write(bucket, key), self.keys)
        if hint is not None:
            hint = strip_markers(hint)
        return _PlainWriter(await self.inner.open_write(bucket, key, size=size, hint=hint))

    async def open_with_stat(self, bucket: str, key: str, byte_range=None):
        """The blob (or C{byte_range} of it) and its metadata from one read of
        the inner backend, decrypted (or checked for lost markers) like
        L{open_read}. A range of an encrypted blob is a range of its plaintext:
        that takes the general path."""
        got = await self.inner.open_with_stat(bucket, key, byte_range)
        if got is None:
            return None
        stored, raw = got
        meta = stored.metadata
        marker = meta.user_metadata.get(MARKER) if meta is not None else None
        try:
            if byte_range is not None:
                if marker is None and raw is None:
                    return stored, None  # the range does not resolve
                from_start = marker is None and byte_range.resolve(stored.size)[0] == 0
                if marker is None and not from_start and not self._sniff_ranges:
                    return stored, raw  # stored as it is: nothing to decrypt or sniff
                if not from_start:
                    # A range of the plaintext, or a sniff for a lost marker
                    # (it needs the first bytes): the general path.
                    if raw is not None:
                        raw.close()
                        raw = None
                    return await open_span(self, bucket, key, stored, byte_range,
                                           stored.size if marker is None else blob_size(meta))
                # From byte 0: checked for a lost marker below, as a whole read is.
            if marker is None:
                first = await _peek(raw)
                if first[:4] == MAGIC:
                    raise EncryptionError(STRIPPED)
                return stored, _PrefixedSource(first, raw)
            if marker != CHUNKED:  # single-shot or unknown: the general path
                raw.close()
                source = await self.open_read(bucket, key, stored=stored)
                return None if source is None else (stored, source)
            key_bytes = self.keys.for_object(meta.user_metadata.get(KEY_ID))
            size = blob_size(meta)
            return stored, _DecryptingSource(raw, ChunkDecryptor(key_bytes, size), 0, size)
        except BaseException:
            if raw is not None:
                raw.close()
            raise

    async def _unmarked(self, bucket: str, key: str, offset: int, length: Optional[int]):
        """A blob without markers is served as it is, unless it starts with the
        DGE1 magic (its metadata was lost): checked before any byte is served,
        so the client gets a clean 500, never ciphertext."""
        if offset == 0:
            source = await self.inner.open_read(bucket, key, 0, length)
            if source is None:
                return None
            first = await _peek(source)
            if first[:4] == MAGIC:
                source.close()
                raise EncryptionError(STRIPPED)
            return _PrefixedSource(first, source)
        if self._sniff_ranges:
            head = await self.inner.open_read(bucket, key, 0, 4)
            if head is None:
                return None
            from dgproxy.streams import read_all
            if await read_all(head, 4) == MAGIC:
                raise EncryptionError(STRIPPED)
        return await self.inner.open_read(bucket, key, offset, length)

    async def open_read(self, bucket: str, key: str, offset: int = 0,
                        length: Optional[int] = None, stored=None):
        if stored is None:
            stored = await self.inner.stat(bucket, key)
        if stored is None:
            return None
        meta = stored.metadata
        marker = meta.user_metadata.get(MARKER) if meta is not None else None
        if marker is None:
            return await self._unmarked(bucket, key, offset, length)
        key_bytes = self.keys.for_object(meta.user_metadata.get(KEY_ID))
        size = blob_size(meta)
        if length is None:
            length = max(0, size - offset)
        if marker == SINGLE:
            source = await self.inner.open_read(bucket, key)
            if source is None:
                return None
            from dgproxy.streams import BytesSource, read_all
            plain = decrypt_single(key_bytes, await read_all(source, SINGLE_SHOT_LIMIT))
            return BytesSource(plain[offset:offset + length])
        if marker != CHUNKED:
            raise EncryptionError(f"unknown encryption marker {marker!r}")
        if offset == 0:
            source = await self.inner.open_read(bucket, key)
            if source is None:
                return None
            return _DecryptingSource(source, ChunkDecryptor(key_bytes, size), 0, length)
        # A range: read the header, then only the frames the range needs.
        first = offset // CHUNK_PLAIN
        header_src = await self.inner.open_read(bucket, key, 0, HEADER_LEN)
        if header_src is None:
            return None
        from dgproxy.streams import read_all
        header = await read_all(header_src, HEADER_LEN)
        if len(header) < HEADER_LEN:
            raise EncryptionError(f"stream ended before encryption header (got {len(header)} "
                                  f"of {HEADER_LEN} bytes)")
        if header[:4] != MAGIC:
            raise EncryptionError(f"bad chunked-encryption magic: {header[:4].hex()}")
        last = min(offset + length - 1, size - 1) // CHUNK_PLAIN if length else first
        wire_start = HEADER_LEN + first * FRAME_WIRE
        wire_len = None if last >= final_index(size) else (last - first + 1) * FRAME_WIRE
        source = await self.inner.open_read(bucket, key, wire_start, wire_len)
        if source is None:
            return None
        dec = ChunkDecryptor(key_bytes, size, first=first, base_iv=header[4:HEADER_LEN])
        return _DecryptingSource(_StopAfter(source, dec, last), dec,
                                 offset - first * CHUNK_PLAIN, length)


class _StopAfter:
    """A ranged body that ends after chunk C{last}: tells the decryptor the
    frames it was not sent are intentionally absent."""

    def __init__(self, source, decryptor: ChunkDecryptor, last: int):
        self._source = source
        self._dec = decryptor
        self._last = last

    def read(self, size: int = CHUNK):
        d = self._source.read(size)

        def ended(data):
            if not data and self._dec._index > self._last:
                self._dec._done = True
            return data

        return d.addCallback(ended)

    def close(self) -> None:
        self._source.close()
