"""moto's S3 server (`moto_server`) for tests of the S3 backend.

moto models AWS S3's behaviour (its errors, its multipart rules such as the
5 MiB minimum part size, its ETags) in memory, so it is a second, independent
S3 implementation beside SeaweedFS. It is not AWS: it accepts any credentials
and checks no signatures. It pins its own dependencies, so it runs from a
virtualenv of its own, built on first use by L{ensure_moto}.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
import time
from typing import Optional

import boto3
from botocore.config import Config as BotoConfig

from tests.e2e.harness import free_port
from tests.e2e.toolvenv import CACHE, ensure_tool

MOTO_VENV = os.path.join(CACHE, "moto-venv")
MOTO_REQUIREMENT = "moto[server]>=5,<6"
# Importing the S3 responses pulls in everything the server needs (Flask, Werkzeug, ...).
MOTO_PROBE = ["python", "-c", "import moto.server, moto.s3.responses"]
MOTO_ACCESS_KEY = "AKIAMOTOTEST0000001"
MOTO_SECRET_KEY = "moto-test-secret-" + "y" * 23
REGION = "us-east-1"


def ensure_moto() -> str:
    """Path of `moto_server`, installing it first if needed; L{unittest.SkipTest}
    (from L{ensure_tool}) when it cannot be installed."""
    return os.path.join(ensure_tool(MOTO_VENV, MOTO_REQUIREMENT, MOTO_PROBE), "moto_server")


class MotoServer:
    """One `moto_server` on a free 127.0.0.1 port, logging to a file in its
    own temp dir. C{stop()} (or C{cleanup()}, which also removes the dir)
    signals only the process it started; an atexit hook does the same if a
    test run ends without it."""

    def __init__(self):
        self.workdir = tempfile.mkdtemp(prefix="dgp-moto-")
        self.log_path = os.path.join(self.workdir, "moto.log")
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None
        self._log = None

    def start(self, timeout: float = 60.0) -> "MotoServer":
        server = ensure_moto()
        # Its own environment: no AWS_* of the caller (moto would take a region from it).
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(self.port)],
                                     cwd=self.workdir, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        atexit.register(self.cleanup)
        deadline = time.monotonic() + timeout
        last: Optional[Exception] = None
        client = self.client()
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited {self.proc.returncode}:\n{self.log()}")
            try:
                client.list_buckets()
                return self
            except Exception as e:  # not listening yet
                last = e
                time.sleep(0.1)
        raise RuntimeError(f"moto_server not ready after {timeout}s: {last}\n{self.log()}")

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None and not self._log.closed:
            self._log.close()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def client(self):
        """A boto3 client straight to moto (path style), to see what dgproxy stored."""
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=MOTO_ACCESS_KEY,
            aws_secret_access_key=MOTO_SECRET_KEY, region_name=REGION,
            config=BotoConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 2}))

    def backend_env(self) -> dict:
        """Environment that points a dgproxy at this moto as its only backend."""
        return {"DGP_S3_ENDPOINT": self.endpoint, "DGP_S3_REGION": REGION,
                "DGP_BE_AWS_ACCESS_KEY_ID": MOTO_ACCESS_KEY,
                "DGP_BE_AWS_SECRET_ACCESS_KEY": MOTO_SECRET_KEY}
