"""End-to-end: two-way interop with the Python `deltaglider` tool on one SeaweedFS.

SPEC §3: objects written through dgproxy's S3 backend must be readable by the
Python tool, and objects the tool wrote must be readable through dgproxy
(reference/anchor-storage.md §10). The tool talks to SeaweedFS directly
(`deltaglider cp`, endpoint from AWS_ENDPOINT_URL, credentials from
AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY); dgproxy has the same SeaweedFS as
its only backend.

`deltaglider` pins old dependencies, so it lives in its own virtualenv,
created on first use under `.cache/deltaglider-venv` in the repository and
reused after that. Without PyPI the tests are skipped, saying why.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import subprocess
import tempfile
import zipfile
from typing import Optional

from botocore.exceptions import ClientError
from twisted.trial import unittest

from tests.e2e.harness import ProxyProcess
from tests.e2e.seaweed import WEED_ACCESS_KEY, WEED_SECRET_KEY
from tests.e2e.test_s3_backend import (
    ClassFixture, WeedServer, etag, list_all, md5_hex, random_bytes, stored_meta,
    stored_objects, tar_versions)
from tests.e2e.toolvenv import CACHE, ensure_tool

DG_VENV = os.path.join(CACHE, "deltaglider-venv")
DG_BIN = os.path.join(DG_VENV, "bin", "deltaglider")
DG_REQUIREMENT = "deltaglider>=6,<7"
BUCKET = "interop"


def ensure_deltaglider() -> None:
    """Install the tool into its own virtualenv unless it is there already;
    L{unittest.SkipTest} when that cannot be done (no PyPI, no venv)."""
    ensure_tool(DG_VENV, DG_REQUIREMENT, ["deltaglider", "--version"],
                env={"DG_SUPPRESS_DEPRECATION": "1"})


def zip_versions(n: int, seed: int) -> list[bytes]:
    """Successive zip releases (stored, not deflated) of a tree of random files."""
    rng = random.Random(seed)
    tree = {f"lib/mod{i}.bin": rng.randbytes(30_000) for i in range(8)}
    out = []
    for v in range(n):
        if v:
            name = f"lib/mod{rng.randrange(8)}.bin"
            body = bytearray(tree[name])
            at = rng.randrange(len(body) - 500)
            body[at:at + 400] = rng.randbytes(400)
            tree[name] = bytes(body)
            tree["VERSION"] = f"{v}\n".encode()
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
            for name in sorted(tree):
                info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
                z.writestr(info, tree[name])
        out.append(buf.getvalue())
    return out


class InteropTests(ClassFixture, unittest.TestCase):
    weed: Optional[WeedServer] = None
    proxy: Optional[ProxyProcess] = None
    tmp: Optional[str] = None

    @classmethod
    def setUpClass(cls):
        ensure_deltaglider()
        cls.weed = WeedServer()  # assigned before start: tearDownClass stops it
        cls.weed.start()
        cls.w = cls.weed.client()
        cls.w.create_bucket(Bucket=BUCKET)
        cls.proxy = ProxyProcess(env=cls.weed.backend_env())
        cls.proxy.start()
        cls.s3 = cls.proxy.client()
        cls.tmp = tempfile.mkdtemp(prefix="dgp-interop-")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DG_"))}
        env.update({
            "AWS_ENDPOINT_URL": cls.weed.endpoint,
            "AWS_ACCESS_KEY_ID": WEED_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": WEED_SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",   # no instance-metadata probes
            "DG_DISABLE_EC2_DETECTION": "true",    # the tool's own EC2 region check
            "DG_SUPPRESS_DEPRECATION": "1",
            "DG_LOG_LEVEL": "WARNING",
            "TMPDIR": cls.tmp,                      # its temporary delta files
        })
        cls.dg_env = env

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        if cls.tmp is not None:
            shutil.rmtree(cls.tmp, ignore_errors=True)
            cls.tmp = None

    # -- helpers ---------------------------------------------------------------------------
    def dg(self, *args: str) -> str:
        proc = subprocess.run([DG_BIN, *args], env=self.dg_env, capture_output=True, text=True,
                              timeout=120, cwd=self.tmp)
        if proc.returncode != 0:
            raise AssertionError(f"deltaglider {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc.stdout

    def local(self, name: str, data: bytes) -> str:
        path = os.path.join(self.tmp, "src", name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def dg_upload(self, key: str, data: bytes, *flags: str) -> None:
        """`deltaglider cp FILE s3://BUCKET/KEY`, with KEY's last segment equal to
        FILE's name. deltaglider 6.2.0 strips a trailing '/' from the URL and
        takes what is left as the key: its parent becomes the deltaspace and the
        stored name is the local file's, so `cp f.zip s3://b/dir/` lands in
        `b/f.zip` (`b/dir` itself with --no-delta)."""
        self.dg("cp", "-q", *flags, self.local(key.rpartition("/")[2], data), f"s3://{BUCKET}/{key}")

    def dg_download(self, key: str) -> bytes:
        out = os.path.join(self.tmp, "out", key.replace("/", "_"))
        os.makedirs(os.path.dirname(out), exist_ok=True)
        if os.path.exists(out):
            os.unlink(out)
        self.dg("cp", "-q", f"s3://{BUCKET}/{key}", out)
        with open(out, "rb") as f:
            return f.read()

    def proxy_read(self, key: str, data: bytes) -> None:
        """dgproxy serves C{key} byte-exact, with a consistent ETag."""
        got = self.s3.get_object(Bucket=BUCKET, Key=key)
        body = got["Body"].read()
        self.assertEqual(len(body), len(data), key)
        self.assertEqual(body, data, key)
        self.assertEqual(got["ContentLength"], len(data), key)
        head = self.s3.head_object(Bucket=BUCKET, Key=key)
        self.assertEqual(head["ContentLength"], len(data), key)
        self.assertEqual(head["ETag"], got["ETag"], key)
        self.assertGreater(len(got["ETag"].strip('"')), 0, key)

    # -- Python tool writes, dgproxy reads -----------------------------------------------------
    def test_python_uploads_read_through_dgproxy(self):
        zips = zip_versions(3, seed=41)
        tars = tar_versions(3, seed=42)
        notes = b"release notes\n" * 100
        raw = random_bytes(50_000, seed=43)
        for i, data in enumerate(zips, 1):
            self.dg_upload(f"py/zips/app-{i}.zip", data)
        for i, data in enumerate(tars, 1):
            self.dg_upload(f"py/tars/app-{i}.tar", data)
        self.dg_upload("py/notes.txt", notes)
        self.dg_upload("py/raw/raw.zip", raw, "--no-delta")

        # What the tool stored: reference + zero-diff delta + deltas; direct; bare.
        stored = stored_objects(self.w, BUCKET, "py/")
        self.assertEqual(set(stored), {
            "py/zips/reference.bin", "py/zips/app-1.zip.delta", "py/zips/app-2.zip.delta",
            "py/zips/app-3.zip.delta", "py/tars/reference.bin", "py/tars/app-1.tar.delta",
            "py/tars/app-2.tar.delta", "py/tars/app-3.tar.delta", "py/notes.txt",
            "py/raw/raw.zip"})
        self.assertEqual(stored["py/zips/reference.bin"], len(zips[0]))
        self.assertLess(stored["py/zips/app-3.zip.delta"], len(zips[2]) // 10)
        m = stored_meta(self.w, BUCKET, "py/zips/app-2.zip.delta")
        self.assertEqual(m.get("dg-ref-key"), "py/zips/reference.bin")
        self.assertNotIn("dg-ref-path", m)
        self.assertNotIn("dg-md5", m)
        self.assertTrue(stored_meta(self.w, BUCKET, "py/zips/app-1.zip.delta")
                        .get("dg-note", "").startswith("zero-diff"))
        self.assertEqual(stored_meta(self.w, BUCKET, "py/notes.txt").get("dg-compression"), "none")
        self.assertEqual(stored_meta(self.w, BUCKET, "py/raw/raw.zip"), {})

        expected = {f"py/zips/app-{i}.zip": d for i, d in enumerate(zips, 1)}
        expected.update({f"py/tars/app-{i}.tar": d for i, d in enumerate(tars, 1)})
        expected.update({"py/notes.txt": notes, "py/raw/raw.zip": raw})
        for key, data in expected.items():
            self.proxy_read(key, data)
        # Objects stored whole keep their MD5 ETag.
        for key in ("py/notes.txt", "py/raw/raw.zip"):
            self.assertEqual(self.s3.head_object(Bucket=BUCKET, Key=key)["ETag"],
                             etag(expected[key]), key)
        # Range over a Python-written delta.
        got = self.s3.get_object(Bucket=BUCKET, Key="py/zips/app-3.zip", Range="bytes=1000-2999")
        self.assertEqual(got["Body"].read(), zips[2][1000:3000])

        # LIST: user keys, original sizes, the same ETags as HEAD.
        listed = {o["Key"]: o for o in list_all(self.s3, BUCKET, Prefix="py/")}
        self.assertEqual(set(listed), set(expected))
        for key, data in expected.items():
            self.assertEqual(listed[key]["Size"], len(data), key)
            self.assertEqual(listed[key]["ETag"],
                             self.s3.head_object(Bucket=BUCKET, Key=key)["ETag"], key)
        page = self.s3.list_objects_v2(Bucket=BUCKET, Prefix="py/", Delimiter="/")
        self.assertEqual([o["Key"] for o in page["Contents"]], ["py/notes.txt"])
        self.assertEqual([p["Prefix"] for p in page["CommonPrefixes"]],
                         ["py/raw/", "py/tars/", "py/zips/"])

        # Deleting the series through dgproxy takes the tool's reference with it.
        for i in (1, 2, 3):
            self.s3.delete_object(Bucket=BUCKET, Key=f"py/zips/app-{i}.zip")
        self.assertEqual(stored_objects(self.w, BUCKET, "py/zips/"), {})

    def test_python_gzip_series_read_through_dgproxy(self):
        """gzip-compressed releases, made as `tar czf` makes them (`gzip -c`).

        The tool runs xdelta3 without -D, so xdelta3 decompresses source and
        target before encoding, records that in the delta, and recompresses on
        decode (`gzip -c`): the tool reads these back byte-exact. dgproxy always
        decodes with -D, which cannot rebuild them."""
        tars = tar_versions(3, seed=44)
        gzs = [subprocess.run(["gzip", "-c"], input=t, capture_output=True, check=True).stdout
               for t in tars]
        for i, data in enumerate(gzs, 1):
            self.dg_upload(f"pygz/app-{i}.tar.gz", data)
        stored = stored_objects(self.w, BUCKET, "pygz/")
        self.assertEqual(set(stored), {"pygz/reference.bin", "pygz/app-1.tar.gz.delta",
                                       "pygz/app-2.tar.gz.delta", "pygz/app-3.tar.gz.delta"})
        if self.dg_download("pygz/app-2.tar.gz") != gzs[1]:
            raise unittest.SkipTest("deltaglider cannot read back its own gzip deltas here")
        for i, data in enumerate(gzs, 1):
            key = f"pygz/app-{i}.tar.gz"
            try:
                got = self.s3.get_object(Bucket=BUCKET, Key=key)
            except ClientError as e:
                # Whatever else: never other bytes, and an integrity failure is a 500.
                self.assertEqual(e.response["Error"]["Code"], "InternalError", key)
                self.fail(f"{key}: dgproxy cannot rebuild a delta the Python tool wrote "
                          f"(500 InternalError; the tool itself reads it back)")
            self.assertEqual(got["Body"].read(), data, key)
            self.assertEqual(got["ContentLength"], len(data), key)


    # -- dgproxy writes, Python tool reads ----------------------------------------------------
    def test_dgproxy_uploads_read_by_python(self):
        tars = tar_versions(3, seed=45)
        readme = b"read me through the python tool\n" * 20
        for i, data in enumerate(tars, 1):
            self.s3.put_object(Bucket=BUCKET, Key=f"dg/rel/app-{i}.tar", Body=data,
                               Metadata={"build": str(i)})
        self.s3.put_object(Bucket=BUCKET, Key="dg/readme.txt", Body=readme)
        self.s3.put_object(Bucket=BUCKET, Key="dg/empty.txt", Body=b"")
        stored = stored_objects(self.w, BUCKET, "dg/")
        self.assertEqual(set(stored), {"dg/rel/reference.bin", "dg/rel/app-1.tar.delta",
                                       "dg/rel/app-2.tar.delta", "dg/rel/app-3.tar.delta",
                                       "dg/readme.txt", "dg/empty.txt"})
        for i, data in enumerate(tars, 1):
            self.assertEqual(self.dg_download(f"dg/rel/app-{i}.tar"), data, i)
        # ... also when asked for the stored .delta key directly.
        self.assertEqual(self.dg_download("dg/rel/app-3.tar.delta"), tars[2])
        self.assertEqual(self.dg_download("dg/readme.txt"), readme)
        self.assertEqual(self.dg_download("dg/empty.txt"), b"")
        listing = self.dg("ls", f"s3://{BUCKET}/dg/rel/")
        for i in (1, 2, 3):
            self.assertIn(f"app-{i}.tar", listing)
        self.assertNotIn("reference.bin", listing)
        self.dg("verify", f"s3://{BUCKET}/dg/rel/app-2.tar.delta")

    # -- both in one deltaspace -----------------------------------------------------------------
    def test_mixed_deltaspace(self):
        tars = tar_versions(4, seed=46)
        # dgproxy makes the reference; the tool adds a delta against it.
        self.s3.put_object(Bucket=BUCKET, Key="mix/app-1.tar", Body=tars[0])
        self.dg_upload("mix/app-2.tar", tars[1])
        stored = stored_objects(self.w, BUCKET, "mix/")
        self.assertEqual(set(stored), {"mix/reference.bin", "mix/app-1.tar.delta",
                                       "mix/app-2.tar.delta"})
        self.assertLess(stored["mix/app-2.tar.delta"], len(tars[1]) // 10)
        self.proxy_read("mix/app-2.tar", tars[1])
        self.assertEqual(self.dg_download("mix/app-1.tar"), tars[0])

        # The tool makes the reference; dgproxy encodes against it.
        zips = zip_versions(2, seed=47)
        self.dg_upload("mix2/lib-1.zip", zips[0])
        self.s3.put_object(Bucket=BUCKET, Key="mix2/lib-2.zip", Body=zips[1])
        stored = stored_objects(self.w, BUCKET, "mix2/")
        self.assertEqual(set(stored), {"mix2/reference.bin", "mix2/lib-1.zip.delta",
                                       "mix2/lib-2.zip.delta"})
        self.assertLess(stored["mix2/lib-2.zip.delta"], len(zips[1]) // 10)
        m = stored_meta(self.w, BUCKET, "mix2/lib-2.zip.delta")
        self.assertEqual(m.get("dg-md5"), md5_hex(zips[1]))
        self.assertEqual(self.dg_download("mix2/lib-2.zip"), zips[1])
        self.proxy_read("mix2/lib-1.zip", zips[0])
        self.proxy_read("mix2/lib-2.zip", zips[1])
        self.assertEqual(self.s3.head_object(Bucket=BUCKET, Key="mix2/lib-2.zip")["ETag"],
                         etag(zips[1]))
