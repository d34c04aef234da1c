"""End-to-end: rclone (Debian's, a Go S3 client) against a real dgproxy, on the
filesystem backend and on SeaweedFS.

rclone is stricter than the SDKs in ways users meet: after a single-part
upload it compares the ETag with the MD5 it computed, `rclone check` compares
every listed ETag with the local MD5s, and large files go up in parts with
the MD5 kept in the metadata. A tree with a multipart file, a delta series,
an empty file and awkward names goes up, is checked, comes back byte for
byte, and is purged.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile

from twisted.trial import unittest

from tests.e2e.harness import ACCESS_KEY, SECRET_KEY, ProxyProcess
from tests.e2e.test_s3_backend import WeedServer

RCLONE = shutil.which("rclone")


def make_tree(root: str) -> dict[str, bytes]:
    r = random.Random(7)
    base = r.randbytes(2 * 1024 * 1024)
    files = {f"d{i % 3}/f{i}.dat": r.randbytes(r.randint(1, 50_000)) for i in range(12)}
    files.update({
        "big/large.dat": r.randbytes(12 * 1024 * 1024 + 3),  # 3 parts of 5 MiB
        "rel/app-1.tar": base + b"one",
        "rel/app-2.tar": base + b"two",
        "empty/zero.txt": b"",
        "odd/sp ace+plus r\u00e9sum\u00e9.txt": b"odd name",
    })
    for name, data in files.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    return files


class RcloneMixin:
    proxy: ProxyProcess

    def rclone(self, *args: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        proc = subprocess.run(
            [RCLONE, "--config", self.conf, "--retries", "1", "--low-level-retries", "1",
             "--s3-upload-cutoff", "5M", "--s3-chunk-size", "5M", *args],
            env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            self.fail(f"rclone {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
        return proc

    def setUp(self):
        if RCLONE is None:
            raise unittest.SkipTest("rclone is not installed (make test installs it)")
        self.tmp = tempfile.mkdtemp(prefix="dgp-rclone-")
        self.addCleanup(shutil.rmtree, self.tmp)
        self.conf = os.path.join(self.tmp, "rclone.conf")
        with open(self.conf, "w") as f:
            f.write(f"[dg]\ntype = s3\nprovider = Other\naccess_key_id = {ACCESS_KEY}\n"
                    f"secret_access_key = {SECRET_KEY}\nendpoint = {self.proxy.endpoint}\n"
                    "region = us-east-1\nforce_path_style = true\n")

    def test_sync_check_and_back(self):
        src, dst = os.path.join(self.tmp, "src"), os.path.join(self.tmp, "dst")
        files = make_tree(src)
        self.rclone("mkdir", "dg:rclone-trip")
        self.rclone("sync", src, "dg:rclone-trip/tree")
        checked = self.rclone("check", src, "dg:rclone-trip/tree")
        self.assertIn(f"{len(files)} matching files", checked.stderr)
        self.rclone("sync", "dg:rclone-trip/tree", dst)
        for name, data in files.items():
            with open(os.path.join(dst, name), "rb") as f:
                self.assertEqual(f.read(), data, name)
        again = self.rclone("sync", "-v", src, "dg:rclone-trip/tree")
        self.assertNotIn("Copied", again.stderr, "a second sync found changes")
        self.rclone("purge", "dg:rclone-trip/tree")
        self.assertEqual(self.rclone("ls", "dg:rclone-trip").stdout, "")


class RcloneFilesystemTests(RcloneMixin, unittest.TestCase):
    def setUp(self):
        self.proxy = ProxyProcess().start()
        self.addCleanup(self.proxy.cleanup)
        super().setUp()


class RcloneS3BackendTests(RcloneMixin, unittest.TestCase):
    def setUp(self):
        weed = WeedServer()
        weed.start()
        self.addCleanup(weed.cleanup)
        self.proxy = ProxyProcess(env=weed.backend_env()).start()
        self.addCleanup(self.proxy.cleanup)
        super().setUp()
