"""Request-body verifiers: L{IByteSource} wrappers that check what was signed.

The signature in the headers only covers the body by reference (its SHA-256,
or a chain of per-chunk signatures), so the body has to be checked while it
streams. Each wrapper raises at the latest before it returns the final C{b""},
so a consumer that stores a body only commits after a clean end. A signed
aws-chunked chunk is held until its signature checks, so no unverified byte
ever reaches the consumer; memory stays bounded by one chunk.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import zlib
from typing import Callable, Mapping, Optional, Sequence

from twisted.internet import defer
from zope.interface import implementer

from dgproxy.auth.sigv4 import (
    EMPTY_SHA256, STREAMING_SIGNED, STREAMING_SIGNED_TRAILER,
    STREAMING_UNSIGNED_TRAILER, UNSIGNED_PAYLOAD, AuthFailure, AuthResult,
    ChunkSigning, hmac_hex)
from dgproxy.s3.errors import (
    AccessDenied, BadDigest, IncompleteBody, InvalidArgument,
    XAmzContentSHA256Mismatch)
from dgproxy.streams import CHUNK, IByteSource

MAX_LINE = 4096                  # a chunk header or trailer line
MAX_TRAILERS = 16
MAX_SIGNED_CHUNK = 16 * 1024 * 1024  # SDKs use 64 KiB-1 MiB; bounds what we hold

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_SIZE = re.compile(rb"[0-9a-fA-F]{1,16}")
_SIG = re.compile(rb"[0-9a-f]{64}")


def _decode_error():
    return InvalidArgument("Failed to decode AWS chunked transfer encoding")


# -- trailing checksums -----------------------------------------------------

class _Crc:
    """A running CRC with the hashlib shape (update/digest)."""

    def __init__(self, fn: Callable[[bytes, int], int]):
        self._fn = fn
        self._value = 0

    def update(self, data: bytes) -> None:
        self._value = self._fn(data, self._value) & 0xFFFFFFFF

    def digest(self) -> bytes:
        return self._value.to_bytes(4, "big")


def _find_crc32c() -> Optional[Callable[[bytes, int], int]]:
    try:
        from awscrt import checksums  # type: ignore
        return checksums.crc32c
    except ImportError:
        pass
    try:
        import crc32c  # type: ignore
        return lambda data, prev: crc32c.crc32c(data, prev)
    except ImportError:
        pass
    try:
        import google_crc32c  # type: ignore
        return lambda data, prev: google_crc32c.extend(prev, data)
    except ImportError:
        return None


_CRC32C = _find_crc32c()

CHECKSUMS: dict[str, Callable[[], object]] = {
    "x-amz-checksum-crc32": lambda: _Crc(zlib.crc32),
    "x-amz-checksum-sha1": hashlib.sha1,
    "x-amz-checksum-sha256": hashlib.sha256,
}
if _CRC32C is not None:
    CHECKSUMS["x-amz-checksum-crc32c"] = lambda: _Crc(_CRC32C)


# -- single-shot SHA-256 ----------------------------------------------------

@implementer(IByteSource)
class _CheckedAtEnd:
    """Passes a body through, hashing it; at its end (before the final C{b""})
    L{_check} raises if the digest is not the one declared."""

    def __init__(self, source, hasher):
        self._source = source
        self._hash = hasher

    def read(self, size: int = CHUNK) -> defer.Deferred:
        return self._source.read(size).addCallback(self._seen)

    def _seen(self, data: bytes) -> bytes:
        if data:
            self._hash.update(data)
            return data
        self._check()
        return b""

    def _check(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._source.close()


class SignedPayloadSource(_CheckedAtEnd):
    """Checks the signed C{x-amz-content-sha256} of a body."""

    def __init__(self, source, expected_sha256_hex: str):
        super().__init__(source, hashlib.sha256())
        self._expected = expected_sha256_hex.lower().encode("ascii")

    def _check(self) -> None:
        actual = self._hash.hexdigest().encode("ascii")
        if not hmac.compare_digest(actual, self._expected):
            raise XAmzContentSHA256Mismatch()


# -- x-amz-checksum-* request headers ---------------------------------------

class HeaderChecksumSource(_CheckedAtEnd):
    """Checks an C{x-amz-checksum-*} header (SDKs send one with every
    PutObject/UploadPart)."""

    def __init__(self, source, name: str, expected_b64: str):
        super().__init__(source, CHECKSUMS[name]())
        self._name = name
        try:
            self._expected = base64.b64decode(expected_b64, validate=True)
        except ValueError:
            raise InvalidArgument(f"Value for {name} header is invalid.") from None

    def _check(self) -> None:
        if not hmac.compare_digest(self._hash.digest(), self._expected):
            raise BadDigest(f"The {self._name} you specified did not match the calculated checksum.")


def _with_header_checksums(source, headers: Mapping[str, list[str]]):
    for name in CHECKSUMS:
        value = _first(headers, name)
        if value is not None:
            source = HeaderChecksumSource(source, name, value)
    return source


# -- aws-chunked ------------------------------------------------------------

_HEADER, _DATA, _DONE = "header", "data", "done"


@implementer(IByteSource)
class AwsChunkedSource:
    """Decodes C{Content-Encoding: aws-chunked} as it streams.

    Wire format: C{<hex>[;chunk-signature=<sig>]\\r\\n<data>\\r\\n} ... then
    C{0[;chunk-signature=<sig>]\\r\\n}, optional trailer lines, C{\\r\\n}.
    With C{chunk_signing} every chunk's signature is checked (each chained on
    the previous one, starting at the header's) before its data is released;
    without it (C{STREAMING-UNSIGNED-PAYLOAD-TRAILER}) data streams straight
    through and the trailing checksum is what protects it.

    C{declared_trailers} (from C{x-amz-trailer}) limits which checksums are
    computed; None computes every supported one when C{trailer} is set.
    """

    max_chunk = MAX_SIGNED_CHUNK

    def __init__(self, source, decoded_length: int,
                 chunk_signing: Optional[ChunkSigning], trailer: bool,
                 declared_trailers: Optional[Sequence[str]] = None):
        self._source = source
        self._remaining = decoded_length
        self._signing = chunk_signing
        self._prev_sig = chunk_signing.seed_signature if chunk_signing else ""
        self._trailer = trailer
        self._declared = (None if declared_trailers is None
                          else [t.strip().lower() for t in declared_trailers])
        wanted = CHECKSUMS if self._declared is None else {
            n: f for n, f in CHECKSUMS.items() if n in self._declared}
        self._checksums = {n: f() for n, f in wanted.items()} if trailer else {}
        self._buf = bytearray()
        self._out = memoryview(b"")
        self._chunk_left = 0
        self._state = _HEADER
        self._error: Optional[BaseException] = None

    def read(self, size: int = CHUNK) -> defer.Deferred:
        return defer.ensureDeferred(self._read(size))

    def close(self) -> None:
        self._buf = bytearray()
        self._out = memoryview(b"")
        self._source.close()

    async def _read(self, size: int) -> bytes:
        while not self._out:
            if self._error is not None:
                raise self._error
            if self._state == _DONE:
                return b""
            try:
                await self._step()
            except Exception as e:
                self._error = e
                raise
        size = max(size, 1)
        data, self._out = self._out[:size], self._out[size:]
        return bytes(data)

    # raw input
    async def _fill(self) -> None:
        data = await self._source.read(CHUNK)
        if not data:
            raise IncompleteBody()
        self._buf += data

    async def _line(self) -> bytes:
        while True:
            end = self._buf.find(b"\r\n", 0, MAX_LINE + 2)
            if end >= 0:
                line = bytes(self._buf[:end])
                del self._buf[:end + 2]
                return line
            if len(self._buf) >= MAX_LINE + 2:
                raise _decode_error()
            await self._fill()

    async def _take(self, n: int) -> bytes:
        while len(self._buf) < n:
            await self._fill()
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def _emit(self, data: bytes) -> None:
        for h in self._checksums.values():
            h.update(data)
        self._out = memoryview(data)

    # frames
    async def _step(self) -> None:
        if self._state == _DATA:
            await self._stream_data()
            return
        size, sig = self._parse_header(await self._line())
        if size == 0:
            await self._finish(sig)
            return
        if size > self._remaining:
            raise _decode_error()
        self._remaining -= size
        if self._signing is None:
            self._chunk_left = size
            self._state = _DATA
            return
        if size > self.max_chunk:
            raise _decode_error()
        framed = await self._take(size + 2)
        if framed[-2:] != b"\r\n":
            raise _decode_error()
        data = framed[:-2]
        self._check_chunk(sig, data)
        self._emit(data)

    async def _stream_data(self) -> None:
        if self._chunk_left == 0:
            if await self._take(2) != b"\r\n":
                raise _decode_error()
            self._state = _HEADER
            return
        if not self._buf:
            await self._fill()
        n = min(len(self._buf), self._chunk_left)
        data = bytes(self._buf[:n])
        del self._buf[:n]
        self._chunk_left -= n
        self._emit(data)

    def _parse_header(self, line: bytes) -> tuple[int, bytes]:
        size_s, _, ext = line.partition(b";")
        if not _SIZE.fullmatch(size_s):
            raise _decode_error()
        if self._signing is None:
            return int(size_s, 16), b""  # extensions carry nothing we need
        name, eq, sig = ext.partition(b"=")
        if name != b"chunk-signature" or not eq:
            raise _decode_error()
        if not _SIG.fullmatch(sig):
            raise AuthFailure("invalid_signature", AccessDenied())
        return int(size_s, 16), sig

    def _check(self, given: bytes, string_to_sign: str) -> str:
        expected = hmac_hex(self._signing.signing_key, string_to_sign)
        if not hmac.compare_digest(expected.encode("ascii"), given):
            raise AuthFailure("invalid_signature", AccessDenied())
        self._prev_sig = expected
        return expected

    def _check_chunk(self, sig: bytes, data: bytes) -> None:
        s = self._signing
        self._check(sig, "\n".join([
            "AWS4-HMAC-SHA256-PAYLOAD", s.amz_date, s.scope, self._prev_sig,
            EMPTY_SHA256, hashlib.sha256(data).hexdigest()]))

    async def _finish(self, sig: bytes) -> None:
        if self._signing is not None:
            self._check_chunk(sig, b"")
        if self._remaining != 0:
            raise IncompleteBody()
        trailers = await self._read_trailers()
        if self._signing is not None and self._trailer:
            self._check_trailer_signature(trailers)
        self._check_checksums(trailers)
        if self._buf or await self._source.read(CHUNK):
            raise _decode_error()  # bytes after the end of the encoding
        self._state = _DONE

    async def _read_trailers(self) -> list[tuple[str, str]]:
        trailers = []
        while True:
            line = await self._line()
            if not line:
                return trailers
            if not self._trailer or len(trailers) >= MAX_TRAILERS:
                raise _decode_error()
            name, colon, value = line.decode("latin-1").partition(":")
            if not colon or not name.strip():
                raise _decode_error()
            trailers.append((name.strip().lower(), value.strip()))

    def _check_trailer_signature(self, trailers: list[tuple[str, str]]) -> None:
        if not trailers or trailers[-1][0] != "x-amz-trailer-signature":
            raise AuthFailure("invalid_signature", AccessDenied())
        sig = trailers.pop()[1].encode("latin-1")
        canonical = "".join(f"{n}:{v}\n" for n, v in trailers)
        s = self._signing
        self._check(sig, "\n".join([
            "AWS4-HMAC-SHA256-TRAILER", s.amz_date, s.scope, self._prev_sig,
            hashlib.sha256(canonical.encode("utf-8")).hexdigest()]))

    def _check_checksums(self, trailers: list[tuple[str, str]]) -> None:
        names = [n for n, _ in trailers]
        if any(n == "x-amz-trailer-signature" for n in names):
            raise _decode_error()  # only valid last, in a signed-trailer body
        for name in self._declared or ():
            if name.startswith("x-amz-checksum-") and name not in names:
                raise InvalidArgument(f"Trailer {name} declared in x-amz-trailer is missing")
        for name, value in trailers:
            if self._declared is not None and name not in self._declared:
                raise InvalidArgument(f"Trailer {name} was not declared in x-amz-trailer")
            h = self._checksums.get(name)
            if h is None:
                continue  # an algorithm we cannot compute (crc64nvme, ...)
            try:
                given = base64.b64decode(value, validate=True)
            except ValueError:
                given = b""
            if not hmac.compare_digest(given, h.digest()):
                raise BadDigest(f"The {name} you specified did not match the calculated checksum.")


# -- choosing a wrapper -----------------------------------------------------

def _first(headers: Mapping[str, list[str]], name: str) -> Optional[str]:
    values = headers.get(name)
    return values[0].strip() if values else None


def wrap_body(source, headers: Mapping[str, list[str]], auth: Optional[AuthResult]):
    """The verifier that C{x-amz-content-sha256} calls for, around C{source}."""
    value = _first(headers, "x-amz-content-sha256")
    if auth is not None and not auth.presigned:
        value = auth.payload_hash
    if value is None or value == UNSIGNED_PAYLOAD:
        return _with_header_checksums(source, headers)
    if _HEX64.fullmatch(value):
        return _with_header_checksums(SignedPayloadSource(source, value), headers)
    if not value.startswith("STREAMING-"):
        raise InvalidArgument("x-amz-content-sha256 must be UNSIGNED-PAYLOAD, "
                              "a STREAMING- value or a valid sha256 value")
    decoded = _first(headers, "x-amz-decoded-content-length")
    if decoded is None:
        raise InvalidArgument(
            "aws-chunked transfer encoding requires x-amz-decoded-content-length")
    if not decoded.isdigit() or len(decoded) > 18:
        raise InvalidArgument(f"Invalid x-amz-decoded-content-length: {decoded}")
    signing = None
    if value in (STREAMING_SIGNED, STREAMING_SIGNED_TRAILER):
        # Without auth (open access) the framing is decoded but not verified.
        signing = auth.chunk_signing if auth is not None else None
        if signing is None and auth is not None:
            raise InvalidArgument(f"{value} requires an Authorization header signature")
    elif value != STREAMING_UNSIGNED_TRAILER:
        raise InvalidArgument(f"Unsupported x-amz-content-sha256 value {value}")
    trailer = value != STREAMING_SIGNED
    declared = None
    if trailer and headers.get("x-amz-trailer"):
        declared = [t for v in headers["x-amz-trailer"] for t in v.split(",") if t.strip()]
    return AwsChunkedSource(source, int(decoded), signing, trailer, declared)
