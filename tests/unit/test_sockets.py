"""Write-through TCP sends (dgproxy.sockets), over real loopback connections.

Each test connects two Twisted protocols through the reactor and checks what
the receiving side sees: every byte, in order, whatever mix of write(),
writeSequence(), producers and full kernel buffers the sender goes through.
"""

from __future__ import annotations

import hashlib
import random
import socket

from twisted.internet import defer, endpoints, protocol, reactor, ssl
from twisted.internet.interfaces import IPullProducer, IPushProducer
from twisted.trial import unittest
from zope.interface import implementer

from dgproxy.sockets import tune_tcp
from tests.tls import server_cert
from tests.unit.helpers import inline


class Receiver(protocol.Protocol):
    """Collects what arrives; can stop reading to let the sender's kernel buffer fill."""

    def __init__(self):
        self.got = bytearray()
        self.made = defer.Deferred()
        self.closed = defer.Deferred()
        self.wanted = None  # (size, Deferred) fired once that many bytes arrived

    def connectionMade(self):
        self.made.callback(None)

    def dataReceived(self, data):
        self.got += data
        if self.wanted and len(self.got) >= self.wanted[0]:
            done, self.wanted = self.wanted[1], None
            done.callback(None)

    def connectionLost(self, reason):
        self.closed.callback(None)

    def until(self, size):
        if len(self.got) >= size:
            return defer.succeed(None)
        self.wanted = (size, defer.Deferred())
        return self.wanted[1]


class Sender(protocol.Protocol):
    def __init__(self):
        self.lost = defer.Deferred()
        self.connected_d = defer.Deferred()

    def connectionMade(self):
        self.connected_d.callback(self)

    def connectionLost(self, reason):
        self.lost.callback(reason.value)


class Pair:
    """A listening Receiver and a connected Sender on 127.0.0.1."""

    async def open(self, test):
        self.receiver = Receiver()
        factory = protocol.Factory.forProtocol(lambda: self.receiver)
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        test.addCleanup(self.port.stopListening)
        self.sender = Sender()
        creator = protocol.ClientCreator(reactor, lambda: self.sender)
        await creator.connectTCP("127.0.0.1", self.port.getHost().port)
        await self.sender.connected_d
        await self.receiver.made
        self.transport = self.sender.transport
        # Small kernel buffers, so that a few megabytes fill them whatever
        # the machine's autotuning limits are.
        self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        self.receiver.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF,
                                                       64 * 1024)
        test.addCleanup(self._close)
        return self

    def _close(self):
        if self.transport.connected:
            self.transport.abortConnection()
            return self.sender.lost

    def queued(self) -> int:
        t = self.transport
        return len(t.dataBuffer) - t.offset + t._tempDataLen


def _pieces(rng: random.Random, total: int) -> list[bytes]:
    out, left = [], total
    while left:
        n = min(left, rng.choice((1, 17, 4096, 65536, 300_000, 1 << 20)))
        out.append(rng.randbytes(n))
        left -= n
    return out


class WriteThroughTests(unittest.TestCase):
    def setUp(self):
        tune_tcp()

    @inline
    async def test_a_write_with_nothing_queued_is_sent_at_once(self):
        pair = await Pair().open(self)
        pair.transport.write(b"x" * 1000)
        self.assertEqual(pair.queued(), 0)
        self.assertNotIn(pair.transport, reactor.getWriters())
        await pair.receiver.until(1000)
        self.assertEqual(bytes(pair.receiver.got), b"x" * 1000)

    @inline
    async def test_bytes_arrive_in_order_through_full_buffers(self):
        """Rounds of write() and writeSequence() while the receiver is not
        reading: the kernel takes part of one, the rest queues, later writes
        queue behind it; each round starts again with an empty queue."""
        rng = random.Random(4)
        pair = await Pair().open(self)
        sent = hashlib.sha256()
        total = 0
        for _ in range(8):
            pair.receiver.transport.pauseProducing()
            pieces = _pieces(rng, rng.randint(2 << 20, 6 << 20))
            while pieces:
                if rng.random() < 0.5:
                    group = [pieces.pop(0) for _ in range(min(len(pieces), rng.randint(1, 5)))]
                    pair.transport.writeSequence(group)
                else:
                    group = [pieces.pop(0)]
                    pair.transport.write(group[0])
                for g in group:
                    sent.update(g)
                    total += len(g)
            self.assertGreater(pair.queued(), 0, "the kernel should not have taken it all")
            pair.receiver.transport.resumeProducing()
            await pair.receiver.until(total)
            self.assertEqual(pair.queued(), 0)
        self.assertEqual(len(pair.receiver.got), total)
        self.assertEqual(hashlib.sha256(pair.receiver.got).hexdigest(), sent.hexdigest())

    @inline
    async def test_streaming_producer_is_paused_and_resumed(self):
        pair = await Pair().open(self)
        pair.receiver.transport.pauseProducing()

        @implementer(IPushProducer)
        class Producer:
            paused = resumed = 0

            def pauseProducing(self):
                self.paused += 1

            def resumeProducing(self):
                self.resumed += 1

            def stopProducing(self):
                pass

        producer = Producer()
        pair.transport.registerProducer(producer, True)
        chunk = b"p" * (1 << 20)
        for _ in range(12):
            pair.transport.write(chunk)
        self.assertGreaterEqual(producer.paused, 1)
        pair.receiver.transport.resumeProducing()
        await pair.receiver.until(12 << 20)
        for _ in range(20):  # the resume follows the queue's last send
            if producer.resumed:
                break
            await _turn()
        self.assertGreaterEqual(producer.resumed, 1)
        pair.transport.unregisterProducer()

    @inline
    async def test_pull_producer_is_asked_until_done(self):
        """A pull producer is only asked again when the queue empties, so its
        writes keep Twisted's own path and it runs to the end."""
        pair = await Pair().open(self)
        chunks = [bytes([i]) * 100_000 for i in range(30)]

        @implementer(IPullProducer)
        class Producer:
            def resumeProducing(self):
                if chunks:
                    pair.transport.write(chunks.pop(0))
                else:
                    pair.transport.unregisterProducer()

            def stopProducing(self):
                pass

        expected = b"".join(chunks)
        pair.transport.registerProducer(Producer(), False)
        await pair.receiver.until(len(expected))
        self.assertEqual(bytes(pair.receiver.got), expected)

    @inline
    async def test_lose_connection_after_write_through_delivers_everything(self):
        pair = await Pair().open(self)
        pair.transport.writeSequence([b"head\r\n", b"", b"body" * 1000])
        pair.transport.loseConnection()
        await pair.receiver.closed
        self.assertEqual(bytes(pair.receiver.got), b"head\r\n" + b"body" * 1000)

    @inline
    async def test_writes_to_a_reset_peer_lose_the_connection_later(self):
        """A send that fails is not reported inside write(): the data stays
        queued and the reactor reports the lost connection on its next turn."""
        pair = await Pair().open(self)
        pair.receiver.transport.abortConnection()
        await pair.receiver.closed
        for _ in range(50):
            if not pair.transport.connected:
                break
            pair.transport.write(b"z" * 65536)  # never raises
            pair.transport.writeSequence([b"a", b"b"])
            await _turn()
        reason = await pair.sender.lost
        self.assertFalse(pair.transport.connected)
        self.assertIsInstance(reason, Exception)

    @inline
    async def test_tls_over_a_write_through_socket(self):
        """An HTTPS backend's connection: TLS records written through, in order,
        across full buffers, and read back whole by a TLS server."""
        cert = server_cert()
        server_options = ssl.PrivateCertificate.loadPEM(cert.cert_pem + cert.key_pem).options()
        receiver = Receiver()
        port = reactor.listenSSL(0, protocol.Factory.forProtocol(lambda: receiver),
                                 server_options, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client_options = ssl.optionsForClientTLS(
            "localhost", trustRoot=ssl.Certificate.loadPEM(cert.ca_pem))
        endpoint = endpoints.wrapClientTLS(client_options, endpoints.TCP4ClientEndpoint(
            reactor, "127.0.0.1", port.getHost().port))
        sender = Sender()
        await endpoint.connect(protocol.Factory.forProtocol(lambda: sender))
        await receiver.made
        self.addCleanup(lambda: sender.transport.abortConnection() or sender.lost)
        rng = random.Random(9)
        sent = hashlib.sha256()
        total = 0
        for _ in range(3):
            receiver.transport.pauseProducing()
            for piece in _pieces(rng, 6 << 20):
                sender.transport.write(piece)
                sent.update(piece)
                total += len(piece)
            receiver.transport.resumeProducing()
            await receiver.until(total)
        self.assertEqual(hashlib.sha256(receiver.got).hexdigest(), sent.hexdigest())

    def test_unicode_is_still_refused(self):
        from twisted.internet import tcp
        self.assertRaises(TypeError, tcp.Connection.write, object.__new__(tcp.Connection), "text")
        self.assertRaises(TypeError, tcp.Connection.writeSequence, object.__new__(tcp.Connection),
                          [b"ok", "text"])


def _turn():
    d = defer.Deferred()
    reactor.callLater(0.01, d.callback, None)
    return d
