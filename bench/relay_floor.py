"""The floor for a small GET through a Twisted proxy (bench/README.md, "S3 backend").

Starts an anonymous SeaweedFS (`weed mini`, no identity, so no signature is
checked) and a bare Twisted relay in front of it that forwards the client's
bytes and relays each response back, parsing nothing but Content-Length: no
HTTP library, no SigV4 check, no upstream signing, no metadata, no log line.
It has TCP_NODELAY and dgproxy's malloc and socket settings (1 MiB reads,
write-through). Then it times 1 MiB GETs straight to SeaweedFS and through
the relay, rounds alternating, and prints MB/s, the ratio and the relay's
CPU per request.

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

RELAY = r'''
import sys
from twisted.internet import protocol, reactor
from dgproxy.service import tune_allocator
from dgproxy.sockets import tune_tcp
tune_allocator()
tune_tcp()
UPSTREAM = int(sys.argv[2])

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
            head, data, self.head = self.head[:end + 4], self.head[end + 4:], b""
            self.left = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    self.left = int(line.split(b":")[1])
            self.down.transport.write(head)
        self.left -= len(data)
        self.down.transport.write(data)
        if self.left <= 0:
            self.left = None

class Down(protocol.Protocol):
    up = None
    def connectionMade(self):
        self.pending = b""
        self.transport.setTcpNoDelay(True)
        protocol.ClientCreator(reactor, Up, self).connectTCP("127.0.0.1", UPSTREAM)
    def dataReceived(self, data):
        self.pending += data
        self.flush()
    def flush(self):
        if self.up is not None and self.pending:
            self.up.transport.write(self.pending)
            self.pending = b""

factory = protocol.ServerFactory()
factory.protocol = Down
reactor.listenTCP(int(sys.argv[1]), factory, interface="127.0.0.1")
reactor.run()
'''


def main() -> int:
    per_round = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    workdir = tempfile.mkdtemp(prefix="dgp-floor-")
    weed = B.Seaweed(workdir, anonymous=True)
    relay = None
    try:
        weed.start()
        port = B.free_port()
        relay = subprocess.Popen([sys.executable, "-c", RELAY, str(port), str(weed.port)])
        time.sleep(1.0)
        source = os.path.join(workdir, "source")
        with open(source, "wb") as f:
            f.write(os.urandom(B.MiB))
        clients = {"seaweedfs": weed.client(),
                   "relay": S3Client("127.0.0.1", port, B.ACCESS_KEY, B.SECRET_KEY)}
        clients["seaweedfs"].put_file(B.BUCKET, "k", source)
        rates = {name: [] for name in clients}
        cpu = []
        for r in range(rounds):
            for name in (clients if r % 2 == 0 else list(clients)[::-1]):
                before = sum(B.proc_cpu(relay.pid))
                started = time.perf_counter()
                for _ in range(per_round):
                    got = clients[name].get(B.BUCKET, "k")
                    if got.nbytes != B.MiB:
                        raise RuntimeError(f"{name}: {got.nbytes} bytes")
                rates[name].append(per_round * B.MiB / (time.perf_counter() - started) / 1e6)
                if name == "relay":
                    cpu.append((sum(B.proc_cpu(relay.pid)) - before) / per_round * 1000)
        direct, relayed = (statistics.median(rates[n]) for n in ("seaweedfs", "relay"))
        print(f"1 MiB GET x{per_round} x{rounds} rounds: SeaweedFS direct {direct:.1f} MB/s, "
              f"through the bare relay {relayed:.1f} MB/s, ratio {relayed / direct:.2f}; "
              f"relay CPU {statistics.median(cpu):.2f} ms per request")
        return 0
    finally:
        if relay is not None:
            relay.kill()
            relay.wait()
        weed.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
