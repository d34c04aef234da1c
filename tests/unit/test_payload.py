"""Body verifiers: signed SHA-256 and the aws-chunked decoder.

Chunked bodies are built here from the format description (not with the code
under test), and real botocore requests are decoded end to end.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import socket
import threading
import zlib
from unittest import mock
from urllib.parse import urlsplit

import boto3
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from hypothesis import given, settings, strategies as st
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from dgproxy.auth import payload as payload_mod
from dgproxy.auth.payload import AwsChunkedSource, SignedPayloadSource, wrap_body
from dgproxy.auth.sigv4 import (
    AuthFailure, AuthResult, ChunkSigning, SignedRequest, signing_key, verify)
from dgproxy.s3.errors import S3Error
from dgproxy.streams import BytesSource, IByteSource

from twisted.internet import defer

AK, SK = "AKIDEXAMPLE", "secret/key+with=odd chars"
T0 = dt.datetime(2026, 3, 14, 15, 9, 26, tzinfo=dt.timezone.utc)
EMPTY = hashlib.sha256(b"").hexdigest()
SIGNING = ChunkSigning(signing_key(SK, "20260314", "us-east-1"), "20260314T150926Z",
                       "20260314/us-east-1/s3/aws4_request", "ab" * 32)


@implementer(IByteSource)
class PieceSource:
    """Serves C{data} in pieces of at most C{piece} bytes, like a socket."""

    def __init__(self, data: bytes, piece: int = 1 << 30):
        self._data = data
        self._piece = piece
        self._pos = 0
        self.closed = False

    def read(self, size=256 * 1024):
        n = min(size, self._piece)
        chunk = self._data[self._pos:self._pos + n]
        self._pos += len(chunk)
        return defer.succeed(chunk)

    def close(self):
        self.closed = True


def drain(source, read_size=256 * 1024):
    """Read to the end synchronously: (bytes released, exception or None)."""
    out = []
    while True:
        box = []
        source.read(read_size).addBoth(box.append)
        assert box, "read did not fire synchronously"
        result = box[0]
        if isinstance(result, Failure):
            return b"".join(out), result.value
        if not result:
            return b"".join(out), None
        assert 0 < len(result) <= read_size
        out.append(result)


def chunk_signature(signing: ChunkSigning, prev: str, data: bytes) -> str:
    sts = "\n".join(["AWS4-HMAC-SHA256-PAYLOAD", signing.amz_date, signing.scope, prev,
                     EMPTY, hashlib.sha256(data).hexdigest()])
    return hmac.new(signing.signing_key, sts.encode(), hashlib.sha256).hexdigest()


def trailer_signature(signing: ChunkSigning, prev: str, trailers) -> str:
    canonical = "".join(f"{n}:{v}\n" for n, v in trailers).encode()
    sts = "\n".join(["AWS4-HMAC-SHA256-TRAILER", signing.amz_date, signing.scope, prev,
                     hashlib.sha256(canonical).hexdigest()])
    return hmac.new(signing.signing_key, sts.encode(), hashlib.sha256).hexdigest()


def frames(chunks, signing=None, trailers=None, sign_trailer=False):
    """The aws-chunked frames for C{chunks}, one bytes object per chunk,
    the last holding the final chunk, trailers and closing CRLF."""
    out = []
    prev = signing.seed_signature if signing else None
    for data in list(chunks) + [b""]:
        if signing:
            prev = chunk_signature(signing, prev, data)
            frame = b"%x;chunk-signature=%s\r\n" % (len(data), prev.encode())
        else:
            frame = b"%x\r\n" % len(data)
        if data:
            frame += data + b"\r\n"
        out.append(frame)
    for name, value in trailers or ():
        out[-1] += f"{name}:{value}\r\n".encode()
    if sign_trailer:
        sig = trailer_signature(signing, prev, trailers or ())
        out[-1] += b"x-amz-trailer-signature:%s\r\n" % sig.encode()
    out[-1] += b"\r\n"
    return out


def encode(chunks, signing=None, trailers=None, sign_trailer=False) -> bytes:
    return b"".join(frames(chunks, signing, trailers, sign_trailer))


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def crc32_b64(data: bytes) -> str:
    return b64(zlib.crc32(data).to_bytes(4, "big"))


def split(data: bytes, size: int):
    return [data[i:i + size] for i in range(0, len(data), size)]


DATA = bytes(range(256)) * 3 + b"tail"   # 772 bytes
CHUNKS = split(DATA, 200)               # 4 chunks: 200, 200, 200, 172


class Assertions:
    def assertS3(self, error, code, status=400):
        self.assertIsInstance(error, S3Error, repr(error))
        self.assertEqual((error.code, error.status), (code, status))

    def assertDecodeError(self, error):
        self.assertS3(error, "InvalidArgument")
        self.assertEqual(error.message, "Failed to decode AWS chunked transfer encoding")

    def assertBadSignature(self, error):
        self.assertIsInstance(error, AuthFailure, repr(error))
        self.assertEqual(error.reason, "invalid_signature")
        self.assertEqual(error.error.code, "AccessDenied")


class SignedPayloadSourceTests(Assertions, unittest.TestCase):

    def test_matching_body_every_read_size(self):
        digest = hashlib.sha256(DATA).hexdigest()
        for size in [1, 2, 7, 100, len(DATA), 1 << 20]:
            for expected in (digest, digest.upper()):
                data, err = drain(SignedPayloadSource(PieceSource(DATA, 13), expected), size)
                self.assertIsNone(err)
                self.assertEqual(data, DATA)

    def test_mismatch_fails_at_the_end(self):
        data, err = drain(SignedPayloadSource(BytesSource(DATA), EMPTY), 100)
        self.assertEqual(data, DATA)
        self.assertS3(err, "XAmzContentSHA256Mismatch")

    def test_empty_body(self):
        self.assertEqual(drain(SignedPayloadSource(BytesSource(b""), EMPTY)), (b"", None))

    def test_close_closes_inner(self):
        inner = PieceSource(DATA)
        SignedPayloadSource(inner, EMPTY).close()
        self.assertTrue(inner.closed)


class AwsChunkedSignedTests(Assertions, unittest.TestCase):

    def decode(self, body, length=len(DATA), piece=1 << 30, read=256 * 1024,
               signing=SIGNING, trailer=False, declared=None):
        src = AwsChunkedSource(PieceSource(body, piece), length, signing, trailer, declared)
        return drain(src, read)

    def test_every_read_and_piece_size(self):
        body = encode(CHUNKS, SIGNING)
        for read in list(range(1, 40)) + [199, 200, 201, len(DATA), 1 << 20]:
            for piece in [1, 2, 3, 7, 64, 201, 1 << 20]:
                data, err = self.decode(body, piece=piece, read=read)
                self.assertIsNone(err, (read, piece))
                self.assertEqual(data, DATA)

    def test_empty_object(self):
        self.assertEqual(self.decode(encode([], SIGNING), length=0), (b"", None))

    def test_aws_documentation_example(self):
        """The worked STREAMING-AWS4-HMAC-SHA256-PAYLOAD example of the S3 docs."""
        secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
        headers = {
            "host": ["s3.amazonaws.com"], "x-amz-date": ["20130524T000000Z"],
            "x-amz-storage-class": ["REDUCED_REDUNDANCY"],
            "x-amz-content-sha256": ["STREAMING-AWS4-HMAC-SHA256-PAYLOAD"],
            "content-encoding": ["aws-chunked"], "x-amz-decoded-content-length": ["66560"],
            "content-length": ["66824"],
            "authorization": [
                "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/"
                "aws4_request,SignedHeaders=content-encoding;content-length;host;"
                "x-amz-content-sha256;x-amz-date;x-amz-decoded-content-length;"
                "x-amz-storage-class,Signature="
                "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9"]}
        req = SignedRequest("PUT", b"/examplebucket/chunkObject.txt", b"", headers)
        auth = verify(req, lambda a: secret,
                      dt.datetime(2013, 5, 24, tzinfo=dt.timezone.utc), 300)
        sigs = ["ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648",
                "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497",
                "b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9"]
        body = (b"10000;chunk-signature=" + sigs[0].encode() + b"\r\n" + b"a" * 65536 + b"\r\n"
                + b"400;chunk-signature=" + sigs[1].encode() + b"\r\n" + b"a" * 1024 + b"\r\n"
                + b"0;chunk-signature=" + sigs[2].encode() + b"\r\n\r\n")
        self.assertEqual(len(body), 66824)
        self.assertEqual(body, encode([b"a" * 65536, b"a" * 1024], auth.chunk_signing))
        data, err = drain(wrap_body(BytesSource(body), headers, auth), 4096)
        self.assertIsNone(err)
        self.assertEqual(data, b"a" * 66560)

    def test_botocore_signed_header_then_chunks(self):
        req = AWSRequest(method="PUT", url="http://s3.local/b/k", headers={
            "X-Amz-Content-SHA256": "STREAMING-AWS4-HMAC-SHA256-PAYLOAD",
            "Content-Encoding": "aws-chunked",
            "X-Amz-Decoded-Content-Length": str(len(DATA))})
        with mock.patch("botocore.auth.get_current_datetime", return_value=T0):
            SigV4Auth(Credentials(AK, SK), "s3", "eu-west-1").add_auth(req)
        headers = {k.lower(): [v] for k, v in req.headers.items()}
        headers["host"] = ["s3.local"]
        auth = verify(SignedRequest("PUT", b"/b/k", b"", headers), {AK: SK}.get, T0, 300)
        body = encode(CHUNKS, auth.chunk_signing)
        self.assertEqual(drain(wrap_body(PieceSource(body, 9), headers, auth), 50), (DATA, None))
        other = AuthResult(AK, auth.payload_hash, False,
                           ChunkSigning(signing_key("wrong", "20260314", "eu-west-1"),
                                        auth.chunk_signing.amz_date, auth.chunk_signing.scope,
                                        auth.chunk_signing.seed_signature))
        self.assertBadSignature(drain(wrap_body(BytesSource(body), headers, other))[1])

    def test_bad_signature_releases_only_verified_chunks(self):
        parts = frames(CHUNKS, SIGNING)
        sig_at = parts[1].index(b"=") + 1
        bad = parts[1][:sig_at] + (b"0" if parts[1][sig_at:sig_at + 1] != b"0" else b"1") \
            + parts[1][sig_at + 1:]
        body = b"".join([parts[0], bad] + parts[2:])
        for read in [1, 7, 1000]:
            for piece in [1, 13, 1 << 20]:
                data, err = self.decode(body, read=read, piece=piece)
                self.assertBadSignature(err)
                self.assertEqual(data, CHUNKS[0])

    def test_bad_final_signature(self):
        parts = frames(CHUNKS, SIGNING)
        parts[-1] = b"0;chunk-signature=" + b"f" * 64 + b"\r\n\r\n"
        data, err = self.decode(b"".join(parts))
        self.assertBadSignature(err)
        self.assertEqual(data, DATA)  # every data chunk was genuine

    def test_wrong_seed(self):
        other = ChunkSigning(SIGNING.signing_key, SIGNING.amz_date, SIGNING.scope, "cd" * 32)
        data, err = self.decode(encode(CHUNKS, other))
        self.assertBadSignature(err)
        self.assertEqual(data, b"")

    def test_reordered_and_dropped_chunks(self):
        p = frames(CHUNKS, SIGNING)
        for order in ([p[1], p[0], p[2], p[3], p[4]], [p[0], p[2], p[1], p[3], p[4]],
                      [p[0], p[1], p[2], p[4]], [p[0], p[1], p[2], p[3], p[3], p[4]]):
            data, err = self.decode(b"".join(order), length=len(DATA) + 1000)
            self.assertBadSignature(err)

    def test_signature_case_and_shape(self):
        p = frames(CHUNKS, SIGNING)
        upper = p[0].split(b"\r\n", 1)
        p0 = upper[0].upper().replace(b"CHUNK-SIGNATURE", b"chunk-signature") + b"\r\n" + upper[1]
        self.assertBadSignature(self.decode(b"".join([p0] + p[1:]))[1])
        short = p[0].replace(b"\r\n", b"\r\n", 1)
        short = short[:short.index(b"\r\n") - 1] + short[short.index(b"\r\n"):]
        self.assertBadSignature(self.decode(b"".join([short] + p[1:]))[1])

    def test_missing_chunk_signature(self):
        p = frames(CHUNKS, SIGNING)
        unsigned = b"c8\r\n" + CHUNKS[0] + b"\r\n"
        self.assertDecodeError(self.decode(b"".join([unsigned] + p[1:]))[1])
        other_ext = p[0].replace(b"chunk-signature=", b"chunk-signatur=")
        self.assertDecodeError(self.decode(b"".join([other_ext] + p[1:]))[1])

    def test_truncated_everywhere(self):
        body = encode(CHUNKS, SIGNING)
        for cut in range(len(body)):
            data, err = self.decode(body[:cut], piece=97)
            self.assertS3(err, "IncompleteBody")
            self.assertTrue(DATA.startswith(data))

    def test_decoded_length_mismatch(self):
        body = encode(CHUNKS, SIGNING)
        self.assertS3(self.decode(body, length=len(DATA) + 1)[1], "IncompleteBody")
        self.assertDecodeError(self.decode(body, length=len(DATA) - 1)[1])
        self.assertDecodeError(self.decode(body, length=0)[1])

    def test_oversize_header_line(self):
        line = b"c8;chunk-signature=" + b"a" * 64 + b";" + b"x" * 5000 + b"\r\n"
        self.assertDecodeError(self.decode(line + CHUNKS[0] + b"\r\n", piece=100)[1])
        self.assertDecodeError(self.decode(b"c" * 5000, piece=1 << 20)[1])
        self.assertDecodeError(self.decode(b"1" * 4097 + b"\r\n", piece=1 << 20)[1])

    def test_chunk_larger_than_cap(self):
        src = AwsChunkedSource(BytesSource(encode(CHUNKS, SIGNING)), len(DATA), SIGNING, False)
        src.max_chunk = 199
        self.assertDecodeError(drain(src)[1])

    def test_bad_framing(self):
        p = frames(CHUNKS, SIGNING)
        no_crlf = p[0][:-2] + b"XX"
        for body in [b"".join([no_crlf] + p[1:]),
                     b"".join(p) + b"extra",
                     b"".join(p)[:-2] + b"x-amz-checksum-crc32:AAAAAA==\r\n\r\n",
                     b"zz;chunk-signature=" + b"a" * 64 + b"\r\n",
                     b"0x" + p[0], b" " + p[0], b"-1;chunk-signature=" + b"a" * 64 + b"\r\n",
                     b"1_0" + p[0][2:]]:
            with self.subTest(body=body[:40]):
                self.assertDecodeError(self.decode(body)[1])

    def test_errors_are_sticky(self):
        src = AwsChunkedSource(BytesSource(b"zz\r\n"), 5, SIGNING, False)
        first = drain(src)[1]
        self.assertIs(drain(src)[1], first)

    def test_close(self):
        inner = PieceSource(encode(CHUNKS, SIGNING))
        AwsChunkedSource(inner, len(DATA), SIGNING, False).close()
        self.assertTrue(inner.closed)

    # signed trailer variant
    def test_signed_trailer(self):
        trailers = [("x-amz-checksum-crc32", crc32_b64(DATA))]
        body = encode(CHUNKS, SIGNING, trailers, sign_trailer=True)
        for read in [1, 3, 1000]:
            self.assertEqual(self.decode(body, trailer=True, read=read, piece=5), (DATA, None))
        tampered = body.replace(crc32_b64(DATA).encode(), crc32_b64(b"x").encode())
        self.assertBadSignature(self.decode(tampered, trailer=True)[1])
        unsigned_trailer = encode(CHUNKS, SIGNING, trailers)
        self.assertBadSignature(self.decode(unsigned_trailer, trailer=True)[1])

    def test_signed_trailer_bad_checksum(self):
        trailers = [("x-amz-checksum-crc32", crc32_b64(b"other"))]
        body = encode(CHUNKS, SIGNING, trailers, sign_trailer=True)
        self.assertS3(self.decode(body, trailer=True)[1], "BadDigest")


class AwsChunkedUnsignedTests(Assertions, unittest.TestCase):
    """STREAMING-UNSIGNED-PAYLOAD-TRAILER: what modern SDKs send over TLS."""

    def decode(self, body, length=len(DATA), piece=1 << 30, read=256 * 1024, declared=None):
        src = AwsChunkedSource(PieceSource(body, piece), length, None, True, declared)
        return drain(src, read)

    def test_every_read_and_piece_size(self):
        body = encode(CHUNKS, trailers=[("x-amz-checksum-crc32", crc32_b64(DATA))])
        for read in list(range(1, 40)) + [len(DATA), 1 << 20]:
            for piece in [1, 2, 5, 64, 1 << 20]:
                self.assertEqual(self.decode(body, piece=piece, read=read), (DATA, None))

    def test_checksums(self):
        good = {"x-amz-checksum-crc32": crc32_b64(DATA),
                "x-amz-checksum-sha1": b64(hashlib.sha1(DATA).digest()),
                "x-amz-checksum-sha256": b64(hashlib.sha256(DATA).digest()),
                "x-amz-checksum-crc64nvme": "AAAAAAAAAAA="}  # not computable: skipped
        for name, value in good.items():
            with self.subTest(name=name):
                self.assertEqual(self.decode(encode(CHUNKS, trailers=[(name, value)])),
                                 (DATA, None))
                self.assertEqual(self.decode(encode(CHUNKS, trailers=[(name, value)]),
                                             declared=[name]), (DATA, None))
        for name in ["x-amz-checksum-crc32", "x-amz-checksum-sha1", "x-amz-checksum-sha256"]:
            for value in [crc32_b64(b"nope"), b64(hashlib.sha256(b"x").digest()), "!!bad!!", ""]:
                with self.subTest(name=name, value=value):
                    data, err = self.decode(encode(CHUNKS, trailers=[(name, value)]))
                    self.assertS3(err, "BadDigest")
                    self.assertEqual(data, DATA)

    def test_crc32c_when_available(self):
        if "x-amz-checksum-crc32c" not in payload_mod.CHECKSUMS:
            body = encode(CHUNKS, trailers=[("x-amz-checksum-crc32c", "AAAAAA==")])
            self.assertEqual(self.decode(body), (DATA, None))  # skipped, not refused
            return
        fn = payload_mod._CRC32C
        good = b64((fn(DATA, 0) & 0xFFFFFFFF).to_bytes(4, "big"))
        self.assertEqual(self.decode(encode(CHUNKS, trailers=[("x-amz-checksum-crc32c", good)])),
                         (DATA, None))
        self.assertS3(self.decode(encode(CHUNKS, trailers=[("x-amz-checksum-crc32c",
                                                            "AAAAAA==")]))[1], "BadDigest")

    def test_no_trailer_and_extensions(self):
        self.assertEqual(self.decode(encode(CHUNKS)), (DATA, None))
        ext = b"".join(b"%x;foo=bar\r\n%s\r\n" % (len(c), c) for c in CHUNKS) + b"0\r\n\r\n"
        self.assertEqual(self.decode(ext), (DATA, None))

    def test_declared_trailers(self):
        body = encode(CHUNKS, trailers=[("x-amz-checksum-crc32", crc32_b64(DATA))])
        self.assertS3(self.decode(body, declared=["x-amz-checksum-sha256"])[1], "InvalidArgument")
        self.assertS3(self.decode(encode(CHUNKS), declared=["x-amz-checksum-crc32"])[1],
                      "InvalidArgument")

    def test_trailer_limits(self):
        many = [(f"x-foo-{i}", "v") for i in range(17)]
        self.assertDecodeError(self.decode(encode(CHUNKS, trailers=many))[1])
        self.assertDecodeError(self.decode(encode(CHUNKS, trailers=[("x-a", "v" * 5000)]))[1])
        body = encode(CHUNKS)[:-2] + b"no-colon\r\n\r\n"
        self.assertDecodeError(self.decode(body)[1])
        body = encode(CHUNKS)[:-2] + b"x-amz-trailer-signature:" + b"a" * 64 + b"\r\n\r\n"
        self.assertDecodeError(self.decode(body)[1])

    def test_truncated_everywhere(self):
        body = encode(CHUNKS, trailers=[("x-amz-checksum-crc32", crc32_b64(DATA))])
        for cut in range(len(body)):
            data, err = self.decode(body[:cut], piece=31, read=17)
            self.assertS3(err, "IncompleteBody")
            self.assertTrue(DATA.startswith(data))

    def test_decoded_length_mismatch(self):
        body = encode(CHUNKS)
        self.assertS3(self.decode(body, length=len(DATA) + 5)[1], "IncompleteBody")
        self.assertDecodeError(self.decode(body, length=len(DATA) - 5)[1])

    def test_oversize_header_line(self):
        self.assertDecodeError(self.decode(b"c8;" + b"x" * 5000 + b"\r\n", piece=64)[1])


class WrapBodyTests(Assertions, unittest.TestCase):

    def auth(self, payload_hash, signing=None, presigned=False):
        return AuthResult(AK, payload_hash, presigned, signing)

    def test_selection(self):
        src = BytesSource(DATA)
        self.assertIs(wrap_body(src, {}, None), src)
        self.assertIs(wrap_body(src, {"x-amz-content-sha256": ["UNSIGNED-PAYLOAD"]},
                                self.auth("UNSIGNED-PAYLOAD")), src)
        digest = hashlib.sha256(DATA).hexdigest()
        wrapped = wrap_body(BytesSource(DATA), {"x-amz-content-sha256": [digest]},
                            self.auth(digest))
        self.assertIsInstance(wrapped, SignedPayloadSource)
        self.assertEqual(drain(wrapped), (DATA, None))
        bad = wrap_body(BytesSource(DATA), {"x-amz-content-sha256": [EMPTY]}, self.auth(EMPTY))
        self.assertS3(drain(bad)[1], "XAmzContentSHA256Mismatch")

    def test_presigned_uses_unsigned_header_claims(self):
        src = BytesSource(DATA)
        self.assertIs(wrap_body(src, {}, self.auth("UNSIGNED-PAYLOAD", presigned=True)), src)
        wrapped = wrap_body(BytesSource(DATA), {"x-amz-content-sha256": [EMPTY]},
                            self.auth("UNSIGNED-PAYLOAD", presigned=True))
        self.assertS3(drain(wrapped)[1], "XAmzContentSHA256Mismatch")

    def test_streaming(self):
        headers = {"x-amz-content-sha256": ["STREAMING-UNSIGNED-PAYLOAD-TRAILER"],
                   "x-amz-decoded-content-length": [str(len(DATA))],
                   "x-amz-trailer": ["x-amz-checksum-crc32"]}
        body = encode(CHUNKS, trailers=[("x-amz-checksum-crc32", crc32_b64(DATA))])
        wrapped = wrap_body(BytesSource(body), headers, self.auth(headers["x-amz-content-sha256"][0]))
        self.assertIsInstance(wrapped, AwsChunkedSource)
        self.assertEqual(drain(wrapped, 10), (DATA, None))
        headers["x-amz-content-sha256"] = ["STREAMING-AWS4-HMAC-SHA256-PAYLOAD"]
        wrapped = wrap_body(BytesSource(encode(CHUNKS, SIGNING)), headers,
                            self.auth("STREAMING-AWS4-HMAC-SHA256-PAYLOAD", SIGNING))
        self.assertEqual(drain(wrapped, 10), (DATA, None))

    def test_streaming_errors(self):
        base = {"x-amz-decoded-content-length": ["5"]}
        with self.assertRaises(S3Error) as cm:
            wrap_body(BytesSource(b""),
                      {"x-amz-content-sha256": ["STREAMING-UNSIGNED-PAYLOAD-TRAILER"]}, None)
        self.assertEqual(cm.exception.code, "InvalidArgument")
        self.assertEqual(cm.exception.message,
                         "aws-chunked transfer encoding requires x-amz-decoded-content-length")
        for value, auth in [("STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER",
                             self.auth("UNSIGNED-PAYLOAD", presigned=True)),
                            ("STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD", None),
                            ("STREAMING-NONSENSE", None), ("garbage", None)]:
            with self.subTest(value=value):
                with self.assertRaises(S3Error) as cm:
                    wrap_body(BytesSource(b""), {**base, "x-amz-content-sha256": [value]}, auth)
                self.assertEqual(cm.exception.code, "InvalidArgument")
        with self.assertRaises(S3Error):
            wrap_body(BytesSource(b""), {"x-amz-content-sha256": [
                "STREAMING-UNSIGNED-PAYLOAD-TRAILER"], "x-amz-decoded-content-length": ["-1"]},
                None)


# -- hypothesis -------------------------------------------------------------

_data = st.binary(max_size=3000)
_sizes = st.integers(min_value=1, max_value=700)


class PropertyTests(Assertions, unittest.TestCase):

    @settings(max_examples=150, deadline=None)
    @given(data=_data, chunk=_sizes, piece=_sizes, read=_sizes, signed=st.booleans())
    def test_roundtrip(self, data, chunk, piece, read, signed):
        signing = SIGNING if signed else None
        trailers = [("x-amz-checksum-sha256", b64(hashlib.sha256(data).digest()))]
        body = encode(split(data, chunk), signing, trailers if not signed else None)
        src = AwsChunkedSource(PieceSource(body, piece), len(data), signing, not signed)
        self.assertEqual(drain(src, read), (data, None))

    @settings(max_examples=150, deadline=None)
    @given(data=st.binary(min_size=1, max_size=2000), sizes=st.lists(_sizes, min_size=1),
           piece=_sizes, read=_sizes)
    def test_uneven_chunks(self, data, sizes, piece, read):
        chunks, pos, i = [], 0, 0
        while pos < len(data):
            chunks.append(data[pos:pos + sizes[i % len(sizes)]])
            pos += sizes[i % len(sizes)]
            i += 1
        body = encode(chunks, SIGNING)
        src = AwsChunkedSource(PieceSource(body, piece), len(data), SIGNING, False)
        self.assertEqual(drain(src, read), (data, None))

    @settings(max_examples=300, deadline=None)
    @given(data=st.binary(min_size=1, max_size=600), chunk=_sizes, where=st.integers(0),
           xor=st.integers(1, 255), signed=st.booleans())
    def test_corruption_never_ends_cleanly(self, data, chunk, where, xor, signed):
        """Any one corrupted byte is refused (or decodes to the same data)."""
        signing = SIGNING if signed else None
        trailers = None if signed else [("x-amz-checksum-crc32", crc32_b64(data))]
        body = bytearray(encode(split(data, chunk), signing, trailers))
        body[where % len(body)] ^= xor
        src = AwsChunkedSource(BytesSource(bytes(body)), len(data), signing, not signed)
        out, err = drain(src, 97)
        if err is None:
            self.assertEqual(out, data)
        else:
            self.assertIsInstance(err, (S3Error, AuthFailure))


# -- real botocore ----------------------------------------------------------

class OneShotHTTPServer(threading.Thread):
    """Accepts one HTTP/1.1 request, records it raw, answers 200."""

    def __init__(self):
        super().__init__(daemon=True)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        self.head = b""
        self.body = b""

    def run(self):
        conn, _ = self.sock.accept()
        with conn:
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += conn.recv(65536)
            self.head, buf = buf.split(b"\r\n\r\n", 1)
            headers = self.headers()
            if headers.get("expect", "").lower() == "100-continue":
                conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            length = int(headers.get("content-length", "0"))
            while len(buf) < length:
                buf += conn.recv(65536)
            self.body = buf
            conn.sendall(b'HTTP/1.1 200 OK\r\nETag: "x"\r\nContent-Length: 0\r\n'
                         b"Connection: close\r\n\r\n")
        self.sock.close()

    def headers(self) -> dict:
        out = {}
        for line in self.head.split(b"\r\n")[1:]:
            name, _, value = line.decode("latin-1").partition(":")
            out[name.strip().lower()] = value.strip()
        return out

    def signed_request(self) -> SignedRequest:
        method, target, _ = self.head.split(b"\r\n")[0].split(b" ")
        path, _, query = target.partition(b"?")
        return SignedRequest(method.decode(), path, query,
                             {k: [v] for k, v in self.headers().items()})


def _client(endpoint):
    session = boto3.session.Session(aws_access_key_id=AK, aws_secret_access_key=SK,
                                    region_name="us-east-1")
    return session.client("s3", endpoint_url=endpoint,
                          config=Config(s3={"addressing_style": "path"},
                                        retries={"max_attempts": 1}))


class BotocoreWireTests(Assertions, unittest.TestCase):

    def _put_over_http(self, operation, **params):
        server = OneShotHTTPServer()
        server.start()
        getattr(_client(f"http://127.0.0.1:{server.port}"), operation)(**params)
        server.join(10)
        return server

    def test_put_object_over_http(self):
        """botocore over http: signed hex payload hash, checksum in a header."""
        body = DATA * 50
        server = self._put_over_http("put_object", Bucket="bkt", Key="dir/ü key+%.bin",
                                     Body=body)
        req = server.signed_request()
        self.assertEqual(req.raw_path, b"/bkt/dir/%C3%BC%20key%2B%25.bin")
        h = req.headers
        self.assertEqual(h["x-amz-content-sha256"], [hashlib.sha256(body).hexdigest()])
        self.assertEqual(h["x-amz-checksum-crc32"], [crc32_b64(body)])
        self.assertNotIn("content-encoding", h)
        self.assertNotIn("x-amz-trailer", h)
        auth = verify(req, {AK: SK}.get, dt.datetime.now(dt.timezone.utc), 300)
        wrapped = wrap_body(PieceSource(server.body, 1000), h, auth)
        self.assertEqual(drain(wrapped, 4096), (body, None))
        wrong_crc = dict(h, **{"x-amz-checksum-crc32": [crc32_b64(body + b"x")]})
        self.assertS3(drain(wrap_body(BytesSource(server.body), wrong_crc, auth))[1],
                      "BadDigest")
        tampered = server.body[:-1] + b"!"
        self.assertS3(drain(wrap_body(BytesSource(tampered), h, auth))[1],
                      "XAmzContentSHA256Mismatch")

    def test_upload_part_over_http(self):
        server = self._put_over_http("upload_part", Bucket="bkt", Key="k", UploadId="a+b/c=",
                                     PartNumber=2, Body=b"part data")
        req = server.signed_request()
        auth = verify(req, {AK: SK}.get, dt.datetime.now(dt.timezone.utc), 300)
        self.assertEqual(drain(wrap_body(BytesSource(server.body), req.headers, auth)),
                         (b"part data", None))

    def test_put_object_over_https_shape(self):
        """botocore over https: STREAMING-UNSIGNED-PAYLOAD-TRAILER + crc32 trailer."""
        client = _client("https://s3.example.com")
        seen = {}

        def capture(request, **_):
            seen["request"] = request
            raise RuntimeError("captured")

        client.meta.events.register("before-send.s3", capture)
        body = DATA * 3000  # > 2 MiB: several 1 MiB aws-chunks
        with self.assertRaises(RuntimeError):
            client.put_object(Bucket="bkt", Key="k", Body=body)
        prepared = seen["request"]
        headers = {k.lower(): [v.decode() if isinstance(v, bytes) else v]
                   for k, v in prepared.headers.items()}
        headers["host"] = [urlsplit(prepared.url).netloc]
        self.assertEqual(headers["x-amz-content-sha256"], ["STREAMING-UNSIGNED-PAYLOAD-TRAILER"])
        self.assertEqual(headers["content-encoding"], ["aws-chunked"])
        self.assertEqual(headers["x-amz-trailer"], ["x-amz-checksum-crc32"])
        self.assertEqual(headers["x-amz-decoded-content-length"], [str(len(body))])
        wire = prepared.body.read()
        req = SignedRequest("PUT", urlsplit(prepared.url).path.encode(), b"", headers)
        auth = verify(req, {AK: SK}.get, dt.datetime.now(dt.timezone.utc), 300)
        self.assertEqual(auth.payload_hash, "STREAMING-UNSIGNED-PAYLOAD-TRAILER")
        wrapped = wrap_body(PieceSource(wire, 65536), headers, auth)
        self.assertIsInstance(wrapped, AwsChunkedSource)
        self.assertEqual(drain(wrapped), (body, None))
        bad = wire.replace(b"x-amz-checksum-crc32:", b"x-amz-checksum-crc32:A")
        self.assertS3(drain(wrap_body(BytesSource(bad), headers, auth))[1], "BadDigest")
