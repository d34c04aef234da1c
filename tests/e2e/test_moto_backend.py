"""End-to-end: dgproxy with moto's S3 server as its S3 backend.

A second, independent S3 implementation beside SeaweedFS (test_s3_backend):
moto models AWS S3's behaviour, its error codes, its 5 MiB minimum part size,
its `-N` multipart ETags, its URL-encoded listings, though it is not AWS and
checks no signatures. What a client sees through dgproxy (bytes, sizes, ETags,
metadata, errors), and what dgproxy left in moto, read with a plain S3 client
straight from moto.

One moto and one dgproxy per TestCase class (L{ClassFixture}). moto lives in
its own virtualenv under `.cache/moto-venv`, built on first use; without PyPI
the tests are skipped, saying why.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from typing import Optional

from botocore.exceptions import ClientError
from twisted.trial import unittest

from tests.e2e import test_interop
from tests.e2e.harness import ProxyProcess
from tests.e2e.moto import MotoServer
from tests.e2e.test_s3_backend import (
    ClassFixture, ThroughAndBehind, etag, list_all, random_bytes, s3_error, sha256_hex,
    stored_objects)

MiB = 1024 * 1024
ENCRYPTION_KEY = "5e" * 32
ENCRYPTION_CONFIG = "storage:\n  backend_encryption:\n    mode: aes256-gcm-proxy\n"


def multipart_etag(parts: list[bytes]) -> str:
    """The ETag AWS S3 gives an object uploaded in these parts."""
    joined = b"".join(hashlib.md5(p).digest() for p in parts)
    return '"%s-%d"' % (hashlib.md5(joined).hexdigest(), len(parts))


def big_versions(seed: int) -> list[bytes]:
    """Two releases of a 6.5 MiB artifact, the second a small edit of the first:
    large enough for a multipart upload of two parts under moto's 5 MiB minimum."""
    base = random_bytes(6 * MiB + MiB // 2, seed=seed)
    v2 = bytearray(base)
    v2[2 * MiB:2 * MiB + 3000] = random_bytes(3000, seed=seed + 1)
    return [base, bytes(v2) + b"release 2\n"]


def read_tree(root: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, root).replace(os.sep, "/")] = f.read()
    return out


class MotoBackendCase(ThroughAndBehind, ClassFixture, unittest.TestCase):
    """One moto_server + one dgproxy using it as its only backend (DGP_S3_*)."""

    moto: Optional[MotoServer] = None
    proxy: Optional[ProxyProcess] = None
    bucket = "dgp-moto-e2e"
    proxy_env: dict = {}
    config_yaml: Optional[str] = None

    @classmethod
    def setUpClass(cls):
        cls.moto = MotoServer()  # assigned before start: tearDownClass stops it
        cls.moto.start()
        cls.proxy = ProxyProcess(env={**cls.moto.backend_env(), **cls.proxy_env},
                                 config_yaml=cls.config_yaml)
        cls.proxy.start()
        cls.s3 = cls.proxy.client()
        cls.m = cls.direct = cls.moto.client()
        cls.s3.create_bucket(Bucket=cls.bucket)

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()  # the proxy first: it still talks to moto
        if cls.moto is not None:
            cls.moto.cleanup()
            cls.moto = None

    def setUp(self):
        super().setUp()
        # Trial runs cleanups before tearDown, last added first: this one runs
        # before ClassFixture's, which may stop the servers after the last test.
        self.addCleanup(self._servers_alive)

    def _servers_alive(self):
        if self.proxy.proc is None or self.proxy.proc.poll() is not None:
            self.fail("dgproxy died during the test:\n" + self.proxy.log()[-4000:])
        if self.moto.proc is None or self.moto.proc.poll() is not None:
            self.fail("moto_server died during the test:\n" + self.moto.log())

    # -- helpers ---------------------------------------------------------------------------
    def raw(self, key: str) -> bytes:
        return self.m.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def read_back(self, key: str, data: bytes, tag: Optional[str] = None) -> None:
        """GET and HEAD through dgproxy: byte-exact, right length, one ETag."""
        tag = tag or etag(data)
        got = self.s3.get_object(Bucket=self.bucket, Key=key)
        body = got["Body"].read()
        self.assertEqual(len(body), len(data), key)
        self.assertTrue(body == data, f"{key}: other bytes than were put")
        self.assertEqual(got["ContentLength"], len(data), key)
        self.assertEqual(got["ETag"], tag, key)
        head = self.s3.head_object(Bucket=self.bucket, Key=key)
        self.assertEqual((head["ContentLength"], head["ETag"]), (len(data), tag), key)

    def multipart(self, key: str, parts: list[bytes]) -> str:
        """A multipart upload through dgproxy; the ETag Complete answered."""
        bucket = self.bucket
        uid = self.s3.create_multipart_upload(Bucket=bucket, Key=key,
                                              ContentType="application/x-test")["UploadId"]
        done = []
        for n, body in enumerate(parts, 1):
            r = self.s3.upload_part(Bucket=bucket, Key=key, UploadId=uid, PartNumber=n, Body=body)
            self.assertEqual(r["ETag"], etag(body), (key, n))
            done.append({"PartNumber": n, "ETag": r["ETag"]})
        return self.s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=uid,
                                                 MultipartUpload={"Parts": done})["ETag"]


class MotoBackendTests(MotoBackendCase):

    def test_passthrough_round_trip_with_metadata(self):
        """Objects outside the delta extensions are stored under their own key,
        bytes verbatim, user metadata beside dgproxy's own."""
        cases = {"pt/empty.txt": b"", "pt/notes.txt": b"release notes\n" * 40,
                 "pt/blob.dat": random_bytes(1 * MiB + 17, seed=1)}
        for key, data in cases.items():
            put = self.put(key, data, ContentType="text/x-test",
                           Metadata={"Colour": "blue", "build-id": "42"})
            self.assertEqual(put["ETag"], etag(data), key)
        for key, data in cases.items():
            self.read_back(key, data)
            got = self.s3.get_object(Bucket=self.bucket, Key=key)
            self.assertEqual(got["ContentType"], "text/x-test", key)
            self.assertEqual(got["Metadata"], {"colour": "blue", "build-id": "42"}, key)
            self.assertEqual(self.s3.head_object(Bucket=self.bucket, Key=key)["Metadata"],
                             {"colour": "blue", "build-id": "42"}, key)
        # In moto: the same keys, the bytes verbatim, moto's own ETag is the MD5.
        self.assertEqual(self.stored("pt/"), {k: len(v) for k, v in cases.items()})
        for key, data in cases.items():
            self.assertTrue(self.raw(key) == data, key)
            self.assertEqual(self.m.head_object(Bucket=self.bucket, Key=key)["ETag"], etag(data))
        m = self.meta("pt/notes.txt")
        self.assertEqual((m.get("dg-note"), m.get("dg-compression")), ("passthrough", "none"))
        self.assertEqual((m.get("user-colour"), m.get("user-build-id")), ("blue", "42"))
        self.assertEqual(m.get("dg-file-size"), str(len(cases["pt/notes.txt"])))
        self.assertEqual(m.get("dg-file-sha256"), sha256_hex(cases["pt/notes.txt"]))
        listed = {o["Key"]: (o["Size"], o["ETag"]) for o in list_all(self.s3, self.bucket,
                                                                        Prefix="pt/")}
        self.assertEqual(listed, {k: (len(v), etag(v)) for k, v in cases.items()})

    def test_ranged_get(self):
        """Range forms on a passthrough object and on one stored as a delta: 206,
        Content-Range, exactly those bytes; a range past the end is 416."""
        plain = random_bytes(300_000, seed=2)
        self.put("rng/plain.dat", plain)
        zips = test_interop.zip_versions(2, seed=3)
        self.put("rng/app-1.zip", zips[0])
        self.put("rng/app-2.zip", zips[1])
        self.assertIn("rng/app-2.zip.delta", self.stored("rng/"))
        for key, data in (("rng/plain.dat", plain), ("rng/app-2.zip", zips[1])):
            n = len(data)
            for spec, lo, hi in (("bytes=100-199", 100, 199), ("bytes=-500", n - 500, n - 1),
                                 ("bytes=1000-", 1000, n - 1), ("bytes=0-0", 0, 0),
                                 (f"bytes={n - 10}-{n + 5000}", n - 10, n - 1)):
                got = self.s3.get_object(Bucket=self.bucket, Key=key, Range=spec)
                self.assertEqual(got["ResponseMetadata"]["HTTPStatusCode"], 206, (key, spec))
                self.assertEqual(got["ContentRange"], f"bytes {lo}-{hi}/{n}", (key, spec))
                self.assertEqual(got["ContentLength"], hi - lo + 1, (key, spec))
                self.assertTrue(got["Body"].read() == data[lo:hi + 1], (key, spec))
            for spec in (f"bytes={n}-", f"bytes={n + 100}-{n + 200}"):
                self.assertEqual(s3_error(self.s3.get_object, Bucket=self.bucket, Key=key,
                                          Range=spec), (416, "InvalidRange"), (key, spec))

    def test_zip_series_stored_as_deltas(self):
        """Successive .zip releases: one reference.bin and small .delta objects in
        moto; each read back byte-exact; LIST gives the original sizes and the
        ETags HEAD gives, and never the stored names."""
        zips = test_interop.zip_versions(4, seed=4)
        for i, data in enumerate(zips, 1):
            put = self.put(f"rel/app-{i}.zip", data, Metadata={"release": str(i)})
            self.assertEqual(put["ETag"], etag(data), i)
        self.put("rel/README.txt", b"read me\n")
        stored = self.stored("rel/")
        self.assertEqual(set(stored), {"rel/reference.bin", "rel/README.txt"}
                         | {f"rel/app-{i}.zip.delta" for i in range(1, 5)})
        self.assertEqual(stored["rel/reference.bin"], len(zips[0]))
        self.assertTrue(self.raw("rel/reference.bin") == zips[0])
        for i, data in enumerate(zips, 1):
            self.assertLess(stored[f"rel/app-{i}.zip.delta"], len(data) // 10, i)
            m = self.meta(f"rel/app-{i}.zip.delta")
            self.assertEqual(m.get("dg-note"), "delta", i)
            self.assertEqual(m.get("dg-ref-key"), "rel/reference.bin", i)
            self.assertEqual(m.get("dg-file-sha256"), sha256_hex(data), i)
            self.assertEqual(m.get("user-release"), str(i), i)
        for i, data in enumerate(zips, 1):
            self.read_back(f"rel/app-{i}.zip", data)
            self.assertEqual(self.s3.head_object(Bucket=self.bucket, Key=f"rel/app-{i}.zip")
                             ["Metadata"], {"release": str(i)})

        expect = {f"rel/app-{i}.zip": d for i, d in enumerate(zips, 1)}
        expect["rel/README.txt"] = b"read me\n"
        listed = list_all(self.s3, self.bucket, Prefix="rel/")
        self.assertEqual([o["Key"] for o in listed], sorted(expect))
        for o in listed:
            self.assertEqual(o["Size"], len(expect[o["Key"]]), o["Key"])
            self.assertEqual(o["ETag"], self.s3.head_object(Bucket=self.bucket, Key=o["Key"])
                             ["ETag"], o["Key"])
            self.assertEqual(o["ETag"], etag(expect[o["Key"]]), o["Key"])
        v1 = self.s3.list_objects(Bucket=self.bucket, Prefix="rel/")["Contents"]
        self.assertEqual([(o["Key"], o["Size"]) for o in v1],
                         [(k, len(expect[k])) for k in sorted(expect)])
        page = self.s3.list_objects_v2(Bucket=self.bucket, Delimiter="/")
        names = [o["Key"] for o in page.get("Contents", [])]
        names += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
        self.assertIn("rel/", names)
        self.assertFalse([k for k in names if "reference.bin" in k or k.endswith(".delta")])

    def test_keys_with_odd_characters(self):
        """Non-ASCII, '+', '%20', XML's '&<>' and a control character in keys:
        stored, read back, listed as they are (moto's listing is URL-encoded
        for such keys), also in a non-ASCII deltaspace."""
        bucket = "dgp-moto-odd-keys"
        self.s3.create_bucket(Bucket=bucket)
        keys = ["odd/r\u00e9sum\u00e9.txt", "odd/\u4e2d\u6587 \u6587\u4ef6.dat",
                "odd/a+b.txt", "odd/a%20b.txt", "odd/a b.txt", "odd/x&y<z>.txt",
                "odd/ctl\x01char.txt", "odd/emoji-\U0001F600.txt"]
        bodies = {k: random_bytes(100 + i, seed=50 + i) for i, k in enumerate(keys)}
        for key, body in bodies.items():
            self.s3.put_object(Bucket=bucket, Key=key, Body=body, Metadata={"n": "1"})
        zips = test_interop.zip_versions(2, seed=5)
        for i, data in enumerate(zips):
            key = f"odd/\u00e9t\u00e9 &+/app-{i}.zip"
            bodies[key] = data
            self.s3.put_object(Bucket=bucket, Key=key, Body=data)
        in_moto = stored_objects(self.m, bucket, "odd/")
        self.assertIn("odd/\u00e9t\u00e9 &+/reference.bin", in_moto)
        self.assertIn("odd/\u00e9t\u00e9 &+/app-1.zip.delta", in_moto)
        for key in keys:  # passthrough keys are the user's keys upstream too
            self.assertEqual(in_moto.get(key), len(bodies[key]), repr(key))
        for key, body in bodies.items():
            got = self.s3.get_object(Bucket=bucket, Key=key)
            self.assertTrue(got["Body"].read() == body, repr(key))
            self.assertEqual(got["ContentLength"], len(body), repr(key))
            self.assertEqual(got["ETag"], etag(body), repr(key))
        self.assertEqual(self.s3.head_object(Bucket=bucket, Key="odd/ctl\x01char.txt")["Metadata"],
                         {"n": "1"})
        listed = list_all(self.s3, bucket, Prefix="odd/")
        self.assertEqual([o["Key"] for o in listed], sorted(bodies))
        self.assertEqual({o["Key"]: o["Size"] for o in listed},
                         {k: len(v) for k, v in bodies.items()})
        page = self.s3.list_objects_v2(Bucket=bucket, Prefix="odd/", Delimiter="/")
        self.assertEqual([p["Prefix"] for p in page.get("CommonPrefixes", [])],
                         ["odd/\u00e9t\u00e9 &+/"])
        self.assertEqual([o["Key"] for o in page["Contents"]], sorted(keys))
        for key in bodies:
            self.s3.delete_object(Bucket=bucket, Key=key)
        self.assertEqual(list_all(self.s3, bucket), [])
        self.assertEqual(stored_objects(self.m, bucket, "odd/"), {})

    def test_multipart_plain_name_joined_in_moto(self):
        """A .dat in two parts (5 MiB + 1.5 MiB): upstream it is a multipart upload
        of the stored parts, joined inside moto (UploadPartCopy), so moto's ETag
        is '-2'; dgproxy's Complete, HEAD, GET and LIST all give the client's
        multipart ETag; no upload state is left behind."""
        data = big_versions(seed=6)[0]
        parts = [data[:5 * MiB], data[5 * MiB:]]
        expect = multipart_etag(parts)
        self.assertEqual(self.multipart("mp/disk.dat", parts), expect)
        self.read_back("mp/disk.dat", data, tag=expect)
        self.assertEqual(self.s3.head_object(Bucket=self.bucket, Key="mp/disk.dat")["ContentType"],
                         "application/x-test")
        listed = self.s3.list_objects_v2(Bucket=self.bucket, Prefix="mp/")["Contents"]
        self.assertEqual([(o["Key"], o["Size"], o["ETag"]) for o in listed],
                         [("mp/disk.dat", len(data), expect)])
        got = self.s3.get_object(Bucket=self.bucket, Key="mp/disk.dat",
                                 Range=f"bytes={5 * MiB - 100}-{5 * MiB + 99}")
        self.assertTrue(got["Body"].read() == data[5 * MiB - 100:5 * MiB + 100])
        for n, body in enumerate(parts, 1):  # as SDKs that download by part ask
            got = self.s3.get_object(Bucket=self.bucket, Key="mp/disk.dat", PartNumber=n)
            self.assertEqual(got["PartsCount"], 2)
            self.assertTrue(got["Body"].read() == body, n)

        self.assertEqual(self.stored("mp/"), {"mp/disk.dat": len(data)})
        head = self.m.head_object(Bucket=self.bucket, Key="mp/disk.dat")
        self.assertRegex(head["ETag"], r'^"[0-9a-f]{32}-2"$', "the client's parts, joined in moto")
        self.assertEqual(head["Metadata"].get("dg-multipart-etag", "").strip('"'),
                         expect.strip('"'))
        self.assertTrue(self.raw("mp/disk.dat") == data)
        self.assertEqual(self.stored(".dg/multipart/"), {}, "upload state left behind")
        self.assertFalse([o["Key"] for o in list_all(self.s3, self.bucket)
                          if o["Key"].startswith(".dg")])

    def test_multipart_zip_becomes_delta(self):
        """Two .zip releases, each uploaded in two parts: delta candidates, assembled
        in dgproxy's spool. The first seeds the deltaspace's reference, the second
        is a small delta; both read back byte-exact with their multipart ETags,
        in LIST too."""
        versions = big_versions(seed=7)
        tags = []
        for i, data in enumerate(versions, 1):
            parts = [data[:5 * MiB], data[5 * MiB:]]
            tags.append(multipart_etag(parts))
            self.assertEqual(self.multipart(f"mpz/app-{i}.zip", parts), tags[-1], i)
        stored = self.stored("mpz/")
        self.assertEqual(set(stored), {"mpz/reference.bin", "mpz/app-1.zip.delta",
                                       "mpz/app-2.zip.delta"})
        self.assertEqual(stored["mpz/reference.bin"], len(versions[0]))
        self.assertLess(stored["mpz/app-2.zip.delta"], 64 * 1024)
        for i, (data, tag) in enumerate(zip(versions, tags), 1):
            self.read_back(f"mpz/app-{i}.zip", data, tag=tag)
        listed = self.s3.list_objects_v2(Bucket=self.bucket, Prefix="mpz/")["Contents"]
        self.assertEqual([(o["Key"], o["Size"], o["ETag"]) for o in listed],
                         [(f"mpz/app-{i}.zip", len(d), t)
                          for i, (d, t) in enumerate(zip(versions, tags), 1)])
        self.assertEqual(self.stored(".dg/multipart/"), {}, "upload state left behind")

    def test_multipart_zip_that_stays_whole(self):
        """A .zip in parts that does not compress against its deltaspace's
        reference is stored whole, as an upstream multipart upload sent from
        the spool; still the client's multipart ETag everywhere."""
        self.put("mpw/small.zip", random_bytes(2000, seed=8))
        data = random_bytes(5 * MiB + 4321, seed=9)
        parts = [data[:5 * MiB], data[5 * MiB:]]
        expect = multipart_etag(parts)
        self.assertEqual(self.multipart("mpw/big.zip", parts), expect)
        stored = self.stored("mpw/")
        self.assertEqual(set(stored), {"mpw/reference.bin", "mpw/small.zip.delta", "mpw/big.zip"})
        self.assertEqual(stored["mpw/big.zip"], len(data))
        self.assertRegex(self.m.head_object(Bucket=self.bucket, Key="mpw/big.zip")["ETag"],
                         r'^"[0-9a-f]{32}-\d+"$', "an upstream multipart upload")
        self.read_back("mpw/big.zip", data, tag=expect)
        listed = {o["Key"]: o["ETag"] for o in list_all(self.s3, self.bucket, Prefix="mpw/")}
        self.assertEqual(listed, {"mpw/big.zip": expect,
                                  "mpw/small.zip": etag(random_bytes(2000, seed=8))})

    def test_copy_object(self):
        """CopyObject of a passthrough object and of a delta: same bytes, metadata
        kept (COPY) or replaced (REPLACE); the delta copy seeds the target
        deltaspace's reference in moto; a missing source is NoSuchKey."""
        zips = test_interop.zip_versions(2, seed=10)
        self.put("cp/src/app-1.zip", zips[0])
        self.put("cp/src/app-2.zip", zips[1], Metadata={"origin": "ci"},
                 ContentType="application/zip")
        self.put("cp/src/readme.txt", b"read me", Metadata={"lang": "en"})
        r = self.s3.copy_object(Bucket=self.bucket, Key="cp/dst/app-2.zip",
                                CopySource={"Bucket": self.bucket, "Key": "cp/src/app-2.zip"})
        self.assertEqual(r["CopyObjectResult"]["ETag"], etag(zips[1]))
        got = self.s3.get_object(Bucket=self.bucket, Key="cp/dst/app-2.zip")
        self.assertTrue(got["Body"].read() == zips[1])
        self.assertEqual(got["ETag"], etag(zips[1]))
        self.assertEqual(got["Metadata"], {"origin": "ci"})
        self.assertEqual(got["ContentType"], "application/zip")
        self.assertEqual(set(self.stored("cp/dst/")), {"cp/dst/reference.bin",
                                                      "cp/dst/app-2.zip.delta"})
        self.assertTrue(self.raw("cp/dst/reference.bin") == zips[1])

        self.s3.copy_object(Bucket=self.bucket, Key="cp/dst/readme.txt",
                            CopySource={"Bucket": self.bucket, "Key": "cp/src/readme.txt"},
                            MetadataDirective="REPLACE", Metadata={"lang": "fr"},
                            ContentType="text/plain")
        got = self.s3.get_object(Bucket=self.bucket, Key="cp/dst/readme.txt")
        self.assertEqual(got["Body"].read(), b"read me")
        self.assertEqual((got["Metadata"], got["ContentType"]), ({"lang": "fr"}, "text/plain"))
        self.assertEqual(self.meta("cp/dst/readme.txt").get("user-lang"), "fr")
        self.assertEqual(self.s3.head_object(Bucket=self.bucket, Key="cp/src/readme.txt")
                         ["Metadata"], {"lang": "en"})
        self.assertEqual(s3_error(self.s3.copy_object, Bucket=self.bucket, Key="cp/x.txt",
                                  CopySource={"Bucket": self.bucket, "Key": "cp/none.txt"}),
                         (404, "NoSuchKey"))
        self.assertNotIn("cp/x.txt", self.stored("cp/"))

    def test_delete_objects(self):
        """DeleteObjects: every key reported deleted (a missing one too, as on
        AWS); a deltaspace's reference stays in moto while one of its objects
        is left, and goes with the last."""
        zips = test_interop.zip_versions(2, seed=11)
        self.put("del/app-1.zip", zips[0])
        self.put("del/app-2.zip", zips[1])
        self.put("del/a.txt", b"a")
        self.put("del/keep.txt", b"keep")
        result = self.s3.delete_objects(Bucket=self.bucket, Delete={"Objects": [
            {"Key": "del/app-1.zip"}, {"Key": "del/app-2.zip"}, {"Key": "del/a.txt"},
            {"Key": "del/never-existed.txt"}]})
        self.assertEqual(sorted(d["Key"] for d in result.get("Deleted", [])),
                         ["del/a.txt", "del/app-1.zip", "del/app-2.zip", "del/never-existed.txt"])
        self.assertEqual(result.get("Errors", []), [])
        self.assertEqual([o["Key"] for o in list_all(self.s3, self.bucket, Prefix="del/")],
                         ["del/keep.txt"])
        self.assertEqual(s3_error(self.s3.get_object, Bucket=self.bucket, Key="del/app-2.zip"),
                         (404, "NoSuchKey"))
        # A reference.bin left here belongs to no listed object: still, dgproxy
        # keeps it until the deltaspace is empty (SPEC §4) ...
        self.assertEqual(set(self.stored("del/")), {"del/keep.txt", "del/reference.bin"})
        quiet = self.s3.delete_objects(Bucket=self.bucket, Delete={
            "Objects": [{"Key": "del/keep.txt"}], "Quiet": True})
        self.assertEqual(quiet.get("Deleted", []), [])
        self.assertEqual(quiet.get("Errors", []), [])
        # ... and removes it with the last one.
        self.assertEqual(self.stored("del/"), {})

    def test_errors(self):
        """The S3 errors a client meets: NoSuchKey, NoSuchBucket, BucketNotEmpty,
        and PreconditionFailed for If-None-Match: * on an existing key."""
        get, head = self.s3.get_object, self.s3.head_object
        self.assertEqual(s3_error(get, Bucket=self.bucket, Key="err/none.txt"), (404, "NoSuchKey"))
        self.assertEqual(s3_error(get, Bucket=self.bucket, Key="err/none.zip"), (404, "NoSuchKey"))
        self.assertEqual(s3_error(head, Bucket=self.bucket, Key="err/none.txt")[0], 404)
        self.assertEqual(s3_error(get, Bucket="dgp-moto-no-such-bucket", Key="x.txt"),
                         (404, "NoSuchBucket"))
        self.assertEqual(s3_error(self.s3.list_objects_v2, Bucket="dgp-moto-no-such-bucket"),
                         (404, "NoSuchBucket"))
        self.assertEqual(s3_error(self.s3.put_object, Bucket="dgp-moto-no-such-bucket",
                                  Key="x.txt", Body=b"x"), (404, "NoSuchBucket"))
        self.assertEqual(s3_error(self.s3.head_bucket, Bucket="dgp-moto-no-such-bucket")[0], 404)

        # If-None-Match: * creates once, then refuses and keeps the first body.
        self.put("err/once.txt", b"first", IfNoneMatch="*")
        self.assertEqual(s3_error(self.put, "err/once.txt", b"second", IfNoneMatch="*"),
                         (412, "PreconditionFailed"))
        self.assertEqual(self.get("err/once.txt"), b"first")
        zips = test_interop.zip_versions(2, seed=12)
        self.put("err/app-1.zip", zips[0])
        self.assertEqual(s3_error(self.put, "err/app-1.zip", zips[1], IfNoneMatch="*"),
                         (412, "PreconditionFailed"))
        self.assertEqual(self.get("err/app-1.zip"), zips[0])

        # A bucket with an object in it cannot be deleted; an empty one can.
        bucket = "dgp-moto-not-empty"
        self.s3.create_bucket(Bucket=bucket)
        self.assertIn(bucket, [b["Name"] for b in self.m.list_buckets()["Buckets"]])
        self.s3.put_object(Bucket=bucket, Key="keep.txt", Body=b"keep")
        self.assertEqual(s3_error(self.s3.delete_bucket, Bucket=bucket), (409, "BucketNotEmpty"))
        self.assertEqual(self.s3.get_object(Bucket=bucket, Key="keep.txt")["Body"].read(), b"keep")
        self.s3.delete_object(Bucket=bucket, Key="keep.txt")
        self.s3.delete_bucket(Bucket=bucket)
        self.assertNotIn(bucket, [b["Name"] for b in self.m.list_buckets()["Buckets"]])
        self.assertEqual(s3_error(self.s3.head_bucket, Bucket=bucket)[0], 404)

    # -- conditional writes, as AWS answers them ----------------------------------------------
    def test_put_if_match_on_missing_key_is_no_such_key(self):
        """PutObject with `If-Match: <etag>` on a key that does not exist: AWS
        S3 answers 404 NoSuchKey (moto's test_put_object_if_match is verified
        against AWS), and so do moto and dgproxy, so that a compare-and-swap
        client can tell "someone changed it" from "it is gone"."""
        tag = etag(b"whatever")
        self.assertEqual(s3_error(self.m.put_object, Bucket=self.bucket, Key="cond/direct.txt",
                                  Body=b"x", IfMatch=tag), (404, "NoSuchKey"), "moto itself")
        self.assertEqual(s3_error(self.put, "cond/missing.txt", b"x", IfMatch=tag),
                         (404, "NoSuchKey"))
        self.assertNotIn("cond/missing.txt", self.stored("cond/"))

    def test_complete_multipart_if_none_match_keeps_existing_object(self):
        """CompleteMultipartUpload with `If-None-Match: *` on a key that
        exists: AWS S3 refuses it with 412 PreconditionFailed and keeps the
        object (moto's test_multipart_upload__if_none_match__put_object,
        verified against AWS); so do moto and dgproxy."""
        old = b"the original object\n"
        self.put("cond/mp.dat", old)
        parts = [random_bytes(5 * MiB, seed=30), b"tail"]
        uid = self.s3.create_multipart_upload(Bucket=self.bucket, Key="cond/mp.dat")["UploadId"]
        try:
            done = [{"PartNumber": n, "ETag": self.s3.upload_part(
                Bucket=self.bucket, Key="cond/mp.dat", UploadId=uid, PartNumber=n,
                Body=body)["ETag"]} for n, body in enumerate(parts, 1)]
            try:
                self.s3.complete_multipart_upload(
                    Bucket=self.bucket, Key="cond/mp.dat", UploadId=uid, IfNoneMatch="*",
                    MultipartUpload={"Parts": done})
                code = "none: the Complete succeeded"
            except ClientError as e:
                code = e.response["Error"]["Code"]
            now = self.get("cond/mp.dat")
            self.assertEqual((code, len(now), now == old), ("PreconditionFailed", len(old), True),
                             "(error, size of cond/mp.dat, still the original?)")
        finally:
            try:
                self.s3.abort_multipart_upload(Bucket=self.bucket, Key="cond/mp.dat", UploadId=uid)
            except Exception:
                pass  # completed after all, or already gone

    def test_aws_s3_sync_up_and_down(self):
        """`aws s3 sync` of a small tree (zip releases, text, nested dirs) up and
        down through dgproxy: the same bytes come back; a second sync either way
        transfers nothing, since LIST gives the original sizes."""
        tmp = tempfile.mkdtemp(prefix="dgp-moto-sync-")
        try:
            src, dst = os.path.join(tmp, "src"), os.path.join(tmp, "dst")
            files = {f"releases/app-{i}.zip": d
                     for i, d in enumerate(test_interop.zip_versions(3, seed=13), 1)}
            files.update({"README.md": b"# tree\n" * 10, "docs/a b.txt": b"spaces\n",
                          "docs/deep/er/note.txt": random_bytes(3000, seed=14),
                          "empty.txt": b""})
            for rel, data in files.items():
                path = os.path.join(src, rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(data)
                # Built an hour ago: sync uploads a file whose mtime is newer than
                # its LastModified, which S3 gives in whole seconds.
                os.utime(path, (time.time() - 3600,) * 2)
            url = f"s3://{self.bucket}/sync/"
            self.proxy.aws("s3", "sync", "--only-show-errors", src, url)
            stored = self.stored("sync/")
            self.assertIn("sync/releases/reference.bin", stored)
            self.assertLess(stored["sync/releases/app-3.zip.delta"],
                            len(files["releases/app-3.zip"]) // 10)
            again = self.proxy.aws("s3", "sync", src, url)
            self.assertEqual(again.stdout.decode().strip(), "", "second sync up uploaded again")

            self.proxy.aws("s3", "sync", "--only-show-errors", url, dst)
            got = read_tree(dst)
            self.assertEqual(sorted(got), sorted(files))
            for rel, data in files.items():
                self.assertTrue(got[rel] == data, rel)
            again = self.proxy.aws("s3", "sync", url, dst)
            self.assertEqual(again.stdout.decode().strip(), "", "second sync down fetched again")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


class MotoEncryptedBackendTests(MotoBackendCase):
    """dgproxy encrypting (aes256-gcm-proxy) what it stores in moto."""

    bucket = "dgp-moto-enc"
    proxy_env = {"DGP_ENCRYPTION_KEY": ENCRYPTION_KEY}
    config_yaml = ENCRYPTION_CONFIG

    def assert_ciphertext(self, key: str, plaintext: bytes) -> bytes:
        raw = self.raw(key)
        self.assertGreater(len(raw), len(plaintext), key)
        self.assertEqual(raw[:4], b"DGE1", key)
        self.assertNotEqual(raw[:len(plaintext)], plaintext, key)
        if len(plaintext) >= 64:
            self.assertNotIn(plaintext[:64], raw, key)
        self.assertEqual(self.meta(key).get("user-dg-encrypted"), "aes-256-gcm-chunked-v1", key)
        return raw

    def test_stored_bytes_are_ciphertext(self):
        """Passthrough, reference and delta blobs in moto are DGE1 ciphertext,
        larger than the plaintext; dgproxy reads them back byte-exact, with the
        plaintext's sizes and ETags, ranges too."""
        text = b"a secret line that must not be readable in the backend\n" * 200
        self.put("enc/secret.txt", text, Metadata={"k": "v"})
        zips = test_interop.zip_versions(2, seed=20)
        self.put("enc/rel/app-1.zip", zips[0])
        self.put("enc/rel/app-2.zip", zips[1])
        self.assertEqual(set(self.stored("enc/")), {
            "enc/secret.txt", "enc/rel/reference.bin", "enc/rel/app-1.zip.delta",
            "enc/rel/app-2.zip.delta"})
        self.assert_ciphertext("enc/secret.txt", text)
        self.assert_ciphertext("enc/rel/reference.bin", zips[0])
        self.assertNotIn(b"a secret line", self.raw("enc/secret.txt"))
        delta = self.raw("enc/rel/app-2.zip.delta")
        self.assertEqual(delta[:4], b"DGE1")

        self.read_back("enc/secret.txt", text)
        self.assertEqual(self.s3.head_object(Bucket=self.bucket, Key="enc/secret.txt")
                         ["Metadata"], {"k": "v"})
        for i, data in enumerate(zips, 1):
            self.read_back(f"enc/rel/app-{i}.zip", data)
        got = self.s3.get_object(Bucket=self.bucket, Key="enc/rel/app-2.zip", Range="bytes=-500")
        self.assertTrue(got["Body"].read() == zips[1][-500:])
        got = self.s3.get_object(Bucket=self.bucket, Key="enc/secret.txt", Range="bytes=100-199")
        self.assertEqual(got["Body"].read(), text[100:200])
        listed = {o["Key"]: (o["Size"], o["ETag"])
                  for o in list_all(self.s3, self.bucket, Prefix="enc/")}
        self.assertEqual(listed, {"enc/secret.txt": (len(text), etag(text)),
                                  "enc/rel/app-1.zip": (len(zips[0]), etag(zips[0])),
                                  "enc/rel/app-2.zip": (len(zips[1]), etag(zips[1]))})

    def test_multipart_upload_is_encrypted(self):
        """A .dat in parts, under proxy-side encryption, is not joined inside moto
        from the (encrypted) parts but sent encrypted from the spool: moto holds
        ciphertext; dgproxy serves the plaintext with the multipart ETag."""
        data = big_versions(seed=21)[0]
        parts = [data[:5 * MiB], data[5 * MiB:]]
        expect = multipart_etag(parts)
        self.assertEqual(self.multipart("encmp/disk.dat", parts), expect)
        self.assertEqual(set(self.stored("encmp/")), {"encmp/disk.dat"})
        self.assert_ciphertext("encmp/disk.dat", data)
        self.read_back("encmp/disk.dat", data, tag=expect)
        listed = self.s3.list_objects_v2(Bucket=self.bucket, Prefix="encmp/")["Contents"]
        self.assertEqual([(o["Key"], o["Size"], o["ETag"]) for o in listed],
                         [("encmp/disk.dat", len(data), expect)])
        # The parts in moto were encrypted too, and are gone now.
        self.assertEqual(self.stored(".dg/multipart/"), {})
