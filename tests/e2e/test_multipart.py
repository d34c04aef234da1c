"""End-to-end tests of multipart uploads against a real C{twistd -n dgproxy} (SPEC §5).

What is checked is what a user sees: bytes and ETags through the aws CLI and
boto3, S3 error codes and statuses, listings, and — for an operator — what is
left under the data directory. Upload state lives on the backend
(C{.dg/multipart/<id>/}), so a SIGKILLed server, its successor, and a second
server on the same data directory must all be able to carry on an upload.

Servers: one shared default server for most of the module; the durability,
upload-limit and idle-sweep tests start their own.
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import http.client
import io
import itertools
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from typing import Callable, Optional

import boto3.s3.transfer
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from twisted.trial import unittest

from tests.e2e.artifacts import make_tar
from tests.e2e.harness import ACCESS_KEY, AWS, SECRET_KEY, ProxyProcess

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
MIN_PART = 5 * MiB
CLI_CHUNK = 8 * MiB  # the aws CLI's (s3transfer's) default multipart_chunksize

_proxies: dict[str, ProxyProcess] = {}
_counter = itertools.count()


def _shared(name: str, **kwargs) -> ProxyProcess:
    proxy = _proxies.get(name)
    if proxy is None or proxy.proc is None or proxy.proc.poll() is not None:
        proxy = _proxies[name] = ProxyProcess(**kwargs).start()
        atexit.register(proxy.cleanup)
    return proxy


# -- data and ETags ---------------------------------------------------------------------------
def md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def md5_etag(data: bytes) -> str:
    return f'"{md5_hex(data)}"'


def mp_etag(parts: list[bytes]) -> str:
    """S3's multipart ETag for these part bodies: md5 of the concatenated part md5s, -N."""
    return multipart_etag_of([md5_hex(p) for p in parts])


def multipart_etag_of(md5s: list[str]) -> str:
    digest = hashlib.md5(b"".join(bytes.fromhex(m) for m in md5s)).hexdigest()
    return f'"{digest}-{len(md5s)}"'


class ChunkHasher:
    """MD5s of consecutive C{chunk}-sized pieces of a stream fed in any slices: equal
    lists mean equal bytes, and the list gives the multipart ETag too, in one pass."""

    def __init__(self, chunk: int):
        self.chunk = chunk
        self.md5s: list[str] = []
        self.size = 0
        self._h = hashlib.md5()
        self._in = 0

    def update(self, data) -> None:
        view = memoryview(data)
        while view:
            take = min(len(view), self.chunk - self._in)
            self._h.update(view[:take])
            self._in += take
            self.size += take
            view = view[take:]
            if self._in == self.chunk:
                self.md5s.append(self._h.hexdigest())
                self._h, self._in = hashlib.md5(), 0

    def digests(self) -> list[str]:
        return self.md5s + ([self._h.hexdigest()] if self._in else [])


def write_big_file(path: str, size: int, chunk: int, seed: int) -> list[str]:
    """Write C{size} bytes cheaply: 16 random 1 MiB blocks used in turn, each copy
    stamped with its block counter (so no two MiBs are equal and nothing compresses
    trivially). Returns the md5 of each C{chunk}-sized piece."""
    rng = random.Random(seed)
    blocks = [rng.randbytes(MiB) for _ in range(16)]
    hasher = ChunkHasher(chunk)
    with open(path, "wb") as f:
        i = 0
        while hasher.size < size:
            stamp = (b"block %012d seed %d|" % (i, seed)).ljust(32, b"#")
            block = (stamp + blocks[i % 16][32:])[:size - hasher.size]
            f.write(block)
            hasher.update(block)
            i += 1
    return hasher.digests()


def file_digests(path: str, chunk: int) -> list[str]:
    hasher = ChunkHasher(chunk)
    with open(path, "rb") as f:
        for data in iter(lambda: f.read(MiB), b""):
            hasher.update(data)
    return hasher.digests()


_TREE: Optional[dict[str, bytes]] = None


def source_tree(limit: int = 32 * MiB) -> dict[str, bytes]:
    """A real directory tree of about C{limit} bytes: installed twisted, hypothesis
    and botocore files, in a stable order (well under xdelta3's 64 MiB window)."""
    global _TREE
    if _TREE is None:
        import botocore
        import hypothesis
        import twisted
        files: dict[str, bytes] = {}
        total = 0
        for pkg in (twisted, hypothesis, botocore):
            root = os.path.dirname(pkg.__file__)
            base = os.path.dirname(root)
            for dirpath, dirs, names in os.walk(root):
                dirs[:] = sorted(d for d in dirs if d != "__pycache__")
                for name in sorted(names):
                    if total >= limit:
                        break
                    path = os.path.join(dirpath, name)
                    if not os.path.isfile(path) or os.path.islink(path):
                        continue
                    with open(path, "rb") as f:
                        data = f.read()
                    files[os.path.relpath(path, base)] = data
                    total += len(data)
        _TREE = files
    return dict(_TREE)




def tar_versions(n: int) -> list[bytes]:
    """Successive releases of one tree, each a few small edits of the one before."""
    files = source_tree()
    names = sorted(files)
    rng = random.Random(5)
    out = []
    for v in range(n):
        if v:
            for name in rng.sample(names, 4):
                files[name] = files[name] + f"\n# patched for release {v}\n".encode()
            victim = names[rng.randrange(len(names))]
            body = files[victim]
            files[victim] = body[:len(body) // 2] + f"# release {v}\n".encode() + body[len(body) // 2:]
            files[f"CHANGELOG-{v}.txt"] = f"release {v}\n".encode() * 50
            files.pop(names.pop(rng.randrange(len(names))), None)
        out.append(make_tar(files))
    return out


# -- raw, signed HTTP (for what boto3 will not send, or sends whole) ---------------------
def signed_headers(proxy: ProxyProcess, method: str, path_qs: str,
                   headers: Optional[dict] = None,
                   payload_hash: str = "UNSIGNED-PAYLOAD") -> dict:
    h = {"Host": f"127.0.0.1:{proxy.port}", "X-Amz-Content-SHA256": payload_hash}
    h.update(headers or {})
    req = AWSRequest(method=method, url=proxy.endpoint + path_qs, headers=h)
    SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "s3", "us-east-1").add_auth(req)
    return dict(req.headers.items())


def raw_request(proxy: ProxyProcess, method: str, path_qs: str, body: bytes = b"",
                headers: Optional[dict] = None) -> tuple[int, dict, bytes]:
    h = signed_headers(proxy, method, path_qs, headers,
                       payload_hash=hashlib.sha256(body).hexdigest())
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    try:
        conn.putrequest(method, path_qs, skip_host=True, skip_accept_encoding=True)
        for k, v in h.items():
            conn.putheader(k, v)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        if body:
            conn.send(body)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def xml_code(body: bytes) -> Optional[str]:
    m = re.search(rb"<Code>(.*?)</Code>", body)
    return m.group(1).decode() if m else None


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# -- test plumbing ----------------------------------------------------------------------------
class MultipartCase(unittest.TestCase):
    """A fresh bucket per test on a shared default server, plus helpers."""

    proxy_name = "main"
    proxy_kwargs: dict = {}

    def setUp(self):
        self.proxy = _shared(self.proxy_name, **self.proxy_kwargs)
        self.s3 = self.proxy.client()

    def tearDown(self):
        if self.proxy.proc is None or self.proxy.proc.poll() is not None:
            self.fail("dgproxy died during the test:\n" + self.proxy.log()[-4000:])

    def new_bucket(self, s3=None) -> str:
        stem = self._testMethodName.replace("_", "-").lower()[:36].strip("-")
        name = f"{stem}-{next(_counter)}-{os.getpid() % 10000}"
        (s3 or self.s3).create_bucket(Bucket=name)
        return name

    def new_proxy(self, **kwargs) -> ProxyProcess:
        p = ProxyProcess(**kwargs)
        self.addCleanup(p.cleanup)
        return p.start()

    def tmpdir(self) -> str:
        d = tempfile.mkdtemp(prefix="dgp-mp-")
        self.addCleanup(shutil.rmtree, d, True)
        return d

    # -- S3 errors --------------------------------------------------------------------------
    def s3_error(self, fn, *args, **kwargs) -> tuple[str, int]:
        """Call C{fn}, which must fail; its S3 error code and HTTP status."""
        e = self.assertRaises(ClientError, fn, *args, **kwargs)
        return e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"]

    def assertS3Error(self, code: str, status: Optional[int], fn, *args, **kwargs):
        got = self.s3_error(fn, *args, **kwargs)
        if status is None:
            self.assertEqual(got[0], code, got)
        else:
            self.assertEqual(got, (code, status))

    # -- multipart shorthands ----------------------------------------------------------------
    def create(self, bucket: str, key: str, s3=None, **kw) -> str:
        return (s3 or self.s3).create_multipart_upload(Bucket=bucket, Key=key, **kw)["UploadId"]

    def part(self, bucket: str, key: str, upload_id: str, number: int, body: bytes,
             s3=None) -> str:
        r = (s3 or self.s3).upload_part(Bucket=bucket, Key=key, UploadId=upload_id,
                                        PartNumber=number, Body=body)
        self.assertEqual(r["ETag"], md5_etag(body), f"part {number}")
        return r["ETag"]

    def complete(self, bucket: str, key: str, upload_id: str, parts: list[tuple[int, str]],
                 s3=None) -> dict:
        return (s3 or self.s3).complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload_id,
            MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in parts]})

    def upload_dir(self, bucket: str, upload_id: str, proxy: Optional[ProxyProcess] = None) -> str:
        return os.path.join((proxy or self.proxy).data_dir, bucket, "deltaspaces", ".dg",
                            "multipart", upload_id)

    def files_under(self, path: str) -> list[str]:
        return [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]

    def get(self, bucket: str, key: str, s3=None) -> tuple[bytes, dict]:
        r = (s3 or self.s3).get_object(Bucket=bucket, Key=key)
        return r["Body"].read(), r

    def assertObject(self, bucket: str, key: str, body: bytes, etag: str, s3=None):
        """GET returns C{body}; HEAD, GET and LIST all report C{etag} and the size."""
        s3 = s3 or self.s3
        got, r = self.get(bucket, key, s3)
        self.assertEqual(len(got), len(body))
        self.assertTrue(got == body, f"{key}: downloaded bytes differ")
        self.assertEqual(r["ETag"], etag)
        head = s3.head_object(Bucket=bucket, Key=key)
        self.assertEqual(head["ETag"], etag)
        self.assertEqual(head["ContentLength"], len(body))
        listed = {o["Key"]: o for o in s3.list_objects_v2(Bucket=bucket, Prefix=key)
                  .get("Contents", [])}
        self.assertIn(key, listed)
        self.assertEqual(listed[key]["ETag"], etag)
        self.assertEqual(listed[key]["Size"], len(body))

    def upload_in_parts(self, bucket: str, key: str, parts: list[bytes], s3=None) -> str:
        upload_id = self.create(bucket, key, s3)
        etags = [self.part(bucket, key, upload_id, i, p, s3) for i, p in enumerate(parts, 1)]
        r = self.complete(bucket, key, upload_id, list(enumerate(etags, 1)), s3)
        self.assertEqual(r["ETag"], mp_etag(parts))
        return upload_id


def _aws_env(proxy: ProxyProcess) -> dict:
    return dict(proxy.env, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY,
                AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE=os.devnull,
                AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_MAX_ATTEMPTS="1")


# -- large transfers ---------------------------------------------------------------------------
class LargeTransferTests(MultipartCase):

    def test_aws_cli_cp_1gib_up_and_down(self):
        """`aws s3 cp` of 1 GiB with default settings (8 MiB parts → 128 parts), then
        down again to a pipe: byte-exact, and the multipart ETag everywhere."""
        bucket = self.new_bucket()
        d = self.tmpdir()
        path = os.path.join(d, "disk image.raw")  # passthrough: not a delta extension
        started = time.monotonic()
        part_md5s = write_big_file(path, GiB, CLI_CHUNK, seed=1)
        self.assertEqual(len(part_md5s), 128)
        etag = multipart_etag_of(part_md5s)
        made = time.monotonic()

        self.proxy.aws("s3", "cp", path, f"s3://{bucket}/images/disk image.raw")
        os.unlink(path)  # the local copy is no longer needed
        uploaded = time.monotonic()

        cli = subprocess.Popen([AWS, "--endpoint-url", self.proxy.endpoint, "s3", "cp",
                                f"s3://{bucket}/images/disk image.raw", "-"],
                               env=_aws_env(self.proxy), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
        got = ChunkHasher(CLI_CHUNK)
        for chunk in iter(lambda: cli.stdout.read(MiB), b""):
            got.update(chunk)
        err = cli.stderr.read()
        self.assertEqual(cli.wait(), 0, err)
        self.assertEqual(got.size, GiB)
        self.assertTrue(got.digests() == part_md5s, "aws s3 cp download differs")
        downloaded = time.monotonic()

        key = "images/disk image.raw"
        head = self.s3.head_object(Bucket=bucket, Key=key)
        self.assertEqual(head["ETag"], etag)
        self.assertEqual(head["ContentLength"], GiB)
        r = self.s3.get_object(Bucket=bucket, Key=key)
        self.assertEqual(r["ETag"], etag)
        self.assertEqual(r["ContentLength"], GiB)
        got = ChunkHasher(CLI_CHUNK)
        for chunk in r["Body"].iter_chunks(MiB):
            got.update(chunk)
        self.assertEqual(got.size, GiB)
        self.assertTrue(got.digests() == part_md5s, "GET differs")
        listed = self.s3.list_objects_v2(Bucket=bucket)["Contents"]
        self.assertEqual([(o["Key"], o["Size"], o["ETag"]) for o in listed], [(key, GiB, etag)])
        ls = self.proxy.aws("s3", "ls", f"s3://{bucket}/images/").stdout.decode()
        self.assertIn(f"{GiB} disk image.raw", ls)
        self.assertEqual(self.s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []), [])
        self.assertEqual(self.proxy.temp_files(), [])
        print(f"\n    1 GiB: generate {made - started:.1f}s, aws s3 cp up {uploaded - made:.1f}s, "
              f"down {downloaded - uploaded:.1f}s, GET {time.monotonic() - downloaded:.1f}s")

    def test_boto3_upload_file_concurrent(self):
        """boto3 upload_file, 8 threads, 8 MiB parts, ~100 MB; download_file is byte-exact."""
        bucket = self.new_bucket()
        d = self.tmpdir()
        src = os.path.join(d, "upload.dat")
        size = 100_000_000
        part_md5s = write_big_file(src, size, 8 * MiB, seed=2)
        self.assertEqual(len(part_md5s), 12)
        config = boto3.s3.transfer.TransferConfig(max_concurrency=8,
                                                  multipart_threshold=8 * MiB,
                                                  multipart_chunksize=8 * MiB)
        s3 = self.proxy.client(max_pool_connections=10)
        s3.upload_file(src, bucket, "data/upload.dat", Config=config)
        etag = multipart_etag_of(part_md5s)
        self.assertEqual(s3.head_object(Bucket=bucket, Key="data/upload.dat")["ETag"], etag)
        dst = os.path.join(d, "download.dat")
        s3.download_file(bucket, "data/upload.dat", dst, Config=config)
        self.assertEqual(os.path.getsize(dst), size)
        self.assertTrue(file_digests(dst, 8 * MiB) == part_md5s, "download differs")


# -- the delta decision on assembled objects -------------------------------------------------
_TARS: Optional[list[bytes]] = None


def tars() -> list[bytes]:
    global _TARS
    if _TARS is None:
        _TARS = tar_versions(3)
    return _TARS


class DeltaTests(MultipartCase):

    def test_tar_releases_uploaded_in_parts_are_stored_as_deltas(self):
        bucket = self.new_bucket()
        versions = tars()
        self.assertGreater(len(versions[0]), 20 * MiB)
        config = boto3.s3.transfer.TransferConfig(multipart_threshold=8 * MiB,
                                                  multipart_chunksize=8 * MiB)
        etags = []
        for i, body in enumerate(versions, 1):
            self.s3.upload_fileobj(io.BytesIO(body), bucket, f"releases/app-{i}.tar",
                                   Config=config)
            parts = [body[o:o + 8 * MiB] for o in range(0, len(body), 8 * MiB)]
            etags.append(mp_etag(parts))
        ds = os.path.join(self.proxy.data_dir, bucket, "deltaspaces", "releases")
        on_disk = {e.name: e.stat().st_size for e in os.scandir(ds) if e.is_file()}
        self.assertIn("reference.bin", on_disk, on_disk)
        for i, body in enumerate(versions, 1):
            name = f"app-{i}.tar"
            self.assertNotIn(name, on_disk, "stored whole, not as a delta")
            self.assertIn(name + ".delta", on_disk, on_disk)
        for i, body in enumerate(versions[1:], 2):
            delta = on_disk[f"app-{i}.tar.delta"]
            self.assertLess(delta, len(body) // 50, f"app-{i}.tar.delta is {delta} bytes")
        for i, body in enumerate(versions, 1):
            self.assertObject(bucket, f"releases/app-{i}.tar", body, etags[i - 1])
            self.assertTrue(etags[i - 1].endswith('-%d"' % -(-len(body) // (8 * MiB))))

    def test_upload_part_copy_from_a_delta_object(self):
        """UploadPartCopy reads the reconstructed bytes of a delta-stored source."""
        bucket = self.new_bucket()
        v1, v2 = tars()[:2]
        self.s3.put_object(Bucket=bucket, Key="rel/a.tar", Body=v1)
        self.s3.put_object(Bucket=bucket, Key="rel/b.tar", Body=v2)
        ds = os.path.join(self.proxy.data_dir, bucket, "deltaspaces", "rel")
        self.assertTrue(os.path.exists(os.path.join(ds, "b.tar.delta")))
        key = "copies/joined.dat"
        upload_id = self.create(bucket, key)
        r1 = self.s3.upload_part_copy(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=1,
                                      CopySource={"Bucket": bucket, "Key": "rel/b.tar"},
                                      CopySourceRange=f"bytes={MiB}-{7 * MiB - 1}")
        r2 = self.s3.upload_part_copy(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=2,
                                      CopySource=f"{bucket}/rel/b.tar")
        p1, p2 = v2[MiB:7 * MiB], v2
        self.assertEqual(r1["CopyPartResult"]["ETag"], md5_etag(p1))
        self.assertEqual(r2["CopyPartResult"]["ETag"], md5_etag(p2))
        self.complete(bucket, key, upload_id, [(1, md5_etag(p1)), (2, md5_etag(p2))])
        self.assertObject(bucket, key, p1 + p2, mp_etag([p1, p2]))


# -- durability: state on the backend ---------------------------------------------------------
class DurabilityTests(MultipartCase):

    def setUp(self):
        pass  # these tests start their own servers

    def tearDown(self):
        pass

    def test_sigkill_mid_upload_then_finish_on_a_new_process(self):
        a = self.new_proxy()
        s3a = a.client()
        bucket = self.new_bucket(s3a)
        key = "backups/db.dat"
        rng = random.Random(7)
        parts = [rng.randbytes(MIN_PART) for _ in range(6)] + [rng.randbytes(777 * KiB)]
        upload_id = self.create(bucket, key, s3a, ContentType="application/x-db",
                                Metadata={"origin": "night-run"})
        etags = {n: self.part(bucket, key, upload_id, n, parts[n - 1], s3a) for n in (1, 2, 3)}

        # Part 4 is on the wire, half sent, when the server is killed.
        path_qs = f"/{bucket}/{key}?partNumber=4&uploadId={upload_id}"
        headers = signed_headers(a, "PUT", path_qs)
        conn = http.client.HTTPConnection("127.0.0.1", a.port, timeout=30)
        conn.putrequest("PUT", path_qs, skip_host=True, skip_accept_encoding=True)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.putheader("Content-Length", str(len(parts[3])))
        conn.endheaders()
        conn.send(parts[3][:2 * MiB])
        udir = self.upload_dir(bucket, upload_id, a)
        in_flight = wait_until(
            lambda: any(".dgtmp." in f for f in self.files_under(udir)), 10)
        self.assertTrue(in_flight, "part 4 never started streaming to disk")
        self.assertEqual(a.stop(signal.SIGKILL), -signal.SIGKILL)
        conn.close()

        b = ProxyProcess(data_dir=a.data_dir)
        self.addCleanup(b.cleanup)  # runs before a's cleanup, which removes the data dir
        b.start()
        s3b = b.client()
        self.assertEqual(b.temp_files(), [], "the half-written part was not swept at start-up")
        listed = s3b.list_parts(Bucket=bucket, Key=key, UploadId=upload_id)["Parts"]
        self.assertEqual([(p["PartNumber"], p["ETag"], p["Size"]) for p in listed],
                         [(n, etags[n], MIN_PART) for n in (1, 2, 3)])
        uploads = s3b.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        self.assertEqual([(u["Key"], u["UploadId"]) for u in uploads], [(key, upload_id)])
        for n in range(4, 8):
            etags[n] = self.part(bucket, key, upload_id, n, parts[n - 1], s3b)
        r = self.complete(bucket, key, upload_id, sorted(etags.items()), s3b)
        self.assertEqual(r["ETag"], mp_etag(parts))
        self.assertObject(bucket, key, b"".join(parts), mp_etag(parts), s3b)
        head = s3b.head_object(Bucket=bucket, Key=key)
        self.assertEqual(head["ContentType"], "application/x-db")
        self.assertEqual(head["Metadata"], {"origin": "night-run"})
        self.assertEqual(self.files_under(self.upload_dir(bucket, upload_id, b)), [])

    def test_two_processes_on_one_data_dir(self):
        """Parts through one server; ListParts, Complete (and its retry) through the other."""
        a = self.new_proxy()
        b = ProxyProcess(data_dir=a.data_dir)
        self.addCleanup(b.cleanup)
        b.start()
        s3a, s3b = a.client(), b.client()
        bucket = self.new_bucket(s3a)
        key = "shared/blob.dat"
        rng = random.Random(8)
        parts = [rng.randbytes(MIN_PART), rng.randbytes(MIN_PART), rng.randbytes(MiB)]
        upload_id = self.create(bucket, key, s3a)
        e1 = self.part(bucket, key, upload_id, 1, parts[0], s3a)
        e2 = self.part(bucket, key, upload_id, 2, parts[1], s3a)
        e3 = self.part(bucket, key, upload_id, 3, parts[2], s3b)

        uploads = s3b.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        self.assertEqual([(u["Key"], u["UploadId"]) for u in uploads], [(key, upload_id)])
        page = s3b.list_parts(Bucket=bucket, Key=key, UploadId=upload_id, MaxParts=2)
        self.assertTrue(page["IsTruncated"])
        self.assertEqual([(p["PartNumber"], p["ETag"]) for p in page["Parts"]], [(1, e1), (2, e2)])
        page = s3a.list_parts(Bucket=bucket, Key=key, UploadId=upload_id,
                              PartNumberMarker=page["NextPartNumberMarker"])
        self.assertFalse(page["IsTruncated"])
        self.assertEqual([(p["PartNumber"], p["ETag"], p["Size"]) for p in page["Parts"]],
                         [(3, e3, MiB)])

        etag = mp_etag(parts)
        r = self.complete(bucket, key, upload_id, [(1, e1), (2, e2), (3, e3)], s3b)
        self.assertEqual(r["ETag"], etag)
        self.assertObject(bucket, key, b"".join(parts), etag, s3a)
        self.assertObject(bucket, key, b"".join(parts), etag, s3b)
        # A client whose Complete answer was lost retries through the other server.
        r = self.complete(bucket, key, upload_id, [(1, e1), (2, e2), (3, e3)], s3a)
        self.assertEqual(r["ETag"], etag)
        self.assertEqual(s3a.list_multipart_uploads(Bucket=bucket).get("Uploads", []), [])
        self.assertS3Error("NoSuchUpload", 404, s3a.upload_part, Bucket=bucket, Key=key,
                           UploadId=upload_id, PartNumber=4, Body=b"late")


# -- protocol ------------------------------------------------------------------------------------
class ProtocolTests(MultipartCase):

    def _two_parts(self, bucket: str, key: str, seed: int) -> tuple[str, list[bytes], list[str]]:
        rng = random.Random(seed)
        parts = [rng.randbytes(MIN_PART), rng.randbytes(100 * KiB)]
        upload_id = self.create(bucket, key)
        etags = [self.part(bucket, key, upload_id, n, p) for n, p in enumerate(parts, 1)]
        return upload_id, parts, etags

    def test_parts_out_of_order_is_invalid_part_order(self):
        bucket = self.new_bucket()
        upload_id, parts, (e1, e2) = self._two_parts(bucket, "k.dat", 10)
        self.assertS3Error("InvalidPartOrder", None, self.complete, bucket, "k.dat", upload_id,
                           [(2, e2), (1, e1)])
        self.assertS3Error("InvalidPartOrder", None, self.complete, bucket, "k.dat", upload_id,
                           [(1, e1), (1, e1)])
        # Nothing was created, and the upload can still be completed properly.
        self.assertS3Error("NoSuchKey", 404, self.s3.get_object, Bucket=bucket, Key="k.dat")
        self.complete(bucket, "k.dat", upload_id, [(1, e1), (2, e2)])
        self.assertObject(bucket, "k.dat", b"".join(parts), mp_etag(parts))

    def test_wrong_or_missing_part_is_invalid_part(self):
        bucket = self.new_bucket()
        upload_id, parts, (e1, e2) = self._two_parts(bucket, "k.dat", 11)
        self.assertS3Error("InvalidPart", None, self.complete, bucket, "k.dat", upload_id,
                           [(1, e1), (2, md5_etag(b"something else"))])
        self.assertS3Error("InvalidPart", None, self.complete, bucket, "k.dat", upload_id,
                           [(1, e1), (3, e2)])
        self.assertS3Error("404", 404, self.s3.head_object, Bucket=bucket, Key="k.dat")
        # Unquoted ETags, as some clients send them, are the same ETags.
        self.complete(bucket, "k.dat", upload_id, [(1, e1.strip('"')), (2, e2.strip('"'))])
        self.assertObject(bucket, "k.dat", b"".join(parts), mp_etag(parts))

    def test_small_non_final_part_is_entity_too_small(self):
        bucket = self.new_bucket()
        key = "small.dat"
        upload_id = self.create(bucket, key)
        small, last = b"s" * (MIN_PART - 1), b"last part may be tiny"
        e1 = self.part(bucket, key, upload_id, 1, small)
        e2 = self.part(bucket, key, upload_id, 2, last)
        self.assertS3Error("EntityTooSmall", None, self.complete, bucket, key, upload_id,
                           [(1, e1), (2, e2)])
        self.assertS3Error("404", 404, self.s3.head_object, Bucket=bucket, Key=key)
        # A single small part is a legal (final) part; exactly 5 MiB is big enough.
        self.complete(bucket, key, upload_id, [(2, e2)])
        self.assertObject(bucket, key, last, mp_etag([last]))
        five = b"f" * MIN_PART
        self.upload_in_parts(bucket, "five.dat", [five, last])
        self.assertObject(bucket, "five.dat", five + last, mp_etag([five, last]))

    def test_part_numbers_outside_1_to_10000_are_invalid_argument(self):
        bucket = self.new_bucket()
        key = "n.dat"
        upload_id = self.create(bucket, key)
        for n in (0, 10001):
            status, _, body = raw_request(
                self.proxy, "PUT", f"/{bucket}/{key}?partNumber={n}&uploadId={upload_id}",
                b"part body")
            self.assertEqual((status, xml_code(body)), (400, "InvalidArgument"), n)
        for n in (-1, "abc"):
            status, _, body = raw_request(
                self.proxy, "PUT", f"/{bucket}/{key}?partNumber={n}&uploadId={upload_id}", b"x")
            self.assertEqual((status, xml_code(body)), (400, "InvalidArgument"), n)
        self.assertS3Error("InvalidArgument", 400, self.s3.upload_part, Bucket=bucket, Key=key,
                           UploadId=upload_id, PartNumber=10001, Body=b"x")
        self.part(bucket, key, upload_id, 1, b"first")
        self.part(bucket, key, upload_id, 10000, b"last")
        listed = self.s3.list_parts(Bucket=bucket, Key=key, UploadId=upload_id)["Parts"]
        self.assertEqual([p["PartNumber"] for p in listed], [1, 10000])

    def test_content_md5_mismatch_is_bad_digest(self):
        bucket = self.new_bucket()
        key = "md5.dat"
        upload_id = self.create(bucket, key)
        good = b"the real part" * 1000
        e1 = self.part(bucket, key, upload_id, 1, good)
        wrong = base64.b64encode(hashlib.md5(b"not the body").digest()).decode()
        self.assertS3Error("BadDigest", 400, self.s3.upload_part, Bucket=bucket, Key=key,
                           UploadId=upload_id, PartNumber=1, Body=b"a replacement", ContentMD5=wrong)
        self.assertS3Error("BadDigest", 400, self.s3.upload_part, Bucket=bucket, Key=key,
                           UploadId=upload_id, PartNumber=2, Body=b"a new part", ContentMD5=wrong)
        # The failed writes changed nothing: part 1 is the good one, part 2 does not exist.
        listed = self.s3.list_parts(Bucket=bucket, Key=key, UploadId=upload_id)["Parts"]
        self.assertEqual([(p["PartNumber"], p["ETag"], p["Size"]) for p in listed],
                         [(1, e1, len(good))])
        self.assertEqual([f for f in self.files_under(self.upload_dir(bucket, upload_id))
                          if ".dgtmp." in f], [])
        right = base64.b64encode(hashlib.md5(b"a new part").digest()).decode()
        self.s3.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=2,
                            Body=b"a new part", ContentMD5=right)

    def test_no_such_upload(self):
        bucket = self.new_bucket()
        key = "nsu.dat"
        other = "other.dat"
        live = self.create(bucket, key)
        self.part(bucket, key, live, 1, b"live part")
        aborted = self.create(bucket, key)
        self.s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=aborted)
        completed = self.create(bucket, key)
        e = self.part(bucket, key, completed, 1, b"done")
        self.complete(bucket, key, completed, [(1, e)])
        cases = [(key, "0" * 32), (key, "no-such-upload-id"), (key, "../../x"),
                 (key, aborted), (other, live), (key + "x", completed)]
        for k, upload_id in cases:
            self.assertS3Error("NoSuchUpload", 404, self.s3.upload_part, Bucket=bucket, Key=k,
                               UploadId=upload_id, PartNumber=1, Body=b"x")
            self.assertS3Error("NoSuchUpload", 404, self.s3.list_parts, Bucket=bucket, Key=k,
                               UploadId=upload_id)
            self.assertS3Error("NoSuchUpload", 404, self.complete, bucket, k, upload_id,
                               [(1, md5_etag(b"x"))])
            self.assertS3Error("NoSuchUpload", 404, self.s3.abort_multipart_upload,
                               Bucket=bucket, Key=k, UploadId=upload_id)
            self.assertS3Error("NoSuchUpload", 404, self.s3.upload_part_copy, Bucket=bucket,
                               Key=k, UploadId=upload_id, PartNumber=1,
                               CopySource={"Bucket": bucket, "Key": key})
        self.assertS3Error("NoSuchUpload", 404, self.s3.upload_part, Bucket=bucket, Key=key,
                           UploadId=completed, PartNumber=2, Body=b"x")
        # The live upload survived the attempts made with another key.
        listed = self.s3.list_parts(Bucket=bucket, Key=key, UploadId=live)["Parts"]
        self.assertEqual([p["ETag"] for p in listed], [md5_etag(b"live part")])
        self.assertEqual(self.s3.get_object(Bucket=bucket, Key=key)["Body"].read(), b"done")
        self.assertFalse(os.path.exists(os.path.join(self.proxy.data_dir, bucket, "deltaspaces",
                                                     other)))

    def test_abort_removes_the_parts(self):
        bucket = self.new_bucket()
        key = "abort/me.dat"
        upload_id = self.create(bucket, key)
        for n in (1, 2, 3):
            self.part(bucket, key, upload_id, n, os.urandom(256 * KiB))
        udir = self.upload_dir(bucket, upload_id)
        self.assertEqual(sorted(os.path.basename(f) for f in self.files_under(udir)),
                         ["part-00001", "part-00002", "part-00003", "upload.json"])
        r = self.s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        self.assertEqual(r["ResponseMetadata"]["HTTPStatusCode"], 204)
        self.assertEqual(self.files_under(udir), [])
        self.assertEqual(self.s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []), [])
        self.assertS3Error("404", 404, self.s3.head_object, Bucket=bucket, Key=key)
        self.assertEqual(self.s3.list_objects_v2(Bucket=bucket).get("Contents", []), [])
        self.assertS3Error("NoSuchUpload", 404, self.s3.abort_multipart_upload, Bucket=bucket,
                           Key=key, UploadId=upload_id)

    def test_retried_complete_returns_the_same_etag(self):
        bucket = self.new_bucket()
        key = "retry.dat"
        upload_id, parts, (e1, e2) = self._two_parts(bucket, key, 12)
        first = self.complete(bucket, key, upload_id, [(1, e1), (2, e2)])
        self.assertEqual(first["ETag"], mp_etag(parts))
        again = self.complete(bucket, key, upload_id, [(1, e1), (2, e2)])
        self.assertEqual(again["ResponseMetadata"]["HTTPStatusCode"], 200)
        self.assertEqual(again["ETag"], first["ETag"])
        self.assertEqual((again["Bucket"], again["Key"]), (bucket, key))
        self.assertObject(bucket, key, b"".join(parts), mp_etag(parts))
        # The parts are gone: the object is all that remains.
        self.assertEqual(self.files_under(self.upload_dir(bucket, upload_id)), [])

    def test_conditional_complete(self):
        """If-None-Match: * and If-Match on Complete, as AWS applies them: a
        refused Complete keeps the old object, and the upload stays open."""
        bucket = self.new_bucket()
        key = "cond.dat"
        old = self.s3.put_object(Bucket=bucket, Key=key, Body=b"the original")["ETag"]
        upload_id, parts, (e1, e2) = self._two_parts(bucket, key, 12)
        done = {"Parts": [{"PartNumber": 1, "ETag": e1}, {"PartNumber": 2, "ETag": e2}]}
        self.assertS3Error("PreconditionFailed", 412, self.s3.complete_multipart_upload,
                           Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload=done,
                           IfNoneMatch="*")
        self.assertS3Error("PreconditionFailed", 412, self.s3.complete_multipart_upload,
                           Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload=done,
                           IfMatch=mp_etag(parts))
        self.assertObject(bucket, key, b"the original", old)
        self.assertS3Error("NoSuchKey", 404, self.s3.complete_multipart_upload,
                           Bucket=bucket, Key="elsewhere.dat", UploadId=upload_id,
                           MultipartUpload=done, IfMatch=old)
        got = self.s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id,
                                                MultipartUpload=done, IfMatch=old)
        self.assertObject(bucket, key, b"".join(parts), got["ETag"])

    def test_get_and_head_by_part_number(self):
        """GET/HEAD ?partNumber=N, as the SDKs that download by part use it: part
        N's bytes (206, Content-Range) and the parts count, for a plain and a
        delta-candidate name; an object put whole is its own single part 1
        (no parts count); a copy of a multipart object too."""
        bucket = self.new_bucket()
        rng = random.Random(77)
        parts = [rng.randbytes(MIN_PART), rng.randbytes(MIN_PART), rng.randbytes(1000)]
        whole = b"".join(parts)
        for key in ("byparts.dat", "byparts.zip"):
            upload_id = self.create(bucket, key)
            etags = [self.part(bucket, key, upload_id, n, p) for n, p in enumerate(parts, 1)]
            tag = self.complete(bucket, key, upload_id, list(enumerate(etags, 1)))["ETag"]
            at = 0
            for n, body in enumerate(parts, 1):
                got = self.s3.get_object(Bucket=bucket, Key=key, PartNumber=n)
                self.assertEqual(got["ResponseMetadata"]["HTTPStatusCode"], 206, (key, n))
                self.assertEqual(got["Body"].read(), body, (key, n))
                self.assertEqual((got["PartsCount"], got["ETag"]), (3, tag), (key, n))
                self.assertEqual(got["ContentRange"],
                                 f"bytes {at}-{at + len(body) - 1}/{len(whole)}", (key, n))
                head = self.s3.head_object(Bucket=bucket, Key=key, PartNumber=n)
                self.assertEqual((head["ContentLength"], head["PartsCount"]), (len(body), 3))
                at += len(body)
            self.assertS3Error("InvalidPartNumber", 416, self.s3.get_object, Bucket=bucket,
                               Key=key, PartNumber=4)
            self.assertS3Error("InvalidArgument", 400, self.s3.get_object, Bucket=bucket,
                               Key=key, PartNumber=10001)
            self.assertS3Error("InvalidRequest", 400, self.s3.get_object, Bucket=bucket,
                               Key=key, PartNumber=1, Range="bytes=0-9")
        self.s3.put_object(Bucket=bucket, Key="single.dat", Body=b"one piece")
        self.s3.copy_object(Bucket=bucket, Key="copied.dat",
                            CopySource={"Bucket": bucket, "Key": "byparts.dat"})
        for key, body in (("single.dat", b"one piece"), ("copied.dat", whole)):
            got = self.s3.get_object(Bucket=bucket, Key=key, PartNumber=1)
            self.assertEqual(got["Body"].read(), body, key)
            self.assertNotIn("PartsCount", got)
            self.assertS3Error("InvalidPartNumber", 416, self.s3.get_object, Bucket=bucket,
                               Key=key, PartNumber=2)

    def test_same_part_number_twice_keeps_the_last(self):
        bucket = self.new_bucket()
        key = "twice.dat"
        upload_id = self.create(bucket, key)
        old = self.part(bucket, key, upload_id, 1, b"old" * 1000)
        new = self.part(bucket, key, upload_id, 1, b"new" * 2000)
        listed = self.s3.list_parts(Bucket=bucket, Key=key, UploadId=upload_id)["Parts"]
        self.assertEqual([(p["PartNumber"], p["ETag"], p["Size"]) for p in listed],
                         [(1, new, 6000)])
        self.assertS3Error("InvalidPart", None, self.complete, bucket, key, upload_id, [(1, old)])
        self.complete(bucket, key, upload_id, [(1, new)])
        self.assertObject(bucket, key, b"new" * 2000, mp_etag([b"new" * 2000]))

    def test_create_carries_content_type_and_metadata(self):
        bucket = self.new_bucket()
        key = "meta.dat"
        upload_id = self.create(bucket, key, ContentType="text/csv",
                                Metadata={"owner": "ops", "run": "42"},
                                CacheControl="no-cache", ContentDisposition="inline")
        e = self.part(bucket, key, upload_id, 1, b"a,b\n1,2\n")
        self.complete(bucket, key, upload_id, [(1, e)])
        head = self.s3.head_object(Bucket=bucket, Key=key)
        self.assertEqual(head["ContentType"], "text/csv")
        self.assertEqual(head["Metadata"], {"owner": "ops", "run": "42"})
        self.assertEqual((head["CacheControl"], head["ContentDisposition"]), ("no-cache", "inline"))

    def test_list_parts_paging(self):
        bucket = self.new_bucket()
        key = "parts.dat"
        upload_id = self.create(bucket, key)
        bodies = {n: f"part {n} ".encode() * (100 * n) for n in (1, 2, 3, 5, 8)}
        for n, body in bodies.items():
            self.part(bucket, key, upload_id, n, body)
        expect = [(n, md5_etag(b), len(b)) for n, b in sorted(bodies.items())]

        def page(**kw):
            r = self.s3.list_parts(Bucket=bucket, Key=key, UploadId=upload_id, **kw)
            return r, [(p["PartNumber"], p["ETag"], p["Size"]) for p in r.get("Parts", [])]

        r, got = page(MaxParts=2)
        self.assertEqual(got, expect[:2])
        self.assertTrue(r["IsTruncated"])
        self.assertEqual((r["MaxParts"], r["NextPartNumberMarker"]), (2, 2))
        r, got = page(MaxParts=2, PartNumberMarker=2)
        self.assertEqual(got, expect[2:4])
        self.assertTrue(r["IsTruncated"])
        self.assertEqual((r["PartNumberMarker"], r["NextPartNumberMarker"]), (2, 5))
        r, got = page(MaxParts=2, PartNumberMarker=5)
        self.assertEqual(got, expect[4:])
        self.assertFalse(r["IsTruncated"])
        r, got = page(PartNumberMarker=4)  # a marker between parts
        self.assertEqual(got, expect[3:])
        r, got = page(PartNumberMarker=8)
        self.assertEqual(got, [])
        self.assertFalse(r["IsTruncated"])
        r, got = page()
        self.assertEqual(got, expect)
        self.assertFalse(r["IsTruncated"])
        self.assertEqual((r["Bucket"], r["Key"], r["UploadId"]), (bucket, key, upload_id))
        paginated = [p["PartNumber"] for pg in self.s3.get_paginator("list_parts").paginate(
            Bucket=bucket, Key=key, UploadId=upload_id, PaginationConfig={"PageSize": 1})
            for p in pg.get("Parts", [])]
        self.assertEqual(paginated, [1, 2, 3, 5, 8])
        # The aws CLI pages the same way.
        out = self.proxy.aws("s3api", "list-parts", "--bucket", bucket, "--key", key,
                             "--upload-id", upload_id, "--page-size", "2",
                             "--query", "Parts[].PartNumber", "--output", "text")
        self.assertEqual(out.stdout.decode().split(), ["1", "2", "3", "5", "8"])

    def test_list_multipart_uploads_prefix_and_max_uploads(self):
        bucket = self.new_bucket()
        ids = {}
        for key in ("logs/2024/a.log", "logs/2025/b.log", "logs/2025/c.log", "other/d.log"):
            ids[key] = self.create(bucket, key)
        r = self.s3.list_multipart_uploads(Bucket=bucket, Prefix="logs/")
        self.assertEqual([(u["Key"], u["UploadId"]) for u in r["Uploads"]],
                         [(k, ids[k]) for k in sorted(ids) if k.startswith("logs/")])
        self.assertFalse(r["IsTruncated"])
        self.assertEqual(r["Prefix"], "logs/")
        r = self.s3.list_multipart_uploads(Bucket=bucket, Prefix="logs/2025/")
        self.assertEqual([u["Key"] for u in r["Uploads"]], ["logs/2025/b.log", "logs/2025/c.log"])
        r = self.s3.list_multipart_uploads(Bucket=bucket, Prefix="nothing/")
        self.assertEqual(r.get("Uploads", []), [])
        r = self.s3.list_multipart_uploads(Bucket=bucket, MaxUploads=2)
        self.assertEqual([u["Key"] for u in r["Uploads"]], ["logs/2024/a.log", "logs/2025/b.log"])
        self.assertTrue(r["IsTruncated"])
        self.assertEqual(r["MaxUploads"], 2)
        self.assertEqual((r["NextKeyMarker"], r["NextUploadIdMarker"]),
                         ("logs/2025/b.log", ids["logs/2025/b.log"]))
        r = self.s3.list_multipart_uploads(Bucket=bucket, MaxUploads=2,
                                           KeyMarker=r["NextKeyMarker"],
                                           UploadIdMarker=r["NextUploadIdMarker"])
        self.assertEqual([u["Key"] for u in r["Uploads"]], ["logs/2025/c.log", "other/d.log"])
        self.assertFalse(r["IsTruncated"])
        r = self.s3.list_multipart_uploads(Bucket=bucket, Prefix="logs/", MaxUploads=1)
        self.assertEqual([u["Key"] for u in r["Uploads"]], ["logs/2024/a.log"])
        self.assertTrue(r["IsTruncated"])
        for u in self.s3.list_multipart_uploads(Bucket=bucket)["Uploads"]:
            self.assertEqual(u["StorageClass"], "STANDARD")
            self.assertLess(abs(time.time() - u["Initiated"].timestamp()), 300)
        out = self.proxy.aws("s3api", "list-multipart-uploads", "--bucket", bucket,
                             "--prefix", "logs/2025/", "--query", "Uploads[].Key",
                             "--output", "text")
        self.assertEqual(out.stdout.decode().split(), ["logs/2025/b.log", "logs/2025/c.log"])

    def test_list_multipart_uploads_key_marker_alone_skips_that_key(self):
        """Without upload-id-marker, only keys after key-marker are listed (S3's rule)."""
        bucket = self.new_bucket()
        for key in ("a.dat", "b.dat", "b.dat", "c.dat"):
            self.create(bucket, key)
        r = self.s3.list_multipart_uploads(Bucket=bucket, KeyMarker="b.dat")
        self.assertEqual([u["Key"] for u in r.get("Uploads", [])], ["c.dat"])


    def test_list_multipart_uploads_pages_through_every_upload_once(self):
        """Several uploads of one key, one per page: each is listed exactly once,
        oldest first, as S3 orders uploads of a key by initiation time."""
        bucket = self.new_bucket()
        made = [("a.dat", self.create(bucket, "a.dat"))]
        for _ in range(5):
            made.append(("same.dat", self.create(bucket, "same.dat")))
            time.sleep(0.002)
        made.append(("z.dat", self.create(bucket, "z.dat")))
        seen = [(u["Key"], u["UploadId"])
                for pg in self.s3.get_paginator("list_multipart_uploads").paginate(
                    Bucket=bucket, PaginationConfig={"PageSize": 1})
                for u in pg.get("Uploads", [])]
        self.assertEqual(seen, made)


    def test_upload_part_copy_with_and_without_range(self):
        bucket = self.new_bucket()
        src = os.urandom(12 * MiB)
        self.s3.put_object(Bucket=bucket, Key="src/source.dat", Body=src)
        key = "dst/assembled.dat"
        upload_id = self.create(bucket, key)
        copies = [(1, f"bytes=0-{6 * MiB - 1}", src[:6 * MiB]),
                  (2, None, src),
                  (3, f"bytes={6 * MiB}-{12 * MiB - 1}", src[6 * MiB:]),
                  (4, "bytes=100-5242979", src[100:100 + MIN_PART])]
        parts = []
        for n, rng, expect in copies:
            kw = {"CopySourceRange": rng} if rng else {}
            r = self.s3.upload_part_copy(Bucket=bucket, Key=key, UploadId=upload_id,
                                         PartNumber=n,
                                         CopySource={"Bucket": bucket, "Key": "src/source.dat"},
                                         **kw)
            self.assertEqual(r["CopyPartResult"]["ETag"], md5_etag(expect), n)
            self.assertIn("LastModified", r["CopyPartResult"])
            parts.append(expect)
        tail = b"and a tail uploaded normally"
        self.part(bucket, key, upload_id, 5, tail)
        parts.append(tail)
        listed = self.s3.list_parts(Bucket=bucket, Key=key, UploadId=upload_id)["Parts"]
        self.assertEqual([(p["PartNumber"], p["Size"]) for p in listed],
                         [(n, len(p)) for n, p in enumerate(parts, 1)])
        self.complete(bucket, key, upload_id, [(n, md5_etag(p)) for n, p in enumerate(parts, 1)])
        self.assertObject(bucket, key, b"".join(parts), mp_etag(parts))
        # A missing source is NoSuchKey and adds no part.
        self.assertS3Error("NoSuchKey", 404, self.s3.upload_part_copy, Bucket=bucket,
                           Key="dst/other.dat", UploadId=self.create(bucket, "dst/other.dat"),
                           PartNumber=1, CopySource={"Bucket": bucket, "Key": "src/missing"})

    def test_internal_state_never_listed(self):
        bucket = self.new_bucket()
        self.s3.put_object(Bucket=bucket, Key="visible.txt", Body=b"hello")
        self.s3.put_object(Bucket=bucket, Key="dir/inner.txt", Body=b"hello")
        open_id = self.create(bucket, "dir/open.dat")
        self.part(bucket, "dir/open.dat", open_id, 1, b"open part")
        self.upload_in_parts(bucket, "done.dat", [b"finished"])  # leaves a completion record
        self.assertTrue(os.listdir(os.path.join(self.proxy.data_dir, bucket, "deltaspaces", ".dg",
                                                "completed")))
        expect = ["dir/inner.txt", "done.dat", "visible.txt"]

        def keys(r):
            return [o["Key"] for o in r.get("Contents", [])]

        self.assertEqual(keys(self.s3.list_objects_v2(Bucket=bucket)), expect)
        self.assertEqual(keys(self.s3.list_objects(Bucket=bucket)), expect)
        r = self.s3.list_objects_v2(Bucket=bucket, Delimiter="/")
        self.assertEqual(keys(r), ["done.dat", "visible.txt"])
        self.assertEqual([p["Prefix"] for p in r.get("CommonPrefixes", [])], ["dir/"])
        for prefix in (".", ".d", ".dg", ".dg/", ".dg/multipart/", f".dg/multipart/{open_id}/",
                       ".dg/completed/"):
            # (".dg/" and ".dg/multipart/" with delimiter "/" leak: see the next test)
            leaky = prefix in (".dg/", ".dg/multipart/")
            for delimiter in ("",) if leaky else ("", "/"):
                r = self.s3.list_objects_v2(Bucket=bucket, Prefix=prefix, Delimiter=delimiter)
                self.assertEqual((keys(r), r.get("CommonPrefixes", [])), ([], []),
                                 f"prefix={prefix!r} delimiter={delimiter!r}")
        self.assertEqual(keys(self.s3.list_objects_v2(Bucket=bucket, StartAfter=".")), expect)
        paged = [o["Key"] for pg in self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, PaginationConfig={"PageSize": 1}) for o in pg.get("Contents", [])]
        self.assertEqual(paged, expect)
        ls = self.proxy.aws("s3", "ls", "--recursive", f"s3://{bucket}").stdout.decode()
        self.assertNotIn(".dg", ls)
        self.assertEqual(len(ls.strip().splitlines()), 3, ls)

    def test_internal_prefixes_never_listed_with_a_delimiter(self):
        """`aws s3 ls s3://bucket/.dg/` must not reveal the internal state either."""
        bucket = self.new_bucket()
        self.s3.put_object(Bucket=bucket, Key="visible.txt", Body=b"hello")
        open_id = self.create(bucket, "open.dat")
        self.upload_in_parts(bucket, "done.dat", [b"finished"])
        for prefix in (".dg/", ".dg/multipart/", ".dg/completed/", f".dg/multipart/{open_id}/"):
            for list_op in (self.s3.list_objects_v2, self.s3.list_objects):
                r = list_op(Bucket=bucket, Prefix=prefix, Delimiter="/")
                self.assertEqual((r.get("Contents", []), r.get("CommonPrefixes", [])), ([], []),
                                 f"{list_op.__name__} prefix={prefix!r}")
        ls = self.proxy.aws("s3", "ls", f"s3://{bucket}/.dg/", check=False).stdout.decode()
        self.assertNotIn(open_id, ls)
        self.assertNotIn("multipart", ls)


    def test_internal_keys_are_refused(self):
        bucket = self.new_bucket()
        upload_id = self.create(bucket, "real.dat")
        self.part(bucket, "real.dat", upload_id, 1, b"precious")
        done = self.upload_in_parts(bucket, "done.dat", [b"finished"])
        state = f".dg/multipart/{upload_id}/upload.json"
        part = f".dg/multipart/{upload_id}/part-00001"
        record = f".dg/completed/{done}.json"
        for key in (state, part, ".dg/new-object", ".dg/completed/x.json"):
            self.assertS3Error("InvalidArgument", 400, self.s3.put_object, Bucket=bucket,
                               Key=key, Body=b"overwrite")
            self.assertS3Error("InvalidArgument", 400, self.s3.create_multipart_upload,
                               Bucket=bucket, Key=key)
            self.assertS3Error("InvalidArgument", 400, self.s3.copy_object, Bucket=bucket,
                               Key=key, CopySource={"Bucket": bucket, "Key": "done.dat"})
        for key in (state, part, record):
            for fn in (self.s3.get_object, self.s3.head_object):
                code, status = self.s3_error(fn, Bucket=bucket, Key=key)
                self.assertIn(status, (400, 404), key)
            self.assertS3Error("InvalidArgument", 400, self.s3.delete_object, Bucket=bucket,
                               Key=key)
            self.assertS3Error("InvalidArgument", 400, self.s3.copy_object, Bucket=bucket,
                               Key="stolen.dat", CopySource={"Bucket": bucket, "Key": key})
            other = self.create(bucket, "thief.dat")
            self.assertS3Error("InvalidArgument", 400, self.s3.upload_part_copy, Bucket=bucket,
                               Key="thief.dat", UploadId=other, PartNumber=1,
                               CopySource={"Bucket": bucket, "Key": key})
            self.s3.abort_multipart_upload(Bucket=bucket, Key="thief.dat", UploadId=other)
        r = self.s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": state},
                                                                      {"Key": part}]})
        self.assertEqual(sorted(e["Key"] for e in r.get("Errors", [])), sorted([state, part]))
        self.assertEqual(r.get("Deleted", []), [])
        # The upload's state is intact and it completes.
        listed = self.s3.list_parts(Bucket=bucket, Key="real.dat", UploadId=upload_id)["Parts"]
        self.assertEqual([p["ETag"] for p in listed], [md5_etag(b"precious")])
        self.complete(bucket, "real.dat", upload_id, [(1, md5_etag(b"precious"))])
        self.assertObject(bucket, "real.dat", b"precious", mp_etag([b"precious"]))
        self.assertS3Error("404", 404, self.s3.head_object, Bucket=bucket, Key="stolen.dat")

    def test_delete_bucket_with_only_open_uploads(self):
        """As on AWS: the bucket goes, and its open uploads with it."""
        bucket = self.new_bucket()
        upload_id = self.create(bucket, "pending.dat")
        self.part(bucket, "pending.dat", upload_id, 1, os.urandom(64 * KiB))
        self.upload_in_parts(bucket, "gone.dat", [b"x"])
        self.s3.delete_object(Bucket=bucket, Key="gone.dat")  # leaves a completion record only
        r = self.s3.delete_bucket(Bucket=bucket)
        self.assertEqual(r["ResponseMetadata"]["HTTPStatusCode"], 204)
        self.assertS3Error("404", 404, self.s3.head_bucket, Bucket=bucket)
        self.assertFalse(os.path.exists(os.path.join(self.proxy.data_dir, bucket)))
        code, status = self.s3_error(self.s3.upload_part, Bucket=bucket, Key="pending.dat",
                                     UploadId=upload_id, PartNumber=2, Body=b"x")
        self.assertEqual(status, 404)  # NoSuchUpload today; see the next test
        self.assertS3Error("NoSuchBucket", 404, self.s3.list_multipart_uploads, Bucket=bucket)
        # A new bucket of the same name starts clean.
        self.s3.create_bucket(Bucket=bucket)
        self.assertEqual(self.s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []), [])
        self.assertS3Error("NoSuchUpload", 404, self.s3.list_parts, Bucket=bucket,
                           Key="pending.dat", UploadId=upload_id)

    def test_upload_operations_on_a_missing_bucket_are_no_such_bucket(self):
        bucket = self.new_bucket()
        upload_id = self.create(bucket, "k.dat")
        e = self.part(bucket, "k.dat", upload_id, 1, b"x")
        self.s3.delete_bucket(Bucket=bucket)
        calls = {
            "UploadPart": lambda: self.s3.upload_part(Bucket=bucket, Key="k.dat",
                                                      UploadId=upload_id, PartNumber=1, Body=b"x"),
            "ListParts": lambda: self.s3.list_parts(Bucket=bucket, Key="k.dat",
                                                    UploadId=upload_id),
            "Complete": lambda: self.complete(bucket, "k.dat", upload_id, [(1, e)]),
            "Abort": lambda: self.s3.abort_multipart_upload(Bucket=bucket, Key="k.dat",
                                                            UploadId=upload_id),
            "CreateMultipartUpload": lambda: self.create(bucket, "k.dat"),
        }
        got = {name: self.s3_error(call) for name, call in calls.items()}
        self.assertEqual(got, {name: ("NoSuchBucket", 404) for name in calls})


    def test_complete_validation_errors_have_status_400(self):
        """InvalidPartOrder, InvalidPart and EntityTooSmall are known before any byte is
        assembled; S3 sends them as 400, not as a 200 whose body is an error."""
        bucket = self.new_bucket()
        key = "v.dat"
        upload_id = self.create(bucket, key)
        e1 = self.part(bucket, key, upload_id, 1, b"tiny")
        e2 = self.part(bucket, key, upload_id, 2, b"tail")

        def complete_xml(parts):
            return ("<CompleteMultipartUpload>" + "".join(
                f"<Part><PartNumber>{n}</PartNumber><ETag>{t}</ETag></Part>" for n, t in parts)
                + "</CompleteMultipartUpload>").encode()

        cases = {"InvalidPartOrder": [(2, e2), (1, e1)],
                 "InvalidPart": [(1, md5_etag(b"other"))],
                 "EntityTooSmall": [(1, e1), (2, e2)]}
        got = {}
        for code, parts in cases.items():
            status, _, body = raw_request(self.proxy, "POST", f"/{bucket}/{key}?uploadId={upload_id}",
                                          complete_xml(parts))
            got[code] = (status, xml_code(body))
        self.assertEqual(got, {code: (400, code) for code in cases})


    def test_delete_bucket_with_an_object_and_an_open_upload_is_refused(self):
        bucket = self.new_bucket()
        self.s3.put_object(Bucket=bucket, Key="keep.txt", Body=b"keep")
        upload_id = self.create(bucket, "pending.dat")
        e = self.part(bucket, "pending.dat", upload_id, 1, b"pending")
        self.assertS3Error("BucketNotEmpty", 409, self.s3.delete_bucket, Bucket=bucket)
        self.complete(bucket, "pending.dat", upload_id, [(1, e)])
        self.assertEqual(self.s3.get_object(Bucket=bucket, Key="pending.dat")["Body"].read(),
                         b"pending")


# -- open-upload limit -----------------------------------------------------------------------
class OwnServerCase(MultipartCase):
    """A server of its own per test, with C{env}; stopped after the liveness check
    (trial runs cleanups before tearDown, so this cannot be an addCleanup)."""

    env: dict = {}

    def setUp(self):
        self.proxy = ProxyProcess(env=self.env).start()
        self.s3 = self.proxy.client()

    def tearDown(self):
        try:
            super().tearDown()
        finally:
            self.proxy.cleanup()


class UploadLimitTests(OwnServerCase):

    env = {"DGP_MAX_MULTIPART_UPLOADS": "2"}

    def assertSlowDown(self, bucket: str, key: str, s3=None):
        e = self.assertRaises(ClientError, (s3 or self.s3).create_multipart_upload,
                              Bucket=bucket, Key=key)
        self.assertEqual((e.response["Error"]["Code"],
                          e.response["ResponseMetadata"]["HTTPStatusCode"]), ("SlowDown", 503))

    def test_third_open_upload_is_slow_down(self):
        bucket = self.new_bucket()
        first = self.create(bucket, "one.dat")
        self.create(bucket, "two.dat")
        self.assertSlowDown(bucket, "three.dat")
        self.assertEqual(len(self.s3.list_multipart_uploads(Bucket=bucket)["Uploads"]), 2)
        # An abort frees a slot ...
        self.s3.abort_multipart_upload(Bucket=bucket, Key="one.dat", UploadId=first)
        third = self.create(bucket, "three.dat")
        self.assertSlowDown(bucket, "four.dat")
        # ... and so does a Complete.
        e = self.part(bucket, "three.dat", third, 1, b"3")
        self.complete(bucket, "three.dat", third, [(1, e)])
        self.create(bucket, "four.dat")
        self.assertSlowDown(bucket, "five.dat")
        # The aws CLI sees the same 503 and says so.
        p = self.proxy.aws("s3api", "create-multipart-upload", "--bucket", bucket,
                           "--key", "six.dat", check=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn(b"SlowDown", p.stderr)

    def test_deleting_a_bucket_frees_its_uploads_slots(self):
        doomed = self.new_bucket()
        self.create(doomed, "one.dat")
        self.create(doomed, "two.dat")
        self.s3.delete_bucket(Bucket=doomed)
        bucket = self.new_bucket()
        self.create(bucket, "after.dat")  # no upload is open anywhere: must not be SlowDown


    def test_uploads_finished_by_another_process_free_slots(self):
        b = ProxyProcess(data_dir=self.proxy.data_dir, env={"DGP_MAX_MULTIPART_UPLOADS": "2"})
        self.addCleanup(b.cleanup)
        b.start()
        s3b = b.client()
        bucket = self.new_bucket()
        one = self.create(bucket, "one.dat")
        two = self.create(bucket, "two.dat")
        self.assertSlowDown(bucket, "three.dat", s3b)  # b counts what is on the backend
        s3b.abort_multipart_upload(Bucket=bucket, Key="one.dat", UploadId=one)
        e = self.part(bucket, "two.dat", two, 1, b"2", s3b)
        self.complete(bucket, "two.dat", two, [(1, e)], s3b)
        self.assertEqual(self.s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []), [])
        self.create(bucket, "three.dat")  # no upload is open: must not be SlowDown


    def test_duplicate_concurrent_completes_free_one_slot(self):
        """Three clients complete the same upload at once (a retry racing the original):
        one upload closed, so one slot freed, not three."""
        bucket = self.new_bucket()
        key = "race.dat"
        parts = [os.urandom(MIN_PART) for _ in range(4)]
        racing = self.create(bucket, key)
        etags = [self.part(bucket, key, racing, n, p) for n, p in enumerate(parts, 1)]
        self.create(bucket, "still-open.dat")
        barrier = threading.Barrier(3)
        results: list = []

        def complete():
            s3 = self.proxy.client()
            barrier.wait(10)
            try:
                results.append(self.complete(bucket, key, racing, list(enumerate(etags, 1)),
                                             s3)["ETag"])
            except ClientError as e:
                results.append(e.response["Error"]["Code"])

        threads = [threading.Thread(target=complete) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        self.assertIn(mp_etag(parts), results, results)
        self.assertObject(bucket, key, b"".join(parts), mp_etag(parts))
        open_now = self.s3.list_multipart_uploads(Bucket=bucket)["Uploads"]
        self.assertEqual([u["Key"] for u in open_now], ["still-open.dat"])
        self.create(bucket, "second.dat")  # 2 open: the limit
        self.assertSlowDown(bucket, "third.dat")



# -- idle sweep -------------------------------------------------------------------------------
class IdleSweepTests(OwnServerCase):

    env = {"DGP_MULTIPART_IDLE_TTL_HOURS": "0", "DGP_MULTIPART_SWEEP_INTERVAL_SECS": "1"}

    def test_abandoned_upload_is_swept(self):
        bucket = self.new_bucket()
        self.s3.put_object(Bucket=bucket, Key="keep.txt", Body=b"keep me")
        key = "abandoned/big.dat"
        upload_id = self.create(bucket, key)
        self.s3.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=1,
                            Body=os.urandom(64 * KiB))
        udir = self.upload_dir(bucket, upload_id)

        def gone() -> bool:
            return not self.s3.list_multipart_uploads(Bucket=bucket).get("Uploads")

        self.assertTrue(wait_until(gone, 15, 0.25), "the idle upload was never swept")
        self.assertEqual(self.files_under(udir), [])
        self.assertS3Error("NoSuchUpload", 404, self.s3.list_parts, Bucket=bucket, Key=key,
                           UploadId=upload_id)
        self.assertS3Error("NoSuchUpload", 404, self.s3.upload_part, Bucket=bucket, Key=key,
                           UploadId=upload_id, PartNumber=2, Body=b"x")
        self.assertEqual(self.s3.get_object(Bucket=bucket, Key="keep.txt")["Body"].read(),
                         b"keep me")
        self.assertTrue(wait_until(lambda: upload_id in self.proxy.log(), 5),
                        "the sweep is not logged")
        line = [ln for ln in self.proxy.log().splitlines() if upload_id in ln][0]
        self.assertIn("Sweeping multipart upload", line)
        self.assertIn(bucket, line)
