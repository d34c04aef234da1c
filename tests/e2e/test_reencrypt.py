"""The re-encrypt job end to end: `dgproxy reencrypt`, the write gate, and a
resume after the server is killed mid-job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from botocore.exceptions import ClientError
from twisted.trial import unittest

from tests.e2e.harness import ACCESS_KEY, SECRET_KEY, VENV_BIN, ProxyProcess

KEY_A, KEY_B = "aa" * 32, "bb" * 32


def config(key: str, key_id: str, legacy: tuple[str, str] | None = None) -> str:
    block = f"mode: aes256-gcm-proxy, key: '{key}', key_id: {key_id}"
    if legacy:
        block += f", legacy_key: '{legacy[0]}', legacy_key_id: {legacy[1]}"
    return f"storage:\n  backend_encryption: {{{block}}}\n"


def stamps(data_dir: str, bucket: str) -> dict[str, str]:
    """key id per stored object file (from its xattr)."""
    out = {}
    root = os.path.join(data_dir, bucket, "deltaspaces")
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != ".dg"]
        for name in files:
            if name.startswith(".dgtmp."):  # a write the kill cut short; swept at start-up
                continue
            meta = json.loads(os.getxattr(os.path.join(dirpath, name), "user.dg.metadata"))
            out[os.path.relpath(os.path.join(dirpath, name), root)] = \
                meta.get("user_metadata", {}).get("dg-encryption-key-id")
    return out


class ReencryptTests(unittest.TestCase):
    def start(self, yaml: str, data_dir: str | None = None) -> ProxyProcess:
        proxy = ProxyProcess(config_yaml=yaml, data_dir=data_dir).start()
        self.addCleanup(proxy.cleanup)
        return proxy

    def reencrypt(self, proxy: ProxyProcess, *buckets: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, DGP_ACCESS_KEY_ID=ACCESS_KEY, DGP_SECRET_ACCESS_KEY=SECRET_KEY)
        return subprocess.run([os.path.join(VENV_BIN, "dgproxy"), "reencrypt", "--endpoint",
                               proxy.endpoint, "--interval", "0.2", *buckets],
                              env=env, capture_output=True, text=True, timeout=120)

    def fill(self, proxy: ProxyProcess, bucket: str, n: int,
             size: int = 1000) -> dict[str, bytes]:
        s3 = proxy.client()
        s3.create_bucket(Bucket=bucket)
        objects = {f"k/{i:04d}.dat": os.urandom(size + i) for i in range(n)}
        for key, body in objects.items():
            s3.put_object(Bucket=bucket, Key=key, Body=body)
        return objects

    def test_rotation_rewrites_every_object_and_reports_progress(self):
        first = self.start(config(KEY_A, "ka"))
        objects = self.fill(first, "rot", 30)
        data_dir = first.data_dir
        first.stop()
        proxy = self.start(config(KEY_B, "kb", (KEY_A, "ka")), data_dir=data_dir)
        result = self.reencrypt(proxy, "rot")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("rot: succeeded 30/30 (rewritten 30, failed 0)", result.stdout)
        self.assertEqual(set(stamps(data_dir, "rot").values()), {"kb"})
        proxy.stop()
        # Without the old key the objects still read: they are all under kb now.
        final = self.start(config(KEY_B, "kb"), data_dir=data_dir)
        s3 = final.client()
        for key, body in objects.items():
            self.assertEqual(s3.get_object(Bucket="rot", Key=key)["Body"].read(), body, key)
        # A second run finds nothing to do.
        again = self.reencrypt(final, "rot")
        self.assertIn("(rewritten 0, failed 0)", again.stdout)

    def test_unknown_bucket_and_bad_credentials_are_refused(self):
        proxy = self.start(config(KEY_A, "ka"))
        result = self.reencrypt(proxy, "no-such-bucket")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("bucket not found", result.stderr)
        env = dict(os.environ, DGP_ACCESS_KEY_ID=ACCESS_KEY, DGP_SECRET_ACCESS_KEY="wrong")
        bad = subprocess.run([os.path.join(VENV_BIN, "dgproxy"), "reencrypt", "--endpoint",
                              proxy.endpoint, "x"], env=env, capture_output=True, text=True)
        self.assertNotEqual(bad.returncode, 0)
        self.assertIn("403", bad.stderr)

    def test_writes_wait_while_the_job_runs_and_a_killed_job_resumes(self):
        first = self.start(config(KEY_A, "ka"))
        # 40 × 256 KiB held to 2 MiB/s: the job runs for about 5 s however fast
        # the disk is, time to get a write in and to kill it half-way.
        objects = self.fill(first, "big", 40, size=256 * 1024)
        data_dir = first.data_dir
        first.stop()
        proxy = ProxyProcess(config_yaml=config(KEY_B, "kb", (KEY_A, "ka")), data_dir=data_dir,
                             env={"DGP_LOG_LEVEL": "info"}).start()
        self.addCleanup(proxy.cleanup)
        s3 = proxy.client()
        s3.head_bucket(Bucket="big")
        env = dict(os.environ, DGP_ACCESS_KEY_ID=ACCESS_KEY, DGP_SECRET_ACCESS_KEY=SECRET_KEY)
        cli = subprocess.Popen([os.path.join(VENV_BIN, "dgproxy"), "reencrypt", "--endpoint",
                                proxy.endpoint, "--max-rate", "2M", "big"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(cli.wait)
        deadline = time.monotonic() + 20
        refused = None
        while time.monotonic() < deadline and refused is None:
            try:
                s3.put_object(Bucket="big", Key="k/new.dat", Body=b"during")
            except ClientError as e:
                refused = e
            time.sleep(0.005)
        self.assertIsNotNone(refused, "no write was refused while the job ran:\n" +
                             "\n".join(l for l in proxy.log().splitlines()
                                       if "eencrypt" in l or "big 503" in l)[-3000:])
        self.assertEqual(refused.response["Error"]["Code"], "SlowDown")
        self.assertEqual(refused.response["ResponseMetadata"]["HTTPStatusCode"], 503)
        # Reads pass meanwhile.
        self.assertEqual(s3.get_object(Bucket="big", Key="k/0001.dat")["Body"].read(),
                         objects["k/0001.dat"])
        # Writes are refused from the moment the job starts; its state is saved
        # before its first rewrite. Kill it once that rewrite is on disk.
        deadline = time.monotonic() + 20
        while "kb" not in stamps(data_dir, "big").values() and time.monotonic() < deadline:
            time.sleep(0.01)
        proxy.stop(signal.SIGKILL)
        before = stamps(data_dir, "big")
        self.assertIn("ka", before.values(), "the job finished before it could be killed")
        self.assertIn("kb", before.values())
        resumed = self.start(config(KEY_B, "kb", (KEY_A, "ka")), data_dir=data_dir)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if "Re-encrypt job for big: succeeded" in resumed.log():
                break
            time.sleep(0.2)
        log = resumed.log()
        self.assertIn("Resuming re-encrypt job for big", log)
        self.assertIn("Re-encrypt job for big: succeeded", log)
        self.assertEqual(set(stamps(data_dir, "big").values()), {"kb"})
        s3 = resumed.client()
        s3.put_object(Bucket="big", Key="k/new.dat", Body=b"after")
        for key in ("k/0000.dat", "k/0039.dat"):
            self.assertEqual(s3.get_object(Bucket="big", Key=key)["Body"].read(), objects[key])
