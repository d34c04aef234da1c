"""A real C{twistd -n dgproxy} process for end-to-end tests, plus real clients.

E2E tests are plain synchronous trial tests: the server runs in another
process, so blocking client calls (boto3, the aws CLI) are fine here.
"""

from __future__ import annotations

import atexit
import hashlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Optional

import boto3
from botocore.config import Config as BotoConfig

VENV_BIN = os.path.dirname(os.path.abspath(sys.executable))
TWISTD = os.path.join(VENV_BIN, "twistd")
AWS = shutil.which("aws", path=VENV_BIN) or shutil.which("aws")
ACCESS_KEY = "AKIDE2ETEST00000001"
SECRET_KEY = "e2e-secret-" + "x" * 29


_bucket_counter = itertools.count()


class LiveProxyCase:
    """For TestCases against a shared server in C{self.proxy} with a client in
    C{self.s3}: fresh bucket names, and a failure if the server died."""

    def tearDown(self):
        if self.proxy.proc is None or self.proxy.proc.poll() is not None:
            self.fail("dgproxy died during the test:\n" + self.proxy.log()[-4000:])

    def new_bucket(self, create: bool = True) -> str:
        stem = self._testMethodName.replace("_", "-").lower()[:40].strip("-")
        name = f"{stem}-{next(_bucket_counter)}-{os.getpid() % 10000}"
        if create:
            self.s3.create_bucket(Bucket=name)
        return name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_log(path: str) -> str:
    """A process's log so far ("" before it has one)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


class ProxyProcess:
    """Starts dgproxy in a temp directory; C{stop()} sends SIGTERM and waits."""

    def __init__(self, env: Optional[dict] = None, config_yaml: Optional[str] = None,
                 data_dir: Optional[str] = None, open_access: bool = False):
        self.workdir = tempfile.mkdtemp(prefix="dgp-e2e-")
        self.data_dir = data_dir or os.path.join(self.workdir, "data")
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(self.workdir, "dgproxy.log")
        self.env = dict(os.environ)
        for k in list(self.env):
            if k.startswith(("DGP_", "AWS_")) or k.lower().endswith("_proxy"):
                del self.env[k]
        self.env.update({
            "DGP_LISTEN_ADDR": f"127.0.0.1:{self.port}",
            "DGP_DATA_DIR": self.data_dir,
            # An S3 backend without keys asks the AWS chain: not this
            # machine's files or an instance role, unless a test says so.
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        })
        if open_access:
            self.env["DGP_AUTHENTICATION"] = "none"
        else:
            self.env["DGP_ACCESS_KEY_ID"] = ACCESS_KEY
            self.env["DGP_SECRET_ACCESS_KEY"] = SECRET_KEY
        self.env.update(env or {})
        self.config_path = None
        if config_yaml is not None:
            self.config_path = os.path.join(self.workdir, "dgproxy.yaml")
            with open(self.config_path, "w") as f:
                f.write(config_yaml)
        self.proc: Optional[subprocess.Popen] = None

    def start(self, wait: bool = True) -> "ProxyProcess":
        args = [TWISTD, "-n", "--pidfile=", "dgproxy"]
        if self.config_path:
            args += ["--config", self.config_path]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, cwd=self.workdir, env=self.env,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready()
        return self

    def start_refused(self, timeout: float = 30.0) -> int:
        """Start, expecting dgproxy to refuse to run; its exit code."""
        self.start(wait=False)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"dgproxy did not exit within {timeout}s:\n{self.log()}") from None

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dgproxy exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.endpoint + "/_/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"dgproxy did not become ready:\n{self.log()}")

    def log(self) -> str:
        return read_log(self.log_path)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        code = self.proc.returncode
        self.proc = None
        return code

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def client(self, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY,
               addressing: str = "path", **config):
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=access_key,
            aws_secret_access_key=secret_key, region_name="us-east-1",
            config=BotoConfig(s3={"addressing_style": addressing},
                              retries={"total_max_attempts": 1}, **config))

    def aws(self, *args: str, check: bool = True, input: Optional[bytes] = None):
        """Run the aws CLI against this proxy; returns the CompletedProcess."""
        env = dict(self.env, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY,
                   AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE=os.devnull,
                   AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_MAX_ATTEMPTS="1")
        proc = subprocess.run([AWS, "--endpoint-url", self.endpoint, *args], env=env,
                              capture_output=True, input=input, timeout=300)
        if check and proc.returncode != 0:
            raise AssertionError(f"aws {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout.decode()}\n{proc.stderr.decode()}")
        return proc

    def temp_files(self) -> list[str]:
        """Leftover atomic-write temp files anywhere under the data directory."""
        found = []
        for dirpath, _dirs, files in os.walk(self.data_dir):
            found += [os.path.join(dirpath, f) for f in files
                      if f.startswith((".dgtmp.", ".tmp"))]
        return found

    def open_fds(self) -> list[str]:
        """Paths of regular files the server process holds open."""
        fd_dir = f"/proc/{self.proc.pid}/fd"
        paths = []
        for fd in os.listdir(fd_dir):
            try:
                target = os.readlink(os.path.join(fd_dir, fd))
            except OSError:
                continue
            if target.startswith("/") and not target.startswith(("/dev/", "/proc/")):
                paths.append(target)
        return paths


class SharedProxy:
    """One server for a test module (trial has no setUpClass): C{get()} starts
    it on first use, and starts a fresh one if a test killed it."""

    def __init__(self):
        self._proxy: Optional[ProxyProcess] = None

    def get(self) -> ProxyProcess:
        proxy = self._proxy
        if proxy is not None and (proxy.proc is None or proxy.proc.poll() is not None):
            proxy = None  # its log was reported by the test that saw it die
        if proxy is None:
            proxy = self._proxy = ProxyProcess().start()
            atexit.register(proxy.cleanup)
        return proxy


def md5_etag(data: bytes) -> str:
    """An S3 ETag as the response header carries it (quoted MD5)."""
    return '"%s"' % hashlib.md5(data).hexdigest()

