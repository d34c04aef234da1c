"""End-to-end tests of the delta engine against a real C{twistd -n dgproxy}.

What is checked is what a client and an operator can see: bytes, sizes and
ETags through boto3 and the aws CLI, and the on-disk layout and xattr
metadata shared with the Rust proxy (SPEC §3, §4; reference/anchor-storage.md).

One server for most of the module (declared buckets with their own delta
policies), one with a 1 MB reference cache for the corruption tests (so a
reference is read, and checked, from disk on every GET), and one started on a
data directory written by hand in the Rust proxy's format.
"""

from __future__ import annotations

import atexit
import gzip
import hashlib
import http.client
import json
import os
import random
import re
import subprocess
import tempfile
import threading
import time
from typing import Optional

import twisted
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from twisted.trial import unittest

from tests.e2e.artifacts import make_tar
from tests.e2e.harness import LiveProxyCase, ACCESS_KEY, SECRET_KEY, ProxyProcess

XATTR = "user.dg.metadata"
EMPTY_MD5 = "d41d8cd98f00b204e9800998ecf8427e"
XDELTA3 = "/usr/bin/xdelta3"

CONFIG = """\
storage:
  buckets:
    nocomp:
      compression: false
    ratio-low:
      max_delta_ratio: 0.3
    ratio-high:
      max_delta_ratio: 0.95
    ratio-zero:
      max_delta_ratio: 0.0
"""

_proxies: dict[str, ProxyProcess] = {}


def _shared(name: str, **kwargs) -> ProxyProcess:
    proxy = _proxies.get(name)
    if proxy is None:
        proxy = _proxies[name] = ProxyProcess(**kwargs).start()
        atexit.register(proxy.cleanup)
    return proxy


def md5_etag(data: bytes) -> str:
    return '"%s"' % hashlib.md5(data).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_xattr(path: str) -> dict:
    raw = os.getxattr(path, XATTR)
    return json.loads(raw)


# -- artifacts ---------------------------------------------------------------------------
_TWISTED = os.path.dirname(twisted.__file__)
_TREE_CACHE: Optional[dict[str, bytes]] = None


def source_tree() -> dict[str, bytes]:
    """A real directory tree: the .py files of a few installed twisted packages (~4 MB)."""
    global _TREE_CACHE
    if _TREE_CACHE is None:
        files = {}
        for sub in ("internet", "python", "web"):
            root = os.path.join(_TWISTED, sub)
            for dirpath, dirs, names in os.walk(root):
                dirs[:] = sorted(d for d in dirs if d != "__pycache__")
                for name in sorted(names):
                    if name.endswith(".py"):
                        path = os.path.join(dirpath, name)
                        with open(path, "rb") as f:
                            files[os.path.relpath(path, _TWISTED)] = f.read()
        _TREE_CACHE = files
    return dict(_TREE_CACHE)




def tar_versions(n: int = 5) -> list[bytes]:
    """Successive 'releases' of one tree, each a small change of the one before."""
    files = source_tree()
    names = sorted(files)
    rng = random.Random(1234)
    versions = []
    for v in range(n):
        if v:
            for name in rng.sample(names, 3):  # edit a few files
                files[name] = files[name] + f"\n# patched for release {v}\n".encode()
            victim = names[rng.randrange(len(names))]  # change a line in the middle
            body = files[victim]
            mid = len(body) // 2
            files[victim] = body[:mid] + f"# release {v} fix\n".encode() + body[mid:]
            files[f"CHANGELOG-{v}.txt"] = f"release {v}\n".encode() * 40  # add a file
            gone = names.pop(rng.randrange(len(names)))  # remove a file
            files.pop(gone, None)
        versions.append(make_tar(files, root="twisted-release"))
    return versions


_TARS: Optional[list[bytes]] = None


def tars() -> list[bytes]:
    global _TARS
    if _TARS is None:
        _TARS = tar_versions(5)
    return _TARS


def similar_versions(n: int, size: int, seed: int) -> list[bytes]:
    """n binary versions of one random base, each with its own small edit."""
    rng = random.Random(seed)
    base = rng.randbytes(size)
    out = []
    for i in range(n):
        b = bytearray(base)
        at = (i * 7919 * 13) % (size - 2000)
        b[at:at + 1000] = rng.randbytes(1000)
        out.append(bytes(b) + f"version {i}".encode())
    return out


# -- test plumbing -------------------------------------------------------------------------
class DeltaCase(LiveProxyCase, unittest.TestCase):
    """A fresh bucket per test on a shared server, plus on-disk helpers."""

    proxy_name = "main"
    proxy_kwargs: dict = {"config_yaml": CONFIG}

    def setUp(self):
        self.proxy = _shared(self.proxy_name, **self.proxy_kwargs)
        self.s3 = self.proxy.client()



    def ds_dir(self, bucket: str, prefix: str = "") -> str:
        parts = [p for p in prefix.split("/") if p]
        return os.path.join(self.proxy.data_dir, bucket, "deltaspaces", *parts)

    def files(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """Regular files directly in a deltaspace directory: name → size."""
        d = self.ds_dir(bucket, prefix)
        if not os.path.isdir(d):
            return {}
        return {e.name: e.stat().st_size for e in os.scandir(d) if e.is_file()}

    def put(self, bucket: str, key: str, body: bytes, **kw) -> dict:
        r = self.s3.put_object(Bucket=bucket, Key=key, Body=body, **kw)
        self.assertEqual(r["ETag"], md5_etag(body), key)
        return r

    def get(self, bucket: str, key: str, **kw) -> bytes:
        return self.s3.get_object(Bucket=bucket, Key=key, **kw)["Body"].read()

    def assertReadsBack(self, bucket: str, objects: dict[str, bytes]) -> None:
        for key, body in objects.items():
            got = self.get(bucket, key)
            self.assertEqual(len(got), len(body), key)
            self.assertTrue(got == body, f"{key}: bytes differ")

    def assertServerError(self, bucket: str, key: str, expected: Optional[bytes] = None,
                          **kw) -> ClientError:
        """The GET fails with 500 InternalError (and so never returns wrong bytes)."""
        try:
            got = self.s3.get_object(Bucket=bucket, Key=key, **kw)["Body"].read()
        except ClientError as e:
            self.assertEqual(e.response["ResponseMetadata"]["HTTPStatusCode"], 500, e.response)
            self.assertEqual(e.response["Error"]["Code"], "InternalError", e.response)
            # The body is sanitised: no hashes, no xdelta3 stderr.
            msg = e.response["Error"].get("Message", "")
            self.assertNotRegex(msg, r"[0-9a-f]{32}")
            self.assertNotIn("xdelta3", msg)
            return e
        if expected is not None and got != expected:
            self.fail(f"GET {key} answered 200 with WRONG bytes ({len(got)} bytes)")
        self.fail(f"GET {key} answered 200 ({len(got)} bytes) although its stored data is "
                  f"corrupt or missing")

    def assertLogMatches(self, pattern: str, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            log = self.proxy.log()
            m = re.search(pattern, log)
            if m:
                return m.group(0)
            if time.monotonic() > deadline:
                self.fail(f"log does not match {pattern!r}; tail:\n{log[-3000:]}")
            time.sleep(0.05)

    def assertNoTempFiles(self) -> None:
        self.assertEqual(self.proxy.temp_files(), [])

    def list_sizes(self, bucket: str, prefix: str = "") -> dict[str, tuple[int, str]]:
        out = {}
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                      Prefix=prefix):
            for o in page.get("Contents", []):
                out[o["Key"]] = (o["Size"], o["ETag"])
        return out


# -- the main flow --------------------------------------------------------------------------
class ArtifactVersionTests(DeltaCase):

    def check_delta_layout(self, bucket: str, prefix: str, objects: dict[str, bytes],
                           seed_key: Optional[str]) -> None:
        """reference.bin plus one small .delta per object, with the right xattrs."""
        on_disk = self.files(bucket, prefix)
        names = {k.rpartition("/")[2] for k in objects}
        self.assertEqual(set(on_disk), {"reference.bin"} | {n + ".delta" for n in names},
                         on_disk)
        d = self.ds_dir(bucket, prefix)
        ref = read_xattr(os.path.join(d, "reference.bin"))
        self.assertEqual(ref["note"], "reference")
        self.assertEqual(ref["original_name"], "__reference__")
        with open(os.path.join(d, "reference.bin"), "rb") as f:
            ref_bytes = f.read()
        self.assertEqual(ref["file_sha256"], sha256(ref_bytes))
        self.assertEqual(ref["file_size"], len(ref_bytes))
        self.assertEqual(ref["md5"], hashlib.md5(ref_bytes).hexdigest())
        if seed_key is not None:
            self.assertEqual(ref["source_name"], seed_key)
            self.assertTrue(ref_bytes == objects[seed_key], "reference.bin is the first upload")
        else:
            self.assertIn(ref["source_name"], objects)
            self.assertTrue(ref_bytes == objects[ref["source_name"]])
        for key, body in objects.items():
            name = key.rpartition("/")[2]
            path = os.path.join(d, name + ".delta")
            size = on_disk[name + ".delta"]
            self.assertLess(size, len(body) / 10, f"{name}.delta is {size} of {len(body)} bytes")
            meta = read_xattr(path)
            self.assertEqual(meta["note"], "delta", name)
            self.assertEqual(meta["ref_path"], "reference.bin", name)
            self.assertEqual(meta["ref_sha256"], ref["file_sha256"], name)
            self.assertEqual(meta["original_name"], name)
            self.assertEqual(meta["file_size"], len(body), name)
            self.assertEqual(meta["file_sha256"], sha256(body), name)
            self.assertEqual(meta["md5"], hashlib.md5(body).hexdigest(), name)
            self.assertEqual(meta["delta_size"], size, name)
            self.assertTrue(meta["tool"], name)
            self.assertRegex(meta["created_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")
            # Compact JSON, as serde_json writes it.
            raw = os.getxattr(path, XATTR)
            self.assertEqual(raw, json.dumps(meta, separators=(",", ":"),
                                             ensure_ascii=False).encode())

    def test_tar_versions_boto3(self):
        bucket = self.new_bucket()
        versions = tars()
        for v in versions:
            self.assertGreater(len(v), 2 * 1024 * 1024)
        objects = {f"releases/app/twisted-{i + 1}.tar": body for i, body in enumerate(versions)}
        for key, body in objects.items():
            self.put(bucket, key, body, ContentType="application/x-tar",
                     Metadata={"build": key[-5]})

        self.assertReadsBack(bucket, objects)
        self.check_delta_layout(bucket, "releases/app", objects, "releases/app/twisted-1.tar")
        self.assertNoTempFiles()

        for key, body in objects.items():
            head = self.s3.head_object(Bucket=bucket, Key=key)
            self.assertEqual(head["ContentLength"], len(body), key)
            self.assertEqual(head["ETag"], md5_etag(body), key)
            self.assertEqual(head["ContentType"], "application/x-tar", key)
            self.assertEqual(head["Metadata"], {"build": key[-5]}, key)
            got = self.s3.get_object(Bucket=bucket, Key=key)
            self.assertEqual(got["ContentLength"], len(body))
            self.assertEqual(got["ETag"], md5_etag(body))
            got["Body"].read()

        self.assertEqual(self.list_sizes(bucket),
                         {k: (len(b), md5_etag(b)) for k, b in objects.items()})
        top = self.s3.list_objects_v2(Bucket=bucket, Prefix="releases/app/", Delimiter="/")
        self.assertEqual(sorted(o["Key"] for o in top["Contents"]), sorted(objects))
        self.assertNotIn("CommonPrefixes", top)
        root = self.s3.list_objects_v2(Bucket=bucket, Delimiter="/")
        self.assertEqual([p["Prefix"] for p in root["CommonPrefixes"]], ["releases/"])
        self.assertNotIn("Contents", root)
        v1 = self.s3.list_objects(Bucket=bucket, Prefix="releases/")
        self.assertEqual({o["Key"]: o["Size"] for o in v1["Contents"]},
                         {k: len(b) for k, b in objects.items()})

    def test_range_gets_on_delta_objects(self):
        bucket = self.new_bucket()
        versions = tars()[:3]
        objects = {f"r/v{i}.tar": body for i, body in enumerate(versions)}
        for key, body in objects.items():
            self.put(bucket, key, body)
        self.assertEqual(set(self.files(bucket, "r")),
                         {"reference.bin", "v0.tar.delta", "v1.tar.delta", "v2.tar.delta"})
        for key, body in objects.items():
            n = len(body)
            cases = [
                ("bytes=0-99", 0, 99),
                ("bytes=1000000-1000499", 1_000_000, 1_000_499),
                (f"bytes={n - 1}-{n - 1}", n - 1, n - 1),
                ("bytes=-777", n - 777, n - 1),
                (f"bytes={n - 1234}-", n - 1234, n - 1),
                (f"bytes=123456-{n + 5000}", 123456, n - 1),  # clamped to the end
            ]
            for header, first, last in cases:
                got = self.s3.get_object(Bucket=bucket, Key=key, Range=header)
                data = got["Body"].read()
                self.assertEqual(got["ResponseMetadata"]["HTTPStatusCode"], 206, header)
                self.assertEqual(got["ContentRange"], f"bytes {first}-{last}/{n}", header)
                self.assertEqual(got["ContentLength"], last - first + 1, header)
                self.assertTrue(data == body[first:last + 1], f"{key} {header}: wrong slice")
                self.assertEqual(got["ETag"], md5_etag(body))
            e = self.assertRaises(ClientError, self.s3.get_object, Bucket=bucket, Key=key,
                                  Range=f"bytes={n}-{n + 10}")
            self.assertEqual(e.response["ResponseMetadata"]["HTTPStatusCode"], 416)
            self.assertEqual(e.response["Error"]["Code"], "InvalidRange")

    def test_tar_versions_aws_cli(self):
        bucket = self.new_bucket()
        work = tempfile.mkdtemp(prefix="dgp-cli-", dir=self.proxy.workdir)
        up = os.path.join(work, "up")
        down = os.path.join(work, "down")
        os.makedirs(up)
        versions = tars()
        names = [f"twisted-{i + 1}.tar" for i in range(len(versions))]
        for name, body in zip(names, versions):
            with open(os.path.join(up, name), "wb") as f:
                f.write(body)
        # The first one alone (it becomes the reference), then the rest in one go.
        self.proxy.aws("s3", "cp", os.path.join(up, names[0]), f"s3://{bucket}/cli/{names[0]}")
        self.proxy.aws("s3", "cp", up, f"s3://{bucket}/cli/", "--recursive",
                       "--exclude", names[0])
        self.proxy.aws("s3", "cp", f"s3://{bucket}/cli/", down, "--recursive")
        self.assertEqual(sorted(os.listdir(down)), sorted(names))
        for name, body in zip(names, versions):
            with open(os.path.join(down, name), "rb") as f:
                self.assertTrue(f.read() == body, f"{name}: downloaded bytes differ")
        single = os.path.join(work, "single.tar")
        self.proxy.aws("s3", "cp", f"s3://{bucket}/cli/{names[3]}", single)
        with open(single, "rb") as f:
            self.assertTrue(f.read() == versions[3])

        listing = self.proxy.aws("s3", "ls", f"s3://{bucket}/cli/").stdout.decode()
        sizes = {}
        for line in listing.splitlines():
            parts = line.split()
            if len(parts) == 4:
                sizes[parts[3]] = int(parts[2])
        self.assertEqual(sizes, {n: len(b) for n, b in zip(names, versions)})
        self.check_delta_layout(bucket, "cli", {f"cli/{n}": b for n, b in zip(names, versions)},
                                f"cli/{names[0]}")

    def test_empty_delta_eligible_objects(self):
        bucket = self.new_bucket()
        # Into an empty deltaspace: no reference for an empty body.
        self.put(bucket, "empty/nothing.tar", b"")
        self.assertEqual(self.get(bucket, "empty/nothing.tar"), b"")
        head = self.s3.head_object(Bucket=bucket, Key="empty/nothing.tar")
        self.assertEqual(head["ContentLength"], 0)
        self.assertEqual(head["ETag"], f'"{EMPTY_MD5}"')
        self.assertEqual(self.files(bucket, "empty"), {"nothing.tar": 0})
        self.assertEqual(read_xattr(os.path.join(self.ds_dir(bucket, "empty"), "nothing.tar"))
                         ["note"], "passthrough")
        # Into a deltaspace that has a reference: still readable, still empty.
        body = similar_versions(1, 200_000, 7)[0]
        self.put(bucket, "full/a.zip", body)
        self.put(bucket, "full/empty.zip", b"")
        self.assertEqual(self.get(bucket, "full/empty.zip"), b"")
        self.assertTrue(self.get(bucket, "full/a.zip") == body)
        self.assertIn("reference.bin", self.files(bucket, "full"))
        self.assertEqual(self.list_sizes(bucket),
                         {"empty/nothing.tar": (0, f'"{EMPTY_MD5}"'),
                          "full/a.zip": (len(body), md5_etag(body)),
                          "full/empty.zip": (0, f'"{EMPTY_MD5}"')})
        # Overwriting an empty object with data and back.
        self.put(bucket, "full/empty.zip", body)
        self.assertTrue(self.get(bucket, "full/empty.zip") == body)
        self.put(bucket, "full/empty.zip", b"")
        self.assertEqual(self.get(bucket, "full/empty.zip"), b"")
        self.assertEqual(self.s3.head_object(Bucket=bucket, Key="full/empty.zip")
                         ["ContentLength"], 0)


class PassthroughTests(DeltaCase):

    def test_compressed_tarballs_are_passthrough(self):
        bucket = self.new_bucket()
        objects = {}
        for i, body in enumerate(tars()[:3]):
            objects[f"gz/twisted-{i}.tar.gz"] = gzip.compress(body, compresslevel=1, mtime=0)
        objects["gz/notes.txt"] = b"release notes\n" * 1000
        for key, body in objects.items():
            self.put(bucket, key, body)
        self.assertReadsBack(bucket, objects)
        on_disk = self.files(bucket, "gz")
        self.assertEqual(on_disk, {k.rpartition("/")[2]: len(b) for k, b in objects.items()})
        for key in objects:
            meta = read_xattr(os.path.join(self.ds_dir(bucket, "gz"), key.rpartition("/")[2]))
            self.assertEqual(meta["note"], "passthrough", key)
            self.assertNotIn("ref_sha256", meta)
        self.assertEqual(self.list_sizes(bucket),
                         {k: (len(b), md5_etag(b)) for k, b in objects.items()})

    def test_extension_match_is_case_insensitive(self):
        bucket = self.new_bucket()
        a, b = similar_versions(2, 300_000, 11)
        self.put(bucket, "up/A.TAR", a)
        self.put(bucket, "up/B.Zip", b)
        self.assertEqual(set(self.files(bucket, "up")),
                         {"reference.bin", "A.TAR.delta", "B.Zip.delta"})
        self.assertReadsBack(bucket, {"up/A.TAR": a, "up/B.Zip": b})

    def test_random_bin_ratio_guard(self):
        bucket = self.new_bucket()
        rng = random.Random(99)
        first = rng.randbytes(1024 * 1024)
        second = rng.randbytes(1024 * 1024 + 3)
        # The first upload into an empty deltaspace becomes the reference and
        # is stored as its own (tiny) self-delta, random or not.
        self.put(bucket, "rnd/first.bin", first)
        on_disk = self.files(bucket, "rnd")
        self.assertEqual(set(on_disk), {"reference.bin", "first.bin.delta"})
        self.assertLess(on_disk["first.bin.delta"], 4096)
        # A second, unrelated random file cannot beat the ratio: passthrough,
        # and the reference stays for the first one.
        self.put(bucket, "rnd/second.bin", second)
        on_disk = self.files(bucket, "rnd")
        self.assertEqual(set(on_disk), {"reference.bin", "first.bin.delta", "second.bin"})
        self.assertEqual(on_disk["second.bin"], len(second))
        meta = read_xattr(os.path.join(self.ds_dir(bucket, "rnd"), "second.bin"))
        self.assertEqual(meta["note"], "passthrough")
        self.assertEqual(meta["file_sha256"], sha256(second))
        self.assertReadsBack(bucket, {"rnd/first.bin": first, "rnd/second.bin": second})
        self.assertEqual(self.list_sizes(bucket),
                         {"rnd/first.bin": (len(first), md5_etag(first)),
                          "rnd/second.bin": (len(second), md5_etag(second))})
        self.assertNoTempFiles()

    def test_overwrite_switches_between_delta_and_passthrough(self):
        bucket = self.new_bucket()
        rng = random.Random(5)
        a, b = similar_versions(2, 400_000, 3)
        noise = rng.randbytes(400_000)
        self.put(bucket, "ow/a.bin", a)
        self.put(bucket, "ow/b.bin", b)
        self.assertIn("b.bin.delta", self.files(bucket, "ow"))
        self.put(bucket, "ow/b.bin", noise)  # now passthrough: the .delta must go
        self.assertEqual(set(self.files(bucket, "ow")), {"reference.bin", "a.bin.delta", "b.bin"})
        self.assertTrue(self.get(bucket, "ow/b.bin") == noise)
        self.put(bucket, "ow/b.bin", b)  # and back to a delta: the plain file must go
        self.assertEqual(set(self.files(bucket, "ow")),
                         {"reference.bin", "a.bin.delta", "b.bin.delta"})
        self.assertTrue(self.get(bucket, "ow/b.bin") == b)
        self.assertEqual(self.list_sizes(bucket),
                         {"ow/a.bin": (len(a), md5_etag(a)), "ow/b.bin": (len(b), md5_etag(b))})
        # Overwriting the seeding key never re-baselines the reference (and a
        # GET right before the overwrite must not leave the old bytes served).
        self.assertTrue(self.get(bucket, "ow/a.bin") == a)
        d = self.ds_dir(bucket, "ow")
        a2 = a[:1000] + b"changed" + a[1000:]
        self.put(bucket, "ow/a.bin", a2)
        with open(os.path.join(d, "reference.bin"), "rb") as f:
            self.assertTrue(f.read() == a, "reference.bin changed on overwrite")
        self.assertEqual(read_xattr(os.path.join(d, "a.bin.delta"))["ref_sha256"], sha256(a))
        self.assertTrue(self.get(bucket, "ow/a.bin") == a2)
        self.assertTrue(self.get(bucket, "ow/b.bin") == b)

    def test_compression_false_bucket(self):
        bucket = "nocomp"
        objects = {f"t/twisted-{i}.tar": body for i, body in enumerate(tars()[:3])}
        a, b = similar_versions(2, 300_000, 21)
        objects.update({"t/a.bin": a, "t/b.bin": b, "x.zip": a})
        for key, body in objects.items():
            self.put(bucket, key, body)
        self.assertReadsBack(bucket, objects)
        self.assertEqual(self.files(bucket, "t"),
                         {k.rpartition("/")[2]: len(v) for k, v in objects.items()
                          if k.startswith("t/")})
        self.assertEqual(self.files(bucket, ""), {"x.zip": len(a)})
        for key in objects:
            path = os.path.join(self.ds_dir(bucket), *key.split("/"))
            self.assertEqual(read_xattr(path)["note"], "passthrough", key)
        self.assertEqual(self.list_sizes(bucket),
                         {k: (len(v), md5_etag(v)) for k, v in objects.items()})

    def half_changed_pair(self, seed: int) -> tuple[bytes, bytes]:
        """v1 and a v2 sharing half its bytes: a delta ratio of about 0.5."""
        rng = random.Random(seed)
        v1 = rng.randbytes(256 * 1024)
        v2 = v1[:128 * 1024] + rng.randbytes(128 * 1024)
        return v1, v2

    def test_bucket_max_delta_ratio(self):
        v1, v2 = self.half_changed_pair(31)
        # Sanity: this pair really deltas to about half.
        ratio = self.xdelta_ratio(v1, v2)
        self.assertTrue(0.4 < ratio < 0.7, ratio)

        # 0.3: v2's delta loses → passthrough; v1 keeps its self-delta and the reference.
        self.put("ratio-low", "p/v1.zip", v1)
        self.put("ratio-low", "p/v2.zip", v2)
        self.assertEqual(set(self.files("ratio-low", "p")),
                         {"reference.bin", "v1.zip.delta", "v2.zip"})
        # 0.95: v2 is kept as a delta.
        self.put("ratio-high", "p/v1.zip", v1)
        self.put("ratio-high", "p/v2.zip", v2)
        self.assertEqual(set(self.files("ratio-high", "p")),
                         {"reference.bin", "v1.zip.delta", "v2.zip.delta"})
        # A fresh bucket has the global default 0.75: delta as well.
        bucket = self.new_bucket()
        self.put(bucket, "p/v1.zip", v1)
        self.put(bucket, "p/v2.zip", v2)
        self.assertEqual(set(self.files(bucket, "p")),
                         {"reference.bin", "v1.zip.delta", "v2.zip.delta"})
        # 0.0: nothing is ever a delta, and no reference is left behind.
        self.put("ratio-zero", "p/v1.zip", v1)
        self.put("ratio-zero", "p/v2.zip", v2)
        self.assertEqual(self.files("ratio-zero", "p"), {"v1.zip": len(v1), "v2.zip": len(v2)})
        for b in ("ratio-low", "ratio-high", bucket, "ratio-zero"):
            self.assertReadsBack(b, {"p/v1.zip": v1, "p/v2.zip": v2})
            self.assertEqual(self.list_sizes(b, "p/"),
                             {"p/v1.zip": (len(v1), md5_etag(v1)),
                              "p/v2.zip": (len(v2), md5_etag(v2))})

    def xdelta_ratio(self, source: bytes, target: bytes) -> float:
        with tempfile.TemporaryDirectory() as d:
            s, t = os.path.join(d, "s"), os.path.join(d, "t")
            with open(s, "wb") as f:
                f.write(source)
            with open(t, "wb") as f:
                f.write(target)
            out = subprocess.run([XDELTA3, "-e", "-D", "-s", s, "-c", t], capture_output=True,
                                 check=True).stdout
        return len(out) / len(target)


# -- reference lifecycle ---------------------------------------------------------------------
class DeleteTests(DeltaCase):

    def test_last_delete_removes_the_reference(self):
        bucket = self.new_bucket()
        objects = {f"life/v{i}.jar": body for i, body in enumerate(similar_versions(4, 300_000, 1))}
        for key, body in objects.items():
            self.put(bucket, key, body)
        self.put(bucket, "life/sub/other.jar", objects["life/v0.jar"])  # another deltaspace
        self.assertIn("reference.bin", self.files(bucket, "life"))

        keys = list(objects)
        # The seeding object goes first: the reference must stay for its siblings.
        for i, key in enumerate(keys[:-1]):
            self.s3.delete_object(Bucket=bucket, Key=key)
            self.assertIn("reference.bin", self.files(bucket, "life"), f"after deleting {key}")
            for other in keys[i + 1:]:
                self.assertTrue(self.get(bucket, other) == objects[other], other)
        self.assertEqual(set(self.files(bucket, "life")), {"reference.bin", "v3.jar.delta"})
        self.s3.delete_object(Bucket=bucket, Key=keys[-1])
        self.assertEqual(self.files(bucket, "life"), {})
        # The nested deltaspace is untouched; life/ still exists because of it.
        self.assertEqual(set(self.files(bucket, "life/sub")), {"reference.bin", "other.jar.delta"})
        self.assertTrue(self.get(bucket, "life/sub/other.jar") == objects["life/v0.jar"])
        self.s3.delete_object(Bucket=bucket, Key="life/sub/other.jar")
        self.assertFalse(os.path.exists(self.ds_dir(bucket, "life")),
                         os.listdir(self.ds_dir(bucket, "life"))
                         if os.path.exists(self.ds_dir(bucket, "life")) else None)
        self.assertEqual(self.list_sizes(bucket), {})
        # The bucket is empty now, so it can be deleted.
        self.s3.delete_bucket(Bucket=bucket)

    def test_root_deltaspace(self):
        bucket = self.new_bucket()
        a, b = similar_versions(2, 250_000, 5)
        self.put(bucket, "a.dump", a)
        self.put(bucket, "b.dump", b)
        self.assertEqual(set(self.files(bucket)), {"reference.bin", "a.dump.delta", "b.dump.delta"})
        self.assertEqual(read_xattr(os.path.join(self.ds_dir(bucket), "reference.bin"))
                         ["source_name"], "a.dump")
        self.assertReadsBack(bucket, {"a.dump": a, "b.dump": b})
        self.assertEqual(self.list_sizes(bucket),
                         {"a.dump": (len(a), md5_etag(a)), "b.dump": (len(b), md5_etag(b))})
        self.s3.delete_object(Bucket=bucket, Key="a.dump")
        self.assertIn("reference.bin", self.files(bucket))
        self.s3.delete_object(Bucket=bucket, Key="b.dump")
        self.assertEqual(self.files(bucket), {})
        self.assertTrue(os.path.isdir(self.ds_dir(bucket)))
        self.s3.delete_bucket(Bucket=bucket)

    def test_batch_delete_removes_the_directory(self):
        bucket = self.new_bucket()
        objects = {f"batch/v{i}.iso": body for i, body in enumerate(similar_versions(3, 200_000, 2))}
        rng = random.Random(8)
        objects["batch/noise.iso"] = rng.randbytes(200_000)  # passthrough sibling
        for key, body in objects.items():
            self.put(bucket, key, body)
        self.assertIn("noise.iso", self.files(bucket, "batch"))
        self.assertIn("reference.bin", self.files(bucket, "batch"))
        # All but one (the passthrough one) gone: no delta needs the reference any
        # more, but an object remains and SPEC says only the last one out takes it.
        self.s3.delete_objects(Bucket=bucket, Delete={
            "Objects": [{"Key": k} for k in objects if k != "batch/noise.iso"]})
        self.assertTrue(self.get(bucket, "batch/noise.iso") == objects["batch/noise.iso"])
        self.assertEqual(set(self.files(bucket, "batch")), {"reference.bin", "noise.iso"})
        self.s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "batch/noise.iso"}]})
        self.assertFalse(os.path.exists(self.ds_dir(bucket, "batch")))
        self.assertTrue(os.path.isdir(self.ds_dir(bucket)))

    def test_delete_of_missing_key_keeps_the_reference(self):
        bucket = self.new_bucket()
        a, b = similar_versions(2, 200_000, 4)
        self.put(bucket, "keep/a.zip", a)
        self.s3.delete_object(Bucket=bucket, Key="keep/never-existed.zip")
        self.s3.delete_object(Bucket=bucket, Key="keep/a.zip.delta.zip")
        self.assertEqual(set(self.files(bucket, "keep")), {"reference.bin", "a.zip.delta"})
        self.assertTrue(self.get(bucket, "keep/a.zip") == a)
        self.put(bucket, "keep/b.zip", b)
        self.assertEqual(read_xattr(os.path.join(self.ds_dir(bucket, "keep"), "b.zip.delta"))
                         ["ref_sha256"], sha256(a))

    def test_delete_all_while_a_put_is_in_flight(self):
        """A PUT that has started encoding against the reference while the last
        object of the deltaspace is deleted must not end up as a .delta whose
        reference is gone (or replaced): GET must return its bytes."""
        bucket = self.new_bucket()
        a, x = similar_versions(2, 600_000, 77)
        self.put(bucket, "race/a.zip", a)
        conn = start_slow_put(self.proxy, bucket, "race/x.zip", x, first=len(x) // 2)
        try:
            time.sleep(0.7)  # the server has the reference open and is encoding
            self.s3.delete_object(Bucket=bucket, Key="race/a.zip")
            conn.send(x[len(x) // 2:])
            r = conn.getresponse()
            body = r.read()
            self.assertEqual(r.status, 200, body)
        finally:
            conn.close()
        d = self.ds_dir(bucket, "race")
        on_disk = self.files(bucket, "race")
        if "x.zip.delta" in on_disk:
            self.assertIn("reference.bin", on_disk, "a .delta was stored without its reference")
            self.assertEqual(read_xattr(os.path.join(d, "x.zip.delta"))["ref_sha256"],
                             read_xattr(os.path.join(d, "reference.bin"))["file_sha256"])
        self.assertTrue(self.get(bucket, "race/x.zip") == x)



def start_slow_put(proxy: ProxyProcess, bucket: str, key: str, body: bytes,
                   first: int) -> http.client.HTTPConnection:
    """Send a signed PUT's headers and the first C{first} body bytes; the caller
    sends the rest and reads the response."""
    host = f"127.0.0.1:{proxy.port}"
    path = f"/{bucket}/{key}"
    req = AWSRequest(method="PUT", url=f"http://{host}{path}", data=body,
                     headers={"Content-Length": str(len(body)), "Host": host})
    req.context["payload_signing_enabled"] = True
    S3SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "s3", "us-east-1").add_auth(req)
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    conn.putrequest("PUT", path, skip_host=True, skip_accept_encoding=True)
    for k, v in req.headers.items():
        conn.putheader(k, v)
    conn.endheaders()
    conn.send(body[:first])
    return conn


# -- concurrency -------------------------------------------------------------------------------
def put_all_at_once(bucket: str, clients: list, objects: dict[str, bytes],
                    check_etag: bool = False) -> list:
    """PUT every object from its own thread, all released together; the errors."""
    barrier = threading.Barrier(len(objects))
    errors: list = []

    def upload(client, key, body):
        try:
            barrier.wait(10)
            r = client.put_object(Bucket=bucket, Key=key, Body=body)
            if check_etag and r["ETag"] != md5_etag(body):
                errors.append((key, "etag", r["ETag"]))
        except Exception as e:  # reported by the caller
            errors.append((key, repr(e)))

    threads = [threading.Thread(target=upload, args=(c, k, b))
               for c, (k, b) in zip(clients, objects.items())]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return errors


class ParallelFirstPutTests(DeltaCase):

    def test_sixteen_parallel_first_puts(self):
        bucket = self.new_bucket()
        versions = similar_versions(16, 512 * 1024, 16)
        objects = {f"par/build-{i:02d}.zip": body for i, body in enumerate(versions)}
        clients = [self.proxy.client(max_pool_connections=2) for _ in objects]
        self.assertEqual(put_all_at_once(bucket, clients, objects, check_etag=True), [])

        on_disk = self.files(bucket, "par")
        self.assertEqual([n for n in on_disk if n == "reference.bin"], ["reference.bin"])
        self.assertEqual(set(on_disk),
                         {"reference.bin"} | {k.rpartition("/")[2] + ".delta" for k in objects})
        self.assertReadsBack(bucket, objects)
        d = self.ds_dir(bucket, "par")
        ref = read_xattr(os.path.join(d, "reference.bin"))
        self.assertIn(ref["source_name"], objects)
        self.assertEqual(ref["file_sha256"], sha256(objects[ref["source_name"]]))
        for key in objects:
            meta = read_xattr(os.path.join(d, key.rpartition("/")[2] + ".delta"))
            self.assertEqual(meta["ref_sha256"], ref["file_sha256"], key)
        self.assertEqual(self.list_sizes(bucket),
                         {k: (len(b), md5_etag(b)) for k, b in objects.items()})
        self.assertNoTempFiles()


    def test_parallel_first_puts_across_two_processes(self):
        """SPEC §4: exactly one reference also across processes sharing a backend."""
        other = ProxyProcess(data_dir=self.proxy.data_dir, config_yaml=CONFIG)
        self.addCleanup(other.cleanup)
        other.start()
        bucket = self.new_bucket()
        versions = similar_versions(12, 400 * 1024, 12)
        objects = {f"two/build-{i:02d}.war": body for i, body in enumerate(versions)}
        clients = [(self.proxy if i % 2 else other).client() for i in range(len(objects))]
        self.assertEqual(put_all_at_once(bucket, clients, objects), [])
        on_disk = self.files(bucket, "two")
        self.assertEqual(set(on_disk),
                         {"reference.bin"} | {k.rpartition("/")[2] + ".delta" for k in objects})
        ref = read_xattr(os.path.join(self.ds_dir(bucket, "two"), "reference.bin"))
        for key in objects:
            meta = read_xattr(os.path.join(self.ds_dir(bucket, "two"),
                                           key.rpartition("/")[2] + ".delta"))
            self.assertEqual(meta["ref_sha256"], ref["file_sha256"], key)
        self.assertReadsBack(bucket, objects)
        s3, self.s3 = self.s3, other.client()
        try:
            self.assertReadsBack(bucket, objects)
        finally:
            self.s3 = s3
        self.assertNoTempFiles()


class CopyTests(DeltaCase):

    def test_copy_of_delta_objects(self):
        bucket = self.new_bucket()
        a, b = similar_versions(2, 300_000, 60)
        self.put(bucket, "src/a.zip", a, Metadata={"k": "v"})
        self.put(bucket, "src/b.zip", b)
        # Same deltaspace: encoded against the same reference.
        self.s3.copy_object(Bucket=bucket, Key="src/b-copy.zip",
                            CopySource={"Bucket": bucket, "Key": "src/b.zip"})
        # A new deltaspace: the copy seeds its reference.
        self.s3.copy_object(Bucket=bucket, Key="dst/a.zip",
                            CopySource={"Bucket": bucket, "Key": "src/a.zip"})
        self.assertEqual(set(self.files(bucket, "src")),
                         {"reference.bin", "a.zip.delta", "b.zip.delta", "b-copy.zip.delta"})
        self.assertEqual(set(self.files(bucket, "dst")), {"reference.bin", "a.zip.delta"})
        self.assertReadsBack(bucket, {"src/b-copy.zip": b, "dst/a.zip": a})
        head = self.s3.head_object(Bucket=bucket, Key="dst/a.zip")
        self.assertEqual(head["ETag"], md5_etag(a))
        self.assertEqual(head["Metadata"], {"k": "v"})
        self.assertEqual(head["ContentLength"], len(a))


# -- integrity --------------------------------------------------------------------------------
def flip_bytes(path: str, offsets) -> None:
    """Corrupt a file in place (its xattr stays)."""
    with open(path, "r+b") as f:
        for off in offsets:
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ 0xFF]))


class CorruptionTests(DeltaCase):
    """A 1 MB cache admits nothing over 256 KiB, so every GET below reads
    (and checks) the reference from disk."""

    proxy_name = "nocache"
    proxy_kwargs = {"env": {"DGP_CACHE_MB": "1"}}

    def upload_set(self, bucket: str, prefix: str, n: int = 3, seed: int = 0) -> dict:
        objects = {f"{prefix}/v{i}.tar": body
                   for i, body in enumerate(similar_versions(n, 700_000, seed))}
        for key, body in objects.items():
            self.put(bucket, key, body)
        # No GET before the damage: a server may keep a verified rebuild for a
        # while, and these tests are about what it does when it has to read disk.
        self.assertEqual(set(self.files(bucket, prefix)),
                         {"reference.bin"} | {f"v{i}.tar.delta" for i in range(n)})
        return objects

    def test_corrupted_delta(self):
        bucket = self.new_bucket()
        objects = self.upload_set(bucket, "cd", 4, seed=40)
        d = self.ds_dir(bucket, "cd")
        before = {n: read_xattr(os.path.join(d, n)) for n in self.files(bucket, "cd")}
        size = os.path.getsize(os.path.join(d, "v1.tar.delta"))
        flip_bytes(os.path.join(d, "v1.tar.delta"), [size // 2, size // 2 + 1, size - 10])
        flip_bytes(os.path.join(d, "v2.tar.delta"), [0, 1, 2, 3])  # the VCDIFF header
        with open(os.path.join(d, "v3.tar.delta"), "r+b") as f:
            f.truncate(os.path.getsize(os.path.join(d, "v3.tar.delta")) // 2)
        for n, meta in before.items():  # the xattrs are as they were
            self.assertEqual(read_xattr(os.path.join(d, n)), meta)

        for key in ("cd/v1.tar", "cd/v2.tar", "cd/v3.tar"):
            self.assertServerError(bucket, key, objects[key])
            self.assertServerError(bucket, key, objects[key][:100], Range="bytes=0-99")
            # HEAD does not rebuild; it still reports the original size.
            self.assertEqual(self.s3.head_object(Bucket=bucket, Key=key)["ContentLength"],
                             len(objects[key]))
        self.assertLogMatches(r"cd/v1\.tar.*(?i:fail|checksum|mismatch)")
        self.assertLogMatches(r"cd/v2\.tar.*(?i:fail|checksum|mismatch)")
        self.assertLogMatches(r"cd/v3\.tar.*(?i:fail|checksum|mismatch)")
        # The intact sibling still reads back.
        self.assertTrue(self.get(bucket, "cd/v0.tar") == objects["cd/v0.tar"])
        self.assertNoTempFiles()

    def test_corrupted_reference(self):
        bucket = self.new_bucket()
        objects = self.upload_set(bucket, "cr", 3, seed=41)
        path = os.path.join(self.ds_dir(bucket, "cr"), "reference.bin")
        meta = read_xattr(path)
        size = os.path.getsize(path)
        flip_bytes(path, [size // 3])
        self.assertEqual(read_xattr(path), meta)
        for key, body in objects.items():
            self.assertServerError(bucket, key, body)
            self.assertServerError(bucket, key, body[10:21], Range="bytes=10-20")
        self.assertLogMatches(r"(?i)reference[^\n]*cr[^\n]*(sha-?256|corrupt|checksum)")

    def test_deleted_reference(self):
        bucket = self.new_bucket()
        objects = self.upload_set(bucket, "dr", 2, seed=42)
        os.unlink(os.path.join(self.ds_dir(bucket, "dr"), "reference.bin"))
        for key, body in objects.items():
            self.assertServerError(bucket, key, body)
        self.assertLogMatches(r"dr/v\d\.tar[^\n]*(?i:no reference|missing reference)")
        # LIST still shows them with their original sizes (metadata is intact).
        self.assertEqual(self.list_sizes(bucket),
                         {k: (len(b), md5_etag(b)) for k, b in objects.items()})


class CachedCorruptionTests(DeltaCase):
    """With the default cache a reference corrupted on disk after it was
    cached may still serve correct bytes; what must never happen is wrong bytes."""

    def test_never_wrong_bytes(self):
        bucket = self.new_bucket()
        objects = {f"cc/v{i}.tar": b for i, b in enumerate(similar_versions(3, 300_000, 50))}
        for key, body in objects.items():
            self.put(bucket, key, body)
        self.assertReadsBack(bucket, objects)
        d = self.ds_dir(bucket, "cc")
        flip_bytes(os.path.join(d, "reference.bin"), [1000, 2000, 3000])
        flip_bytes(os.path.join(d, "v2.tar.delta"), [50])
        for key, body in objects.items():
            try:
                got = self.get(bucket, key)
            except ClientError as e:
                self.assertEqual(e.response["ResponseMetadata"]["HTTPStatusCode"], 500)
                continue
            self.assertTrue(got == body, f"{key}: 200 with wrong bytes")


# -- the Rust proxy's data directory ----------------------------------------------------------
RUST_TOOL = "deltaglider_proxy/1.19.0"


def rust_json(doc: dict) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def xdelta_file(source: str, target: str, out: str) -> None:
    subprocess.run([XDELTA3, "-e", "-D", "-s", source, target, out], check=True,
                   capture_output=True)


def write_rust_object(ds_dir: str, name: str, data: bytes, meta: dict) -> None:
    os.makedirs(ds_dir, exist_ok=True)
    path = os.path.join(ds_dir, name)
    with open(path, "wb") as f:
        f.write(data)
    os.setxattr(path, XATTR, rust_json(meta))


def rust_meta(original_name: str, data: bytes, created_at: str, note_fields: dict,
              content_type: Optional[str] = None, user: Optional[dict] = None) -> dict:
    """Field order as the Rust struct serialises it (fact sheet §2.2)."""
    doc = {"tool": RUST_TOOL, "original_name": original_name, "file_sha256": sha256(data),
           "file_size": len(data), "md5": hashlib.md5(data).hexdigest(),
           "created_at": created_at}
    if content_type:
        doc["content_type"] = content_type
    if user:
        doc["user_metadata"] = user
    doc.update(note_fields)
    return doc


class RustDataDirTests(unittest.TestCase):

    def setUp(self):
        self.proxy = ProxyProcess()
        self.addCleanup(self.proxy.cleanup)
        self.build_rust_layout(self.proxy.data_dir)
        self.proxy.start()
        self.s3 = self.proxy.client()

    def build_rust_layout(self, root: str) -> None:
        rng = random.Random(2026)
        scratch = os.path.join(self.proxy.workdir, "scratch")
        os.makedirs(scratch)
        base = rng.randbytes(400_000)
        v10 = base
        v11 = base[:150_000] + b"fixed in 1.1" * 100 + base[150_000:]
        dump_ref = rng.randbytes(300_000)
        dump_new = dump_ref[:200_000] + rng.randbytes(2000) + dump_ref[202_000:]
        readme = b"# Release notes\n" * 500
        self.expected = {
            "releases/v1/app-1.0.zip": v10,
            "releases/v1/app-1.1.zip": v11,
            "releases/v1/README.md": readme,
            "nightly.sql": dump_new,
            "unmanaged.txt": b"copied in by hand, no xattr\n",
        }
        bucket = os.path.join(root, "legacy")
        ds = os.path.join(bucket, "deltaspaces", "releases", "v1")
        os.makedirs(ds)
        # reference.bin, seeded by app-1.0.zip
        write_rust_object(ds, "reference.bin", base, rust_meta(
            "__reference__", base, "2026-07-10T12:34:56.123456789Z",
            {"note": "reference", "source_name": "releases/v1/app-1.0.zip"},
            content_type="application/zip"))
        ref_path = os.path.join(scratch, "ref")
        with open(ref_path, "wb") as f:
            f.write(base)
        for name, data, ts in (("app-1.0.zip", v10, "2026-07-10T12:34:56.223456789Z"),
                               ("app-1.1.zip", v11, "2026-07-11T08:00:01.000000001Z")):
            target = os.path.join(scratch, name)
            with open(target, "wb") as f:
                f.write(data)
            out = os.path.join(scratch, name + ".delta")
            xdelta_file(ref_path, target, out)
            with open(out, "rb") as f:
                delta = f.read()
            write_rust_object(ds, name + ".delta", delta, rust_meta(
                name, data, ts,
                {"note": "delta", "ref_path": "reference.bin", "ref_sha256": sha256(base),
                 "delta_size": len(delta),
                 "delta_cmd": f"xdelta3 -e -9 -s reference.bin {name} {name}.delta"},
                content_type="application/zip", user={"build": name[4:7]}))
        write_rust_object(ds, "README.md", readme, rust_meta(
            "README.md", readme, "2026-07-09T00:00:00.5Z", {"note": "passthrough"},
            content_type="text/markdown"))
        # The root deltaspace "": its own reference and a delta.
        root_ds = os.path.join(bucket, "deltaspaces")
        write_rust_object(root_ds, "reference.bin", dump_ref, rust_meta(
            "__reference__", dump_ref, "2026-07-01T01:02:03.999999999Z",
            {"note": "reference", "source_name": "nightly-old.sql"}))
        ref2 = os.path.join(scratch, "ref2")
        with open(ref2, "wb") as f:
            f.write(dump_ref)
        target = os.path.join(scratch, "nightly.sql")
        with open(target, "wb") as f:
            f.write(dump_new)
        xdelta_file(ref2, target, os.path.join(scratch, "nightly.sql.delta"))
        with open(os.path.join(scratch, "nightly.sql.delta"), "rb") as f:
            delta = f.read()
        self.assertLess(len(delta), 20_000)
        write_rust_object(root_ds, "nightly.sql.delta", delta, rust_meta(
            "nightly.sql", dump_new, "2026-07-02T03:04:05.000000000Z",
            {"note": "delta", "ref_path": "reference.bin", "ref_sha256": sha256(dump_ref),
             "delta_size": len(delta),
             "delta_cmd": "xdelta3 -e -9 -s reference.bin nightly.sql nightly.sql.delta"}))
        with open(os.path.join(root_ds, "unmanaged.txt"), "wb") as f:
            f.write(self.expected["unmanaged.txt"])
        self.bucket = "legacy"
        self.ds = ds

    def test_reads_rust_layout(self):
        for key, body in self.expected.items():
            got = self.s3.get_object(Bucket=self.bucket, Key=key)
            self.assertTrue(got["Body"].read() == body, f"{key}: bytes differ")
            self.assertEqual(got["ContentLength"], len(body), key)
            if key != "unmanaged.txt":
                self.assertEqual(got["ETag"], md5_etag(body), key)
        head = self.s3.head_object(Bucket=self.bucket, Key="releases/v1/app-1.1.zip")
        self.assertEqual(head["ContentLength"], len(self.expected["releases/v1/app-1.1.zip"]))
        self.assertEqual(head["ContentType"], "application/zip")
        self.assertEqual(head["Metadata"], {"build": "1.1"})
        self.assertEqual(head["LastModified"].isoformat(), "2026-07-11T08:00:01+00:00")
        self.assertEqual(self.s3.head_object(Bucket=self.bucket, Key="releases/v1/README.md")
                         ["ContentType"], "text/markdown")
        rng = self.s3.get_object(Bucket=self.bucket, Key="releases/v1/app-1.1.zip",
                                 Range="bytes=149990-151209")
        self.assertTrue(rng["Body"].read()
                        == self.expected["releases/v1/app-1.1.zip"][149990:151210])

        listed = {}
        for o in self.s3.list_objects_v2(Bucket=self.bucket)["Contents"]:
            listed[o["Key"]] = o["Size"]
            if o["Key"] != "unmanaged.txt":
                self.assertEqual(o["ETag"], md5_etag(self.expected[o["Key"]]), o["Key"])
        self.assertEqual(listed, {k: len(v) for k, v in self.expected.items()})
        self.assertIn("legacy", [b["Name"] for b in self.s3.list_buckets()["Buckets"]])

    def test_writes_against_a_rust_reference(self):
        base = self.expected["releases/v1/app-1.0.zip"]
        v12 = base[:300_000] + b"1.2" * 1000 + base[300_000:]
        self.s3.put_object(Bucket=self.bucket, Key="releases/v1/app-1.2.zip", Body=v12)
        meta = read_xattr(os.path.join(self.ds, "app-1.2.zip.delta"))
        self.assertEqual(meta["note"], "delta")
        self.assertEqual(meta["ref_sha256"], sha256(base))
        self.assertTrue(self.s3.get_object(Bucket=self.bucket, Key="releases/v1/app-1.2.zip")
                        ["Body"].read() == v12)
        # The Rust reference itself is untouched.
        ref = read_xattr(os.path.join(self.ds, "reference.bin"))
        self.assertEqual(ref["tool"], RUST_TOOL)
        self.assertEqual(ref["created_at"], "2026-07-10T12:34:56.123456789Z")
        # Deleting everything in that deltaspace removes the Rust reference too.
        for key in ("releases/v1/app-1.0.zip", "releases/v1/app-1.1.zip",
                    "releases/v1/app-1.2.zip"):
            self.s3.delete_object(Bucket=self.bucket, Key=key)
            self.assertTrue(os.path.exists(os.path.join(self.ds, "reference.bin")))
        self.s3.delete_object(Bucket=self.bucket, Key="releases/v1/README.md")
        self.assertFalse(os.path.exists(self.ds))
        self.assertTrue(self.s3.get_object(Bucket=self.bucket, Key="nightly.sql")["Body"].read()
                        == self.expected["nightly.sql"])
