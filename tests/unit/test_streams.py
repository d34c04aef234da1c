"""Byte streams with backpressure (dgproxy/streams.py).

BodyStream turns socket pushes into pulls and must throttle the socket at its
watermarks; the sources must deliver exactly the bytes they hold; the pump
into a Twisted request must honour pauseProducing/resumeProducing and report a
vanished client.
"""

from __future__ import annotations

import hashlib
import io
import os

from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.trial import unittest

from dgproxy.streams import (
    CHUNK, BodyStream, BytesSource, ClientDisconnected, FileSink, FileSource, HashingSource,
    SliceSource, pump_to_request, read_all)

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


class Producer:
    """Counts the pause/resume calls a BodyStream makes on the socket."""

    def __init__(self):
        self.calls = []

    def pause(self):
        self.calls.append("pause")

    def resume(self):
        self.calls.append("resume")

    @property
    def paused(self):
        return bool(self.calls) and self.calls[-1] == "pause"


def stream(high=10):
    p = Producer()
    return BodyStream(p.pause, p.resume, high=high), p


class BodyStreamTests(unittest.TestCase):
    def test_pauses_at_high_watermark(self):
        s, p = stream(high=10)
        s.feed(b"x" * 4)
        self.assertEqual(p.calls, [])
        s.feed(b"x" * 5)
        self.assertEqual(p.calls, [])
        s.feed(b"x")  # 10 buffered
        self.assertEqual(p.calls, ["pause"])

    def test_resumes_only_below_half_the_watermark(self):
        s, p = stream(high=10)
        s.feed(b"x" * 12)
        self.assertEqual(p.calls, ["pause"])
        self.assertEqual(self.successResultOf(s.read(5)), b"x" * 5)  # 7 left
        self.assertEqual(p.calls, ["pause"])
        self.assertEqual(self.successResultOf(s.read(2)), b"xx")  # 5 left: not < 5
        self.assertEqual(p.calls, ["pause"])
        self.assertEqual(self.successResultOf(s.read(1)), b"x")  # 4 left
        self.assertEqual(p.calls, ["pause", "resume"])
        s.read(100)
        self.assertEqual(p.calls, ["pause", "resume"])  # no double resume

    def test_pauses_again_after_resume(self):
        s, p = stream(high=10)
        s.feed(b"x" * 10)
        self.successResultOf(s.read(10))
        s.feed(b"y" * 10)
        self.assertEqual(p.calls, ["pause", "resume", "pause"])

    def test_read_returns_what_is_there_without_waiting(self):
        s, _ = stream()
        s.feed(b"abc")
        self.assertEqual(self.successResultOf(s.read(100)), b"abc")

    def test_read_spans_chunks_and_splits_them(self):
        s, _ = stream(high=100)
        for part in (b"ab", b"cde", b"f"):
            s.feed(part)
        self.assertEqual(self.successResultOf(s.read(4)), b"abcd")
        self.assertEqual(self.successResultOf(s.read(4)), b"ef")

    def test_waiting_read_fires_on_feed(self):
        s, _ = stream()
        d = s.read(10)
        self.assertNoResult(d)
        s.feed(b"hello")
        self.assertEqual(self.successResultOf(d), b"hello")

    def test_waiting_read_gets_at_most_its_size(self):
        s, _ = stream(high=100)
        d = s.read(3)
        s.feed(b"abcdef")
        self.assertEqual(self.successResultOf(d), b"abc")
        self.assertEqual(self.successResultOf(s.read(10)), b"def")

    def test_finish_ends_the_stream(self):
        s, _ = stream()
        d = s.read()
        s.finish()
        self.assertEqual(self.successResultOf(d), b"")
        self.assertTrue(s.finished)
        self.assertEqual(self.successResultOf(s.read()), b"")

    def test_buffered_bytes_are_read_before_the_end(self):
        s, _ = stream()
        s.feed(b"tail")
        s.finish()
        s.feed(b"ignored after finish")
        self.assertEqual(self.successResultOf(s.read()), b"tail")
        self.assertEqual(self.successResultOf(s.read()), b"")

    def test_received_counts_bytes_fed(self):
        s, _ = stream(high=1000)
        s.feed(b"abc")
        s.feed(b"")
        s.feed(b"de")
        self.assertEqual(s.received, 5)

    def test_fail_propagates_to_a_waiting_read(self):
        s, _ = stream()
        d = s.read()
        s.fail(ClientDisconnected("gone"))
        self.failureResultOf(d, ClientDisconnected)

    def test_fail_with_a_failure(self):
        s, _ = stream()
        d = s.read()
        s.fail(Failure(ClientDisconnected("gone")))
        self.failureResultOf(d, ClientDisconnected)

    def test_data_before_the_failure_is_delivered_first(self):
        s, _ = stream()
        s.feed(b"partial")
        s.fail(ClientDisconnected())
        self.assertEqual(self.successResultOf(s.read()), b"partial")
        self.failureResultOf(s.read(), ClientDisconnected)
        self.failureResultOf(s.read(), ClientDisconnected)

    def test_fail_after_finish_is_ignored(self):
        s, _ = stream()
        s.finish()
        s.fail(ClientDisconnected())
        self.assertEqual(self.successResultOf(s.read()), b"")

    def test_drained_buffer_always_resumes(self):
        # Whatever the watermark, an empty buffer must not leave the socket paused.
        s, p = stream(high=1)
        s.feed(b"x")
        self.assertEqual(p.calls, ["pause"])
        self.assertEqual(self.successResultOf(s.read()), b"x")
        self.assertFalse(p.paused, p.calls)


    def test_close_resumes_a_paused_producer(self):
        s, p = stream(high=10)
        s.feed(b"x" * 20)
        self.assertTrue(p.paused)
        s.close()
        self.assertEqual(p.calls, ["pause", "resume"])
        s.close()
        self.assertEqual(p.calls, ["pause", "resume"])

    def test_after_close_reads_fail_and_feeds_do_not_pause(self):
        s, p = stream(high=10)
        s.close()
        s.feed(b"x" * 50)
        self.assertEqual(p.calls, [])
        self.failureResultOf(s.read(), ClientDisconnected)

    def test_close_without_pause_does_not_resume(self):
        s, p = stream(high=10)
        s.feed(b"abc")
        s.close()
        self.assertEqual(p.calls, [])

    @SETTINGS
    @given(st.lists(st.binary(max_size=40), max_size=20), st.lists(st.integers(1, 50), min_size=1,
                                                                  max_size=10),
           st.integers(2, 64))
    def test_reads_of_any_size_reassemble_the_bytes(self, chunks, sizes, high):
        s, p = stream(high=high)
        for c in chunks:
            s.feed(c)
        s.finish()
        out = []
        i = 0
        while True:
            size = sizes[i % len(sizes)]
            i += 1
            data = self.successResultOf(s.read(size))
            if not data:
                break
            self.assertLessEqual(len(data), size)
            out.append(data)
            self.assertLess(i, 10000)
        self.assertEqual(b"".join(out), b"".join(chunks))
        self.assertFalse(p.paused, "producer left paused after the buffer drained")

    @SETTINGS
    @given(st.lists(st.one_of(st.tuples(st.just("feed"), st.binary(min_size=1, max_size=30)),
                              st.tuples(st.just("read"), st.integers(1, 40))), max_size=40),
           st.integers(2, 50))
    def test_interleaved_feeds_and_reads(self, ops, high):
        s, p = stream(high=high)
        fed, got = [], []
        pending = None
        for op, arg in ops:
            if op == "feed":
                fed.append(arg)
                s.feed(arg)
            elif pending is None:
                d = s.read(arg)
                pending = d
            if pending is not None and pending.called:
                got.append(self.successResultOf(pending))
                pending = None
            # Paused exactly when a lot is buffered and nobody drained it.
            buffered = sum(map(len, fed)) - sum(map(len, got))
            if buffered >= high:
                self.assertTrue(p.paused, (buffered, high, p.calls))
            if buffered < high // 2:
                self.assertFalse(p.paused, (buffered, high, p.calls))
        s.finish()
        if pending is not None:
            got.append(self.successResultOf(pending))
        while True:
            data = self.successResultOf(s.read(7))
            if not data:
                break
            got.append(data)
        self.assertEqual(b"".join(got), b"".join(fed))
        self.assertFalse(p.paused)


class SourceTests(unittest.TestCase):
    def drain(self, source, size=CHUNK):
        out = []
        while True:
            data = self.successResultOf(source.read(size))
            if not data:
                return b"".join(out)
            self.assertLessEqual(len(data), size)
            out.append(data)

    def test_bytes_source(self):
        src = BytesSource(b"abcdef")
        self.assertEqual(self.successResultOf(src.read(4)), b"abcd")
        self.assertEqual(self.drain(src), b"ef")
        src.close()
        self.assertEqual(self.successResultOf(src.read()), b"")

    @SETTINGS
    @given(st.binary(max_size=3000), st.integers(1, 700), st.booleans())
    def test_hashing_source_digests(self, data, size, want_sha):
        src = HashingSource(BytesSource(data), want_sha256=want_sha)
        self.assertEqual(self.drain(src, size), data)
        self.assertEqual(src.size, len(data))
        self.assertEqual(src.md5.hexdigest(), hashlib.md5(data).hexdigest())
        if want_sha:
            self.assertEqual(src.sha256.hexdigest(), hashlib.sha256(data).hexdigest())
        else:
            self.assertIsNone(src.sha256)

    def test_hashing_source_close_closes_inner(self):
        inner = BytesSource(b"abc")
        HashingSource(inner).close()
        self.assertEqual(self.successResultOf(inner.read()), b"")

    def test_file_source_on_a_real_file(self):
        path = self.mktemp()
        data = bytes(range(256)) * 4
        with open(path, "wb") as f:
            f.write(data)
        f = open(path, "rb")
        src = FileSource(f, offset=10, length=300)
        self.assertEqual(self.drain(src, 64), data[10:310])
        self.assertTrue(f.closed, "file not closed at the end")

    def test_file_source_whole_file(self):
        f = io.BytesIO(b"0123456789")
        self.assertEqual(self.drain(FileSource(f)), b"0123456789")
        self.assertTrue(f.closed)

    def test_file_source_close_releases_the_file(self):
        f = io.BytesIO(b"0123456789")
        src = FileSource(f)
        src.close()
        self.assertTrue(f.closed)
        src.close()
        self.assertEqual(self.successResultOf(src.read()), b"")

    def test_file_source_read_error_closes_and_fails(self):
        class Broken(io.BytesIO):
            def read(self, n=-1):
                raise OSError(5, "I/O error")

        f = Broken(b"x")
        self.failureResultOf(FileSource(f).read(), OSError)
        self.assertTrue(f.closed)

    @SETTINGS
    @given(st.binary(max_size=500), st.integers(0, 600), st.none() | st.integers(0, 600),
           st.integers(1, 100))
    def test_file_source_offset_and_length(self, data, offset, length, size):
        f = io.BytesIO(data)
        src = FileSource(f, offset=offset, length=length)
        end = len(data) if length is None else offset + length
        self.assertEqual(self.drain(src, size), data[offset:end])
        self.assertTrue(f.closed)


class RecordingSource:
    """A source over fixed chunks that records reads and close."""

    def __init__(self, chunks, pending=False):
        self.chunks = list(chunks)
        self.reads = 0
        self.closed = False
        self.pending = pending
        self.waiting = None

    def read(self, size=CHUNK):
        self.reads += 1
        if self.pending:
            self.waiting = defer.Deferred()
            return self.waiting
        return defer.succeed(self.chunks.pop(0) if self.chunks else b"")

    def close(self):
        self.closed = True


class ReadAllTests(unittest.TestCase):
    def test_within_limit(self):
        src = RecordingSource([b"a" * 5, b"b" * 5])
        d = defer.ensureDeferred(read_all(src, 10))
        self.assertEqual(self.successResultOf(d), b"a" * 5 + b"b" * 5)
        self.assertTrue(src.closed)

    def test_over_limit(self):
        src = RecordingSource([b"a" * 5, b"b" * 6])
        d = defer.ensureDeferred(read_all(src, 10))
        self.failureResultOf(d, ValueError)
        self.assertTrue(src.closed)

    def test_source_failure_closes(self):
        s, _ = stream()
        d = defer.ensureDeferred(read_all(s, 100))
        s.fail(ClientDisconnected())
        self.failureResultOf(d, ClientDisconnected)

    def test_empty(self):
        self.assertEqual(self.successResultOf(defer.ensureDeferred(
            read_all(RecordingSource([]), 0))), b"")


class FakeRequest:
    """The part of twisted.web's Request that pump_to_request uses."""

    def __init__(self, pause_on_write=False):
        self.producer = None
        self.streaming = None
        self.registered = 0
        self.unregistered = 0
        self.written = []
        self.pause_on_write = pause_on_write

    def registerProducer(self, producer, streaming):
        self.producer, self.streaming = producer, streaming
        self.registered += 1

    def unregisterProducer(self):
        self.producer = None
        self.unregistered += 1

    def write(self, data):
        self.written.append(data)
        if self.pause_on_write:
            self.producer.pauseProducing()


class PumpTests(unittest.TestCase):
    def test_copies_everything_in_order(self):
        chunks = [bytes([i]) * (i + 1) for i in range(20)]
        src = RecordingSource(chunks)
        req = FakeRequest()
        d = pump_to_request(src, req)
        self.assertEqual(self.successResultOf(d), sum(map(len, chunks)))
        self.assertEqual(req.written, chunks)
        self.assertTrue(req.streaming)
        self.assertEqual((req.registered, req.unregistered), (1, 1))
        self.assertTrue(src.closed)

    def test_stops_pulling_while_paused(self):
        chunks = [b"a", b"b", b"c"]
        src = RecordingSource(chunks)
        req = FakeRequest(pause_on_write=True)
        d = pump_to_request(src, req)
        producer = req.producer
        self.assertNoResult(d)
        self.assertEqual((req.written, src.reads), ([b"a"], 1))
        producer.pauseProducing()  # a second pause is harmless
        self.assertEqual(src.reads, 1)
        producer.resumeProducing()
        self.assertEqual((req.written, src.reads), ([b"a", b"b"], 2))
        producer.resumeProducing()
        self.assertEqual((req.written, src.reads), ([b"a", b"b", b"c"], 3))
        self.assertNoResult(d)
        producer.resumeProducing()
        self.assertEqual(self.successResultOf(d), 3)
        self.assertTrue(src.closed)
        self.assertEqual(req.unregistered, 1)

    def test_resume_without_pause_is_harmless(self):
        src = RecordingSource([b"x"] * 3)
        req = FakeRequest()
        d = pump_to_request(src, req)
        self.assertEqual(self.successResultOf(d), 3)

    def test_stop_while_paused_is_client_disconnected(self):
        src = RecordingSource([b"a", b"b", b"c"])
        req = FakeRequest(pause_on_write=True)
        d = pump_to_request(src, req)
        req.producer.stopProducing()
        self.failureResultOf(d, ClientDisconnected)
        self.assertTrue(src.closed)
        self.assertEqual(req.written, [b"a"])

    def test_stop_while_reading_is_client_disconnected(self):
        src = RecordingSource([], pending=True)
        req = FakeRequest()
        d = pump_to_request(src, req)
        req.producer.stopProducing()
        src.waiting.callback(b"late")
        self.failureResultOf(d, ClientDisconnected)
        self.assertTrue(src.closed)

    def test_source_error_propagates_and_cleans_up(self):
        src = RecordingSource([], pending=True)
        req = FakeRequest()
        d = pump_to_request(src, req)
        src.waiting.errback(IOError("disk"))
        self.failureResultOf(d, IOError)
        self.assertTrue(src.closed)
        self.assertEqual(req.unregistered, 1)

    def test_pump_from_body_stream(self):
        # A proxy-style chain: socket -> BodyStream -> pump -> response.
        body, p = stream(high=8)
        req = FakeRequest()
        d = pump_to_request(body, req)
        for part in (b"one", b"two", b"three"):
            body.feed(part)
        body.finish()
        self.assertEqual(self.successResultOf(d), 11)
        self.assertEqual(b"".join(req.written), b"onetwothree")
        self.assertFalse(p.paused)


class SocketSource:
    """A source over a BodyStream, as the S3 backend's response source is:
    it offers the stream for relaying and records close."""

    def __init__(self, body):
        self.body = body
        self.closed = False

    def read(self, size=CHUNK):
        return self.body.read(size)

    def relay_stream(self):
        return b"", self.body

    def close(self):
        self.closed = True
        self.body.close()


class RelayTests(unittest.TestCase):
    def test_buffered_then_live_chunks_in_order(self):
        body, p = stream(high=100)
        body.feed(b"abcdef")
        self.assertEqual(self.successResultOf(body.read(2)), b"ab")  # read from an offset
        body.feed(b"gh")
        written = []
        d = body.relay(written.append)
        self.assertEqual(written, [b"cdef", b"gh"])
        body.feed(b"ij")
        self.assertNoResult(d)
        body.finish()
        self.assertEqual(self.successResultOf(d), 8)  # what the relay wrote
        self.assertEqual(b"".join(written), b"cdefghij")

    def test_finished_stream_relays_at_once(self):
        body, _ = stream()
        body.feed(b"xyz")
        body.finish()
        written = []
        self.assertEqual(self.successResultOf(body.relay(written.append)), 3)
        self.assertEqual(written, [b"xyz"])

    def test_relay_resumes_a_source_paused_by_buffering(self):
        body, p = stream(high=4)
        body.feed(b"12345")
        self.assertTrue(p.paused)
        body.relay(lambda data: None)
        self.assertFalse(p.paused)

    def test_failure_and_close_end_the_relay(self):
        body, _ = stream()
        d = body.relay(lambda data: None)
        body.fail(IOError("socket"))
        self.failureResultOf(d, IOError)
        body2, _ = stream()
        d2 = body2.relay(lambda data: None)
        body2.close()
        self.failureResultOf(d2, ClientDisconnected)

    def test_relay_after_read_started_is_refused(self):
        body, _ = stream()
        body.read(10)
        self.assertRaises(RuntimeError, body.relay, lambda data: None)

    def test_pump_relays_a_socket_source_with_backpressure(self):
        body, p = stream(high=100)
        src = SocketSource(body)
        req = FakeRequest()
        d = pump_to_request(src, req)
        body.feed(b"one")
        req.producer.pauseProducing()
        self.assertTrue(p.paused)  # the client is full: the socket stops
        req.producer.resumeProducing()
        self.assertFalse(p.paused)
        body.feed(b"two")
        body.finish()
        self.assertEqual(self.successResultOf(d), 6)
        self.assertEqual(req.written, [b"one", b"two"])
        self.assertEqual((req.registered, req.unregistered), (1, 1))
        self.assertTrue(src.closed)

    def test_pump_relay_client_gone_is_client_disconnected(self):
        body, _ = stream()
        src = SocketSource(body)
        req = FakeRequest()
        d = pump_to_request(src, req)
        body.feed(b"part")
        req.producer.stopProducing()
        self.failureResultOf(d, ClientDisconnected)
        self.assertTrue(src.closed)
        body.feed(b"more")  # late bytes from the socket go nowhere
        self.assertEqual(req.written, [b"part"])

    def test_pump_relay_source_failure_is_not_client_disconnected(self):
        body, _ = stream()
        src = SocketSource(body)
        req = FakeRequest()
        d = pump_to_request(src, req)
        body.fail(IOError("upstream cut"))
        self.failureResultOf(d, IOError)
        self.assertTrue(src.closed)
        self.assertEqual(req.unregistered, 1)


class FileSinkTests(unittest.TestCase):
    def _sink(self):
        path = self.mktemp()
        f = open(path, "wb")
        self.addCleanup(f.close)
        return path, f, FileSink(f)

    def test_batched_writes_reassemble_the_file(self):
        path, f, sink = self._sink()
        data = os.urandom(2 * FileSink.batch + 12345)

        async def go():
            for i in range(0, len(data), 100_000):
                await sink.write(data[i:i + 100_000])
            await sink.flush()
            self.assertEqual(sink.size, len(data))
            with open(path, "rb") as check:
                self.assertEqual(check.read(), data)
        return defer.ensureDeferred(go())

    def test_small_write_reaches_the_file_on_flush(self):
        path, f, sink = self._sink()

        async def go():
            await sink.write(b"tiny")
            await sink.flush()
            with open(path, "rb") as check:
                self.assertEqual(check.read(), b"tiny")
        return defer.ensureDeferred(go())

    def test_discard_drops_pending_data(self):
        path, f, sink = self._sink()

        async def go():
            await sink.write(b"never")
            sink.discard()
            await sink.flush()
            with open(path, "rb") as check:
                self.assertEqual(check.read(), b"")
        return defer.ensureDeferred(go())


class SliceSourceTests(unittest.TestCase):
    """The range a service that ignores Range leaves to dgproxy to cut out."""

    drain = SourceTests.drain

    @SETTINGS
    @given(data=st.binary(max_size=5000), offset=st.integers(0, 6000),
           length=st.integers(0, 6000), chunk=st.integers(1, 700), size=st.integers(1, 900))
    def test_gives_exactly_the_slice(self, data, offset, length, chunk, size):
        class Chunked(BytesSource):
            def read(self, n=CHUNK):
                return super().read(min(n, chunk))

        inner = Chunked(data)
        source = SliceSource(inner, offset, length)
        self.assertEqual(self.drain(source, size), data[offset:offset + length])
        self.assertEqual(self.successResultOf(inner.read()), b"")  # closed once done
