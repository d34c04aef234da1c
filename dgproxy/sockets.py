"""Twisted's TCP transports, tuned for body-sized traffic.

Two changes to every TCP connection of the process (listening side and the
S3 backend's connections alike), installed once at start-up:

- reads and sends of up to 1 MiB at a time instead of 64 / 128 KiB: bodies
  here are large, and each read costs a trip through the stream machinery;
- write-through: Twisted queues every write until the reactor's next turn
  reports the socket writable, which costs an ``epoll_ctl`` to start
  watching, an ``epoll_wait``, a join of the queue and another
  ``epoll_ctl`` to stop, for every write. When nothing is queued (nearly
  always, between a proxy's reads and writes) the data is sent at once and
  only what the kernel did not take is queued, exactly where Twisted would
  have put it.

Write-through keeps Twisted's semantics: bytes go out in write order, a
streaming producer is still paused when the queue fills, a pull producer
(which is only asked for more when the queue empties) and TLS keep Twisted's
own path, and a send that fails leaves the data queued so that the reactor
notices the lost connection on its next turn, outside the caller's stack.
"""

from __future__ import annotations

from errno import EAGAIN, ENOBUFS, EWOULDBLOCK
from typing import Sequence

from twisted.internet import tcp
from twisted.internet.abstract import _dataMustBeBytes

# The most one socket read delivers and one send offers. Streams read bodies
# in pieces this large too, so that each chunk is taken whole, not cut and copied.
SOCKET_CHUNK = 1024 * 1024
# sendmsg() takes at most IOV_MAX (1024 on Linux) pieces.
_MAX_PIECES = 512

_TRY_AGAIN = (EAGAIN, EWOULDBLOCK, ENOBUFS)
_ORIGINAL = {}


def _can_write_through(t: tcp.Connection) -> bool:
    """Nothing queued, plain TCP, still open, no producer to be woken by doWrite."""
    return (t.offset == len(t.dataBuffer) and not t._tempDataLen and not t.TLS
            and t.connected and not t.disconnecting and not t._writeDisconnecting
            and not t._writeDisconnected
            and (t.producer is None or (t.streamingProducer and not t.producerPaused)))


def _queue_rest(t: tcp.Connection, first: bytes, sent: int, rest: Sequence[bytes] = ()) -> None:
    """Queue what the kernel did not take, as Twisted's doWrite expects it."""
    t.dataBuffer, t.offset = first, sent
    t._tempDataBuffer.extend(rest)
    t._tempDataLen += sum(len(b) for b in rest)
    t._maybePauseProducer()
    t.startWriting()


def write(self: tcp.Connection, data: bytes) -> None:
    _dataMustBeBytes(data)
    if data and _can_write_through(self):
        sent = self.writeSomeData(data)
        if isinstance(sent, int):
            if sent < len(data):
                _queue_rest(self, data, sent)
            return
    _ORIGINAL["write"](self, data)


def writeSequence(self: tcp.Connection, iovec: Sequence[bytes]) -> None:
    for b in iovec:
        _dataMustBeBytes(b)
    iovec = [b for b in iovec if b]
    if iovec and len(iovec) <= _MAX_PIECES and _can_write_through(self):
        try:
            sent = self.socket.sendmsg(iovec)
        except OSError as e:
            sent = 0 if e.errno in _TRY_AGAIN else -1
        if sent >= 0:
            for i, b in enumerate(iovec):
                if sent < len(b):
                    _queue_rest(self, b, sent, iovec[i + 1:])
                    return
                sent -= len(b)
            return
    _ORIGINAL["writeSequence"](self, iovec)


def tune_tcp() -> None:
    """Install the read/send sizes and write-through on Twisted's TCP connections."""
    tcp.Connection.bufferSize = SOCKET_CHUNK
    tcp.Connection.SEND_LIMIT = SOCKET_CHUNK
    if not _ORIGINAL:
        _ORIGINAL["write"] = tcp.Connection.write
        _ORIGINAL["writeSequence"] = tcp.Connection.writeSequence
        tcp.Connection.write = write
        tcp.Connection.writeSequence = writeSequence
