"""What a small GET through a Twisted proxy can cost (bench/README.md, "S3 backend").

Starts a SeaweedFS (`weed mini`, enforcing SigV4) and two throwaway proxies in
front of it, each its own process with TCP_NODELAY and dgproxy's malloc and
socket settings (1 MiB reads, write-through):

- the bare relay forwards the client's bytes and relays each response back,
  parsing nothing but Content-Length: no HTTP library, no SigV4 check, no
  upstream signing, no metadata, no log line. It is the floor.
- the lean proxy does the least an authenticating S3 proxy must, by hand on
  a Twisted Protocol: it parses the request head, checks its SigV4 signature
  with dgproxy's own verifier, signs a new upstream GET (dgproxy's derived
  key, hand-built canonical request), rebuilds the response head and writes
  an access-log line. No twisted.web, no Agent/treq, no botocore, no layers.

Then it times 1 MiB GETs straight to SeaweedFS, through each of them and
through dgproxy (S3 backend on the same SeaweedFS), rounds rotating, and
prints MB/s, the ratio to direct and each proxy's CPU per request.

    .venv/bin/python bench/relay_floor.py [requests per round] [rounds]
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run as B  # noqa: E402  (the bench's process helpers and client)
from s3client import S3Client  # noqa: E402

PROXY = r'''
import sys, time, hashlib
from datetime import datetime, timezone
from twisted.internet import protocol, reactor
from dgproxy.service import tune_allocator
from dgproxy.sockets import tune_tcp
from dgproxy.auth import sigv4
tune_allocator()
tune_tcp()
MODE, PORT, UPSTREAM = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
LEAN = MODE == "lean"
if LEAN:
    KEY, SECRET, REGION, LOG = sys.argv[4:8]
    HOST = f"127.0.0.1:{UPSTREAM}"
    SIGNED = "host;x-amz-content-sha256;x-amz-date"
    access_log = open(LOG, "a", buffering=65536)

def signed_get(path):
    amz = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    scope = f"{amz[:8]}/{REGION}/s3/aws4_request"
    canonical = (f"GET\n{path}\n\nhost:{HOST}\nx-amz-content-sha256:UNSIGNED-PAYLOAD\n"
                 f"x-amz-date:{amz}\n\n{SIGNED}\nUNSIGNED-PAYLOAD")
    to_sign = (f"AWS4-HMAC-SHA256\n{amz}\n{scope}\n"
               + hashlib.sha256(canonical.encode()).hexdigest())
    signature = sigv4.hmac_hex(sigv4.signing_key(SECRET, amz[:8], REGION), to_sign)
    return (f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nx-amz-content-sha256: UNSIGNED-PAYLOAD\r\n"
            f"x-amz-date: {amz}\r\nAuthorization: AWS4-HMAC-SHA256 Credential={KEY}/{scope}, "
            f"SignedHeaders={SIGNED}, Signature={signature}\r\n\r\n").encode()

def response_head(head):
    # (the head to send on, the body's length). The bare relay sends the
    # service's head as it came; the lean proxy rebuilds it.
    lines = head.split(b"\r\n")
    fields = dict((k.strip().lower(), v.strip())
                  for k, _, v in (line.partition(b":") for line in lines[1:]))
    size = int(fields.get(b"content-length", b"0"))
    if not LEAN:
        return head + b"\r\n\r\n", size
    out = [lines[0]] + [k + b": " + fields[k] for k in
                        (b"content-length", b"etag", b"last-modified", b"content-type")
                        if k in fields]
    out.append(b"Date: " + time.strftime("%a, %d %b %Y %H:%M:%S GMT").encode())
    return b"\r\n".join(out) + b"\r\n\r\n", size

class Up(protocol.Protocol):
    def __init__(self, down):
        self.down, self.head, self.left = down, b"", None
    def connectionMade(self):
        self.transport.setTcpNoDelay(True)
        self.down.up = self
        self.down.flush()
    def dataReceived(self, data):
        if self.left is None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data, self.head = self.head[:end], self.head[end + 4:], b""
            head, self.left = response_head(head)
            self.size = self.left
            self.down.transport.write(head)
        self.left -= len(data)
        self.down.transport.write(data)
        if self.left <= 0:
            self.left = None
            if LEAN:
                d = self.down
                access_log.write(f"GET {d.path} 200 0/{self.size} "
                                 f"{(time.monotonic() - d.started) * 1000:.1f}ms {d.key}\n")

class Down(protocol.Protocol):
    up = None
    def connectionMade(self):
        self.buffered, self.pending = b"", b""
        self.transport.setTcpNoDelay(True)
        protocol.ClientCreator(reactor, Up, self).connectTCP("127.0.0.1", UPSTREAM)
    def dataReceived(self, data):
        if LEAN:
            data = self.authenticated(data)
        self.pending += data
        self.flush()
    def authenticated(self, data):
        # The upstream GET for a request whose signature holds (b"" until
        # its head is complete).
        self.buffered += data
        end = self.buffered.find(b"\r\n\r\n")
        if end < 0:
            return b""
        head, self.buffered = self.buffered[:end].decode("latin-1"), self.buffered[end + 4:]
        self.started = time.monotonic()
        lines = head.split("\r\n")
        method, target, _ = lines[0].split(" ")
        fields = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            fields.setdefault(k.strip().lower(), []).append(v.strip())
        self.path, _, query = target.partition("?")
        request = sigv4.SignedRequest(method, self.path.encode(), query.encode(), fields)
        self.key = sigv4.verify(request, lambda k: SECRET if k == KEY else None,
                                datetime.now(timezone.utc), 900).access_key_id
        return signed_get(self.path)
    def flush(self):
        if self.up is not None and self.pending:
            self.up.transport.write(self.pending)
            self.pending = b""

factory = protocol.ServerFactory()
factory.protocol = Down
reactor.listenTCP(PORT, factory, interface="127.0.0.1")
reactor.run()
'''


def main() -> int:
    per_round = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    workdir = tempfile.mkdtemp(prefix="dgp-floor-")
    weed = B.Seaweed(workdir)
    proxies: dict[str, subprocess.Popen] = {}
    dgproxy = None
    try:
        weed.start()
        dgproxy = B.DgProxy(workdir, name="dgproxy-s3", extra_env={
            "DGP_S3_ENDPOINT": weed.endpoint, "DGP_S3_REGION": B.REGION,
            "DGP_BE_AWS_ACCESS_KEY_ID": B.ACCESS_KEY, "DGP_BE_AWS_SECRET_ACCESS_KEY": B.SECRET_KEY})
        dgproxy.start()
        ports = {"bare relay": B.free_port(), "lean proxy": B.free_port()}
        proxies["bare relay"] = subprocess.Popen(
            [sys.executable, "-c", PROXY, "bare", str(ports["bare relay"]), str(weed.port)])
        proxies["lean proxy"] = subprocess.Popen(
            [sys.executable, "-c", PROXY, "lean", str(ports["lean proxy"]), str(weed.port),
             B.ACCESS_KEY, B.SECRET_KEY, B.REGION, os.path.join(workdir, "access.log")])
        ports["dgproxy"] = dgproxy.port
        time.sleep(1.5)
        source = os.path.join(workdir, "source")
        with open(source, "wb") as f:
            f.write(os.urandom(B.MiB))
        clients = {"seaweedfs": weed.client()}
        clients.update((name, S3Client("127.0.0.1", port, B.ACCESS_KEY, B.SECRET_KEY))
                       for name, port in ports.items())
        # Written through dgproxy, so that it reads back an object of its own
        # (the others see the same bytes).
        clients["dgproxy"].put_file(B.BUCKET, "k", source)
        rates = {name: [] for name in clients}
        proxies["dgproxy"] = dgproxy.proc
        cpu = {name: [] for name in proxies}
        names = list(clients)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                proc = proxies.get(name)
                before = sum(B.proc_cpu(proc.pid)) if proc else 0
                started = time.perf_counter()
                for _ in range(per_round):
                    got = clients[name].get(B.BUCKET, "k")
                    if got.nbytes != B.MiB:
                        raise RuntimeError(f"{name}: {got.nbytes} bytes")
                rates[name].append(per_round * B.MiB / (time.perf_counter() - started) / 1e6)
                if proc:
                    cpu[name].append((sum(B.proc_cpu(proc.pid)) - before) / per_round * 1000)
        direct = statistics.median(rates["seaweedfs"])
        print(f"1 MiB GET x{per_round} x{rounds} rounds: SeaweedFS direct {direct:.1f} MB/s")
        for name in proxies:
            rate = statistics.median(rates[name])
            print(f"  through the {name}: {rate:.1f} MB/s, ratio {rate / direct:.2f}, "
                  f"CPU {statistics.median(cpu[name]):.2f} ms per request")
        return 0
    finally:
        for name, proc in proxies.items():
            if name != "dgproxy":
                proc.kill()
                proc.wait()
        if dgproxy is not None:
            dgproxy.stop()
        weed.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
