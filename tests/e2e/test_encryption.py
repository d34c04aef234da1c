"""Encryption at rest against real processes (SPEC §8; fact sheet encryption §A).

A C{twistd -n dgproxy} with C{storage.backend_encryption: {mode:
aes256-gcm-proxy}} and its key in C{DGP_ENCRYPTION_KEY}, first over the
filesystem, then over a real SeaweedFS. What is checked is what a client and
an operator can see: bytes through boto3 (whole objects, ranges at chunk
boundaries, delta objects, multipart), sizes in HEAD and LIST, and at rest:
no plaintext anywhere in the data directory or in the upstream bucket, and
the C{dg-encrypted} / C{dg-encryption-key-id} markers in the metadata.

Then the operator's failure modes, each answered with a generic 500 to the
client and the seed's wording in the log (seed troubleshooting
"Encryption-at-rest — symptoms and fixes"): the key removed, the key
changed, xattrs stripped by a copy; key rotation through the legacy shim;
and the start-up checks (shared key_id with different keys, key in YAML).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import random
import shutil
import subprocess
import tempfile
import time
from typing import Optional

from botocore.exceptions import ClientError
from twisted.trial import unittest

from tests.e2e.artifacts import make_tar
from tests.e2e.harness import ProxyProcess
from tests.e2e.seaweed import Seaweed

XATTR = "user.dg.metadata"
KEY_A = "a1" * 32
KEY_B = "b2" * 32
MARKER = b"PLAINTEXT-MARKER-e2e-5d1f9a"
CHUNK = 65536
CHUNKED = "aes-256-gcm-chunked-v1"
ENC_CONFIG = "storage:\n  backend_encryption:\n    mode: aes256-gcm-proxy\n"

NO_KEY = "object is encrypted but no key is configured"
STRIPPED = ("object body begins with chunked-encryption magic but metadata has no dg-encrypted "
            "marker — xattrs may have been stripped during backup/restore")


def key_id(name: str, hex_key: str) -> str:
    """hex(SHA-256(name || 0x00 || key)[:8]), fact sheet §A2."""
    return hashlib.sha256(name.encode() + b"\x00" + bytes.fromhex(hex_key)).digest()[:8].hex()


KID_A = key_id("default", KEY_A)
KID_B = key_id("default", KEY_B)


def wire_size(p: int) -> int:
    return 16 + p + 20 * max(1, -(-p // CHUNK))


def marked(n: int, seed: int = 0) -> bytes:
    """n random bytes with the marker planted every 4 KiB (so any plaintext leak shows)."""
    rng = random.Random(seed)
    out = bytearray(rng.randbytes(n))
    for pos in range(0, n - len(MARKER) + 1, 4096):
        out[pos:pos + len(MARKER)] = MARKER
    return bytes(out)




def tar_versions(n: int = 3) -> list[bytes]:
    """Successive releases of a text tree that mentions the marker everywhere."""
    rng = random.Random(99)
    files = {}
    for i in range(40):
        lines = [f"line {j} of file {i}: {MARKER.decode()} {rng.random():.12f}" for j in range(160)]
        files[f"src/file{i:03d}.txt"] = "\n".join(lines).encode()
    versions = []
    for v in range(n):
        if v:
            for name in rng.sample(sorted(files), 3):
                files[name] += f"\n# release {v}: {MARKER.decode()}\n".encode()
            files[f"CHANGES-{v}.txt"] = (f"release {v} {MARKER.decode()}\n" * 30).encode()
        versions.append(make_tar(files))
    return versions


def files_under(root: str) -> list[str]:
    out = []
    for dirpath, _dirs, names in os.walk(root):
        out += [os.path.join(dirpath, n) for n in names]
    return out


def files_containing(root: str, needle: bytes = MARKER) -> list[str]:
    found = []
    for path in files_under(root):
        with open(path, "rb") as f:
            if needle in f.read():
                found.append(path)
    return found


def read_xattr(path: str) -> dict:
    return json.loads(os.getxattr(path, XATTR))


def md5_etag(data: bytes) -> str:
    return '"%s"' % hashlib.md5(data).hexdigest()


_shared_procs: dict[str, object] = {}


def _shared(name: str, factory):
    proc = _shared_procs.get(name)
    if proc is None:
        proc = _shared_procs[name] = factory()
        atexit.register(proc.cleanup)
    return proc


_counter = iter(range(10**6))
_clients: dict[int, object] = {}


def s3_of(proxy: ProxyProcess):
    """One boto3 client per server (making one costs ~0.3 s)."""
    client = _clients.get(id(proxy))
    if client is None or client.meta.endpoint_url != proxy.endpoint:
        client = _clients[id(proxy)] = proxy.client()
    return client


class EncryptionCase(unittest.TestCase):
    """Helpers shared by every test here."""

    proxy: ProxyProcess

    def new_bucket(self, proxy: Optional[ProxyProcess] = None) -> str:
        proxy = proxy or self.proxy
        name = f"enc-{os.getpid()}-{next(_counter)}"
        s3_of(proxy).create_bucket(Bucket=name)
        return name

    def get(self, bucket: str, key: str, proxy: Optional[ProxyProcess] = None, **kw) -> bytes:
        return s3_of(proxy or self.proxy).get_object(Bucket=bucket, Key=key,
                                                         **kw)["Body"].read()

    def assertSame(self, got: bytes, want: bytes, what: str) -> None:
        if got != want:
            self.fail(f"{what}: got {len(got)} bytes, expected {len(want)} (content differs)")

    def assertServerError(self, bucket: str, key: str, proxy: Optional[ProxyProcess] = None,
                          **kw) -> None:
        """GET answers 500 InternalError, with nothing about keys or formats in the body."""
        proxy = proxy or self.proxy
        try:
            got = s3_of(proxy).get_object(Bucket=bucket, Key=key, **kw)["Body"].read()
        except ClientError as e:
            self.assertEqual(e.response["ResponseMetadata"]["HTTPStatusCode"], 500, e.response)
            self.assertEqual(e.response["Error"]["Code"], "InternalError", e.response)
            body = json.dumps(e.response)
            for secret in ("key id", "encrypt", "xattr", KID_A, KID_B, "DGE1"):
                self.assertNotIn(secret, body)
            return
        except Exception as e:  # a cut connection instead of an answer
            self.fail(f"GET {key} did not get a 500 response: {type(e).__name__}: {e}")
        self.fail(f"GET {key} answered 200 with {len(got)} bytes although it cannot be decrypted")

    def assertLogContains(self, proxy: ProxyProcess, text: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in proxy.log():
            if time.monotonic() > deadline:
                self.fail(f"log lacks {text!r}; tail:\n{proxy.log()[-3000:]}")
            time.sleep(0.05)

    def list_sizes(self, bucket: str, proxy: Optional[ProxyProcess] = None) -> dict[str, int]:
        out = {}
        for page in s3_of(proxy or self.proxy).get_paginator("list_objects_v2").paginate(
                Bucket=bucket):
            for o in page.get("Contents", []):
                out[o["Key"]] = o["Size"]
        return out

    # -- the shared scenarios (filesystem and SeaweedFS) ----------------------------------------
    ROUND_TRIP = {"empty.dat": b"", "one.dat": b"x", "small.dat": marked(100, 1),
                  "chunk-minus.dat": marked(CHUNK - 1, 2), "chunk.dat": marked(CHUNK, 3),
                  "chunk-plus.dat": marked(CHUNK + 1, 4), "three.dat": marked(3 * CHUNK + 5, 5),
                  "dir/several-mb.dat": marked(5 * 1024 * 1024 + 17, 6)}

    def check_round_trips(self, bucket: str) -> None:
        s3 = s3_of(self.proxy)
        for key, body in self.ROUND_TRIP.items():
            put = s3.put_object(Bucket=bucket, Key=key, Body=body)
            self.assertEqual(put["ETag"], md5_etag(body), key)
        for key, body in self.ROUND_TRIP.items():
            self.assertSame(self.get(bucket, key), body, key)
            head = s3.head_object(Bucket=bucket, Key=key)
            self.assertEqual(head["ContentLength"], len(body), key)
            self.assertEqual(head["ETag"], md5_etag(body), key)
            self.assertFalse([k for k in head.get("Metadata", {}) if k.startswith("dg-")], head)
        self.assertEqual(self.list_sizes(bucket), {k: len(v) for k, v in self.ROUND_TRIP.items()})

    def check_ranges(self, bucket: str) -> None:
        s3 = s3_of(self.proxy)
        for key in ("three.dat", "dir/several-mb.dat"):
            s3.put_object(Bucket=bucket, Key=key, Body=self.ROUND_TRIP[key])
        body = self.ROUND_TRIP["three.dat"]
        size = len(body)
        points = sorted({0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK - 1, 2 * CHUNK,
                         2 * CHUNK + 1, 3 * CHUNK - 1, 3 * CHUNK, 3 * CHUNK + 1, size - 2, size - 1})
        for start in points:
            for n in (1, 2, CHUNK, CHUNK + 2, size):
                end = min(size - 1, start + n - 1)
                resp = s3.get_object(Bucket=bucket, Key="three.dat", Range=f"bytes={start}-{end}")
                self.assertEqual(resp["ContentRange"], f"bytes {start}-{end}/{size}")
                self.assertSame(resp["Body"].read(), body[start:end + 1], f"{start}-{end}")
        self.assertSame(self.get(bucket, "three.dat", Range="bytes=-10"), body[-10:], "suffix")
        self.assertSame(self.get(bucket, "three.dat", Range=f"bytes={CHUNK}-"), body[CHUNK:],
                        "open-ended")
        big = self.ROUND_TRIP["dir/several-mb.dat"]
        rng = random.Random(3)
        offsets = [0, 40 * CHUNK, 40 * CHUNK - 1, len(big) - 1] + [
            rng.randrange(len(big)) for _ in range(12)]
        for start in offsets:
            end = min(len(big) - 1, start + rng.choice([1, 100, CHUNK, 3 * CHUNK + 7]))
            self.assertSame(self.get(bucket, "dir/several-mb.dat", Range=f"bytes={start}-{end}"),
                            big[start:end + 1], f"big {start}-{end}")
        with self.assertRaises(ClientError) as cm:
            s3.get_object(Bucket=bucket, Key="three.dat", Range=f"bytes={size}-")
        self.assertEqual(cm.exception.response["ResponseMetadata"]["HTTPStatusCode"], 416)

    def check_delta_objects(self, bucket: str) -> dict[str, bytes]:
        s3 = s3_of(self.proxy)
        versions = tar_versions(3)
        objects = {f"rel/app-{i}.tar": v for i, v in enumerate(versions)}
        for key, body in objects.items():
            s3.put_object(Bucket=bucket, Key=key, Body=body)
        for key, body in objects.items():
            self.assertSame(self.get(bucket, key), body, key)
            self.assertEqual(s3.head_object(Bucket=bucket, Key=key)["ContentLength"], len(body))
        last = versions[-1]
        for start in (0, CHUNK - 3, len(last) // 2, len(last) - 5):
            end = min(len(last) - 1, start + CHUNK + 10)
            self.assertSame(self.get(bucket, "rel/app-2.tar", Range=f"bytes={start}-{end}"),
                            last[start:end + 1], f"delta range {start}")
        sizes = self.list_sizes(bucket)
        for key, body in objects.items():
            self.assertEqual(sizes[key], len(body), key)
        return objects

    def check_multipart(self, bucket: str, at_rest) -> bytes:
        """A two-part upload; C{at_rest()} lists stored blobs that hold the marker."""
        s3 = s3_of(self.proxy)
        parts_data = [marked(5 * 1024 * 1024, 7), marked(CHUNK * 3 + 11, 8)]
        up = s3.create_multipart_upload(Bucket=bucket, Key="mp/upload.dat")
        uid = up["UploadId"]
        parts = []
        for n, data in enumerate(parts_data, 1):
            r = s3.upload_part(Bucket=bucket, Key="mp/upload.dat", UploadId=uid, PartNumber=n,
                               Body=data)
            self.assertEqual(r["ETag"], md5_etag(data))
            parts.append({"PartNumber": n, "ETag": r["ETag"]})
        listed = s3.list_parts(Bucket=bucket, Key="mp/upload.dat", UploadId=uid)["Parts"]
        self.assertEqual([p["Size"] for p in listed], [len(d) for d in parts_data])
        self.assertEqual(at_rest(), [], "multipart parts are stored in plaintext")
        done = s3.complete_multipart_upload(Bucket=bucket, Key="mp/upload.dat", UploadId=uid,
                                            MultipartUpload={"Parts": parts})
        self.assertTrue(done["ETag"].endswith('-2"'), done)
        whole = b"".join(parts_data)
        self.assertSame(self.get(bucket, "mp/upload.dat"), whole, "multipart object")
        head = s3.head_object(Bucket=bucket, Key="mp/upload.dat")
        self.assertEqual(head["ContentLength"], len(whole))
        self.assertEqual(head["ETag"], done["ETag"])
        start = len(parts_data[0]) - 5
        self.assertSame(self.get(bucket, "mp/upload.dat", Range=f"bytes={start}-{start + 9}"),
                        whole[start:start + 10], "range across the part boundary")
        self.assertEqual(self.list_sizes(bucket)["mp/upload.dat"], len(whole))
        return whole


# =============================================================================================
class FilesystemEncryptionTests(EncryptionCase):
    """One encrypting server over a data directory, shared by the tests."""

    def setUp(self):
        self.proxy = _shared("fs", lambda: ProxyProcess(
            env={"DGP_ENCRYPTION_KEY": KEY_A}, config_yaml=ENC_CONFIG).start())

    def bucket_dir(self, bucket: str) -> str:
        return os.path.join(self.proxy.data_dir, bucket)

    def path(self, bucket: str, key: str) -> str:
        return os.path.join(self.proxy.data_dir, bucket, "deltaspaces", *key.split("/"))

    def assertEncryptedAtRest(self, bucket: str) -> None:
        """No file holds the marker; every data file is marked and stamped with KID_A."""
        self.assertEqual(files_containing(self.bucket_dir(bucket)), [])
        blobs = files_under(os.path.join(self.bucket_dir(bucket), "deltaspaces"))
        self.assertTrue(blobs)
        for path in blobs:
            with open(path, "rb") as f:
                self.assertEqual(f.read(4), b"DGE1", path)
            user = read_xattr(path).get("user_metadata", {})
            self.assertEqual(user.get("dg-encrypted"), CHUNKED, path)
            self.assertEqual(user.get("dg-encryption-key-id"), KID_A, path)

    def test_startup_messages(self):
        log = self.proxy.log()
        self.assertIn(f"backend 'default' encryption: ENABLED (AES-256-GCM proxy, key_id={KID_A})",
                      log)
        self.assertNotIn("loaded from config file", log)

    def test_round_trips(self):
        bucket = self.new_bucket()
        self.check_round_trips(bucket)
        for key, body in self.ROUND_TRIP.items():
            path = self.path(bucket, key)
            self.assertEqual(os.path.getsize(path), wire_size(len(body)), key)
            meta = read_xattr(path)
            self.assertEqual(meta["file_size"], len(body), key)
            self.assertEqual(meta["user_metadata"]["dg-encrypted"], CHUNKED, key)
            self.assertEqual(meta["user_metadata"]["dg-encryption-key-id"], KID_A, key)
        self.assertEncryptedAtRest(bucket)

    def test_ranges(self):
        self.check_ranges(self.new_bucket())

    def test_delta_objects(self):
        bucket = self.new_bucket()
        self.check_delta_objects(bucket)
        ds = os.path.join(self.bucket_dir(bucket), "deltaspaces", "rel")
        names = set(os.listdir(ds))
        self.assertIn("reference.bin", names)
        self.assertTrue({"app-1.tar.delta", "app-2.tar.delta"} <= names, names)
        # the delta's stored size is its own, encrypted; the original size is in the metadata
        meta = read_xattr(os.path.join(ds, "app-2.tar.delta"))
        self.assertEqual(meta["note"], "delta")
        self.assertEqual(os.path.getsize(os.path.join(ds, "app-2.tar.delta")),
                         wire_size(meta["delta_size"]))
        self.assertEncryptedAtRest(bucket)

    def test_multipart(self):
        bucket = self.new_bucket()
        self.check_multipart(bucket, lambda: files_containing(self.bucket_dir(bucket)))
        self.assertEncryptedAtRest(bucket)

    def test_copy_object(self):
        bucket = self.new_bucket()
        s3 = s3_of(self.proxy)
        body = marked(CHUNK * 2 + 3, 9)
        s3.put_object(Bucket=bucket, Key="src.dat", Body=body)
        s3.copy_object(Bucket=bucket, Key="dst.dat", CopySource={"Bucket": bucket, "Key": "src.dat"})
        self.assertSame(self.get(bucket, "dst.dat"), body, "copy")
        self.assertEncryptedAtRest(bucket)

    def test_stripped_xattr_on_a_live_file(self):
        bucket = self.new_bucket()
        body = marked(CHUNK + 100, 10)
        s3_of(self.proxy).put_object(Bucket=bucket, Key="victim.dat", Body=body)
        os.removexattr(self.path(bucket, "victim.dat"), XATTR)
        self.assertServerError(bucket, "victim.dat")
        self.assertLogContains(self.proxy, STRIPPED)


    def test_stripped_xattr_ranged_get_serves_no_ciphertext(self):
        bucket = self.new_bucket()
        body = marked(CHUNK + 100, 11)
        s3_of(self.proxy).put_object(Bucket=bucket, Key="victim.dat", Body=body)
        path = self.path(bucket, "victim.dat")
        with open(path, "rb") as f:
            raw = f.read()
        os.removexattr(path, XATTR)
        try:
            got = self.get(bucket, "victim.dat", Range="bytes=100-199")
        except Exception:
            return  # refused: fine
        self.assertNotEqual(got, raw[100:200], "ciphertext served as plaintext on a ranged GET")



# =============================================================================================
class RestartTests(EncryptionCase):
    """Each test owns a data directory and restarts servers on it with other keys."""

    def setUp(self):
        self.data_dir = tempfile.mkdtemp(prefix="dgp-enc-data-")
        self.addCleanup(shutil.rmtree, self.data_dir, True)

    def start(self, config: Optional[str] = ENC_CONFIG, key: Optional[str] = None,
              data_dir: Optional[str] = None, env: Optional[dict] = None) -> ProxyProcess:
        env = dict(env or {})
        if key is not None:
            env["DGP_ENCRYPTION_KEY"] = key
        proxy = ProxyProcess(env=env, config_yaml=config, data_dir=data_dir or self.data_dir)
        self.addCleanup(proxy.cleanup)
        self.proxy = proxy.start()
        return proxy

    def path(self, bucket: str, key: str, data_dir: Optional[str] = None) -> str:
        return os.path.join(data_dir or self.data_dir, bucket, "deltaspaces", *key.split("/"))

    def stamp(self, bucket: str, key: str) -> Optional[str]:
        return read_xattr(self.path(bucket, key)).get("user_metadata", {}).get(
            "dg-encryption-key-id")

    def write_generation(self, bucket: str, tag: int) -> dict[str, bytes]:
        objects = {f"gen{tag}/small.dat": marked(200, 20 + tag),
                   f"gen{tag}/three.dat": marked(3 * CHUNK + 5, 30 + tag)}
        objects.update({f"gen{tag}/{k}": v for k, v in
                        zip(("a.tar", "b.tar"), tar_versions(2))})
        s3 = s3_of(self.proxy)
        for key, body in objects.items():
            s3.put_object(Bucket=bucket, Key=key, Body=body)
        return objects

    def assertReadable(self, bucket: str, objects: dict[str, bytes]) -> None:
        for key, body in objects.items():
            self.assertSame(self.get(bucket, key), body, key)
        three = next(v for k, v in objects.items() if k.endswith("three.dat"))
        key = next(k for k in objects if k.endswith("three.dat"))
        self.assertSame(self.get(bucket, key, Range=f"bytes={CHUNK - 2}-{2 * CHUNK + 2}"),
                        three[CHUNK - 2:2 * CHUNK + 3], "range")

    def test_restart_without_a_key(self):
        """mode none (the default) over objects stamped KID_A: 500, and the log says why."""
        self.start(key=KEY_A)
        bucket = self.new_bucket()
        objects = self.write_generation(bucket, 1)
        self.proxy.stop()

        proxy = self.start(config=None, env={"DGP_ENCRYPTION_KEY": KEY_A})  # ignored under none
        for key in objects:
            self.assertServerError(bucket, key)
        # The object carries a key-id stamp, so the fact sheet (§A3, error 2) words it as:
        self.assertLogContains(proxy, f"object was encrypted with key id '{KID_A}', but this "
                                      "backend has NO encryption key configured")
        # Listing and HEAD still work and still show plaintext sizes.
        self.assertEqual(self.list_sizes(bucket),
                         {k: len(v) for k, v in objects.items()})
        # An unstamped (pre-v0.9) encrypted object: the seed's "no key is configured".
        path = self.path(bucket, "gen1/small.dat")
        meta = read_xattr(path)
        del meta["user_metadata"]["dg-encryption-key-id"]
        os.setxattr(path, XATTR, json.dumps(meta).encode())
        self.assertServerError(bucket, "gen1/small.dat")
        self.assertLogContains(proxy, NO_KEY)

    def test_restart_with_key_id_pinned_but_no_key(self):
        """aes256-gcm-proxy with key_id pinned and the key gone: the seed's 'no key' text."""
        pinned = ("storage:\n  backend_encryption:\n    mode: aes256-gcm-proxy\n"
                  "    key_id: prod-2026-06\n")
        self.start(config=pinned, key=KEY_A)
        bucket = self.new_bucket()
        body = marked(CHUNK + 9, 40)
        s3_of(self.proxy).put_object(Bucket=bucket, Key="obj.dat", Body=body)
        self.assertEqual(self.stamp(bucket, "obj.dat"), "prod-2026-06")
        self.proxy.stop()

        proxy = self.start(config=pinned)
        self.assertLogContains(proxy, "backend 'default' has encryption mode aes256-gcm-proxy but "
                                      "no key is configured — writes will NOT be encrypted")
        self.assertServerError(bucket, "obj.dat")
        self.assertLogContains(proxy, NO_KEY)
        # writes on a key-less proxy-AES backend are plaintext (fact sheet §A3)
        s3_of(proxy).put_object(Bucket=bucket, Key="plain.dat", Body=MARKER)
        with open(self.path(bucket, "plain.dat"), "rb") as f:
            self.assertEqual(f.read(), MARKER)

    def test_restart_with_a_different_key(self):
        self.start(key=KEY_A)
        bucket = self.new_bucket()
        objects = self.write_generation(bucket, 1)
        self.proxy.stop()

        proxy = self.start(key=KEY_B)
        for key in objects:
            self.assertServerError(bucket, key)
        self.assertLogContains(proxy, f"object was encrypted with key id '{KID_A}', but this "
                                      f"backend is configured with key id '{KID_B}'")
        self.assertServerError(bucket, "gen1/three.dat", Range="bytes=70000-70010")

    def test_rotation_with_the_legacy_shim(self):
        self.start(key=KEY_A)
        bucket = self.new_bucket()
        old = self.write_generation(bucket, 1)
        self.assertEqual(self.stamp(bucket, "gen1/small.dat"), KID_A)
        self.proxy.stop()

        # key B, with key A as the decrypt-only legacy generation
        shim = ("storage:\n  backend_encryption:\n    mode: aes256-gcm-proxy\n"
                f"    legacy_key: \"{KEY_A}\"\n    legacy_key_id: {KID_A}\n")
        proxy = self.start(config=shim, key=KEY_B)
        self.assertLogContains(proxy, f"decrypt-only shim active (legacy key_id='{KID_A}')")
        self.assertLogContains(proxy, f"ENABLED (AES-256-GCM proxy, key_id={KID_B})")
        self.assertReadable(bucket, old)
        new = self.write_generation(bucket, 2)
        gen2 = files_under(os.path.join(self.data_dir, bucket, "deltaspaces", "gen2"))
        self.assertGreaterEqual(len(gen2), 4)
        for path in gen2:
            user = read_xattr(path).get("user_metadata", {})
            self.assertEqual(user.get("dg-encryption-key-id"), KID_B, path)
        self.assertEqual(self.stamp(bucket, "gen1/small.dat"), KID_A)  # never rewritten
        self.assertReadable(bucket, new)
        self.assertEqual(files_containing(os.path.join(self.data_dir, bucket)), [])
        proxy.stop()

        # disable: mode none + shim reads the A generation and writes plaintext
        off = ("storage:\n  backend_encryption:\n    mode: none\n"
               f"    legacy_key: \"{KEY_A}\"\n    legacy_key_id: {KID_A}\n")
        proxy = self.start(config=off, key=KEY_B)
        self.assertReadable(bucket, old)
        self.assertServerError(bucket, "gen2/small.dat")  # a B object, and no key B any more
        self.assertLogContains(proxy, f"object was encrypted with key id '{KID_B}', but this "
                                      "backend has NO encryption key configured")
        s3_of(proxy).put_object(Bucket=bucket, Key="gen3/plain.dat", Body=MARKER * 3)
        path = self.path(bucket, "gen3/plain.dat")
        with open(path, "rb") as f:
            self.assertEqual(f.read(), MARKER * 3)
        self.assertNotIn("dg-encrypted", read_xattr(path).get("user_metadata", {}))
        # the grep used throughout does see plaintext when there is some
        self.assertEqual(files_containing(os.path.join(self.data_dir, bucket)), [path])
        self.assertSame(self.get(bucket, "gen3/plain.dat"), MARKER * 3, "plaintext object")

    def test_copy_without_xattrs(self):
        """`cp -r` keeps the bytes but not the xattrs: refuse, and say why."""
        self.start(key=KEY_A)
        bucket = self.new_bucket()
        body = marked(CHUNK * 2, 50)
        s3_of(self.proxy).put_object(Bucket=bucket, Key="obj.dat", Body=body)
        self.proxy.stop()
        copy = os.path.join(tempfile.mkdtemp(prefix="dgp-enc-copy-"), "data")
        self.addCleanup(shutil.rmtree, os.path.dirname(copy), True)
        subprocess.run(["cp", "-r", self.data_dir, copy], check=True)
        copied = self.path(bucket, "obj.dat", data_dir=copy)
        with self.assertRaises(OSError):
            os.getxattr(copied, XATTR)
        proxy = self.start(key=KEY_A, data_dir=copy)
        self.assertServerError(bucket, "obj.dat")
        self.assertLogContains(proxy, STRIPPED)


    def test_copy_without_xattrs_never_serves_ciphertext(self):
        """Whatever the status, the client never receives the stored ciphertext as content."""
        self.start(key=KEY_A)
        bucket = self.new_bucket()
        s3_of(self.proxy).put_object(Bucket=bucket, Key="obj.dat", Body=marked(CHUNK * 2, 51))
        self.proxy.stop()
        copy = os.path.join(tempfile.mkdtemp(prefix="dgp-enc-copy-"), "data")
        self.addCleanup(shutil.rmtree, os.path.dirname(copy), True)
        subprocess.run(["cp", "-r", self.data_dir, copy], check=True)
        proxy = self.start(key=KEY_A, data_dir=copy)
        try:
            got = self.get(bucket, "obj.dat")
        except Exception:
            got = None
        self.assertIsNone(got, "ciphertext served as the object's content")
        self.assertLogContains(proxy, STRIPPED)

    def test_key_in_yaml_warns(self):
        config = ("storage:\n  backend_encryption:\n    mode: aes256-gcm-proxy\n"
                  f"    key: \"{KEY_A}\"\n")
        proxy = self.start(config=config)
        self.assertLogContains(proxy, "backend 'default' encryption key was loaded from config "
                                      "file (not DGP_ENCRYPTION_KEY)")
        bucket = self.new_bucket()
        s3_of(proxy).put_object(Bucket=bucket, Key="obj.dat", Body=MARKER * 10)
        self.assertEqual(self.stamp(bucket, "obj.dat"), KID_A)  # same key, same derived id
        self.assertEqual(files_containing(os.path.join(self.data_dir, bucket)), [])

    def test_shared_key_id_with_different_keys_is_refused(self):
        one, two = (os.path.join(self.data_dir, n) for n in ("one", "two"))
        config = ("storage:\n  backends:\n"
                  f"    - {{name: vault-one, type: filesystem, path: {one}, encryption: "
                  "{mode: aes256-gcm-proxy, key_id: shared-gen}}\n"
                  f"    - {{name: vault-two, type: filesystem, path: {two}, encryption: "
                  "{mode: aes256-gcm-proxy, key_id: shared-gen}}\n")
        env = {"DGP_BACKEND_VAULT_ONE_ENCRYPTION_KEY": KEY_A,
               "DGP_BACKEND_VAULT_TWO_ENCRYPTION_KEY": KEY_B}
        proxy = ProxyProcess(env=env, config_yaml=config, data_dir=self.data_dir)
        self.addCleanup(proxy.cleanup)
        proxy.start(wait=False)
        code = proxy.proc.wait(30)
        self.assertNotEqual(code, 0, proxy.log())
        log = proxy.log()
        self.assertRegex(log, r"vault-one.*vault-two|vault-two.*vault-one")
        self.assertIn("shared-gen", log)
        self.assertIn("DIFFERENT keys", log)
        # the same key bytes on both: the documented escape hatch starts fine
        env["DGP_BACKEND_VAULT_TWO_ENCRYPTION_KEY"] = KEY_A
        ok = ProxyProcess(env=env, config_yaml=config, data_dir=self.data_dir)
        self.addCleanup(ok.cleanup)
        ok.start()
        self.assertIn("backend 'vault-one' encryption: ENABLED (AES-256-GCM proxy, "
                      "key_id=shared-gen)", ok.log())
        self.assertIn("backend 'vault-two' encryption: ENABLED (AES-256-GCM proxy, "
                      "key_id=shared-gen)", ok.log())
        self.assertNotIn("loaded from config file", ok.log())
        self.proxy = ok
        bucket = self.new_bucket()
        body = marked(CHUNK + 5, 70)
        s3_of(ok).put_object(Bucket=bucket, Key="obj.dat", Body=body)
        self.assertSame(self.get(bucket, "obj.dat"), body, "named backend")
        stored = os.path.join(one, bucket, "deltaspaces", "obj.dat")
        self.assertEqual(read_xattr(stored)["user_metadata"]["dg-encryption-key-id"], "shared-gen")
        self.assertEqual(files_containing(one), [])


# =============================================================================================
class SeaweedEncryptionTests(EncryptionCase):
    """The same server over a real SeaweedFS: the upstream bucket holds only ciphertext."""

    def setUp(self):
        self.weed = _shared("weed", lambda: Seaweed().start())
        self.proxy = _shared("weed-proxy", lambda: ProxyProcess(
            env={**self.weed.backend_env(), "DGP_ENCRYPTION_KEY": KEY_A},
            config_yaml=ENC_CONFIG).start())

    def upstream(self, bucket: str) -> dict[str, tuple[bytes, dict]]:
        """Every object in the real bucket: (body, user metadata)."""
        weed = getattr(self.weed, "_test_client", None)
        if weed is None:
            weed = self.weed._test_client = self.weed.client()
        out = {}
        for page in weed.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for o in page.get("Contents", []):
                r = weed.get_object(Bucket=bucket, Key=o["Key"])
                out[o["Key"]] = (r["Body"].read(), r.get("Metadata", {}))
        return out

    def upstream_with_marker(self, bucket: str) -> list[str]:
        return [k for k, (body, _) in self.upstream(bucket).items() if MARKER in body]

    def assertEncryptedUpstream(self, bucket: str) -> dict:
        stored = self.upstream(bucket)
        self.assertTrue(stored)
        for key, (body, meta) in stored.items():
            self.assertNotIn(MARKER, body, key)
            self.assertEqual(body[:4], b"DGE1", key)
            self.assertEqual(meta.get("user-dg-encrypted"), CHUNKED, (key, meta))
            self.assertEqual(meta.get("user-dg-encryption-key-id"), KID_A, (key, meta))
        return stored

    def test_round_trips_and_list(self):
        bucket = self.new_bucket()
        self.check_round_trips(bucket)
        stored = self.assertEncryptedUpstream(bucket)
        for key, body in self.ROUND_TRIP.items():
            self.assertEqual(len(stored[key][0]), wire_size(len(body)), key)

    def test_ranges(self):
        self.check_ranges(self.new_bucket())

    def test_delta_objects(self):
        bucket = self.new_bucket()
        self.check_delta_objects(bucket)
        stored = self.assertEncryptedUpstream(bucket)
        self.assertIn("rel/reference.bin", stored)
        self.assertIn("rel/app-2.tar.delta", stored)

    def test_multipart(self):
        bucket = self.new_bucket()
        self.check_multipart(bucket, lambda: self.upstream_with_marker(bucket))
        self.assertEncryptedUpstream(bucket)


    def test_restart_with_a_different_key(self):
        bucket = self.new_bucket()
        body = marked(CHUNK * 2 + 1, 60)
        s3_of(self.proxy).put_object(Bucket=bucket, Key="obj.dat", Body=body)
        other = ProxyProcess(env={**self.weed.backend_env(), "DGP_ENCRYPTION_KEY": KEY_B},
                             config_yaml=ENC_CONFIG)
        self.addCleanup(other.cleanup)
        other.start()
        self.assertServerError(bucket, "obj.dat", proxy=other)
        self.assertLogContains(other, f"object was encrypted with key id '{KID_A}', but this "
                                      f"backend is configured with key id '{KID_B}'")
        self.assertEqual(self.list_sizes(bucket, proxy=other), {"obj.dat": len(body)})
