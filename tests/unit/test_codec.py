"""The xdelta3 codec (dgproxy/engine/codec.py) with the real reactor and the
real xdelta3 binary: streamed round trips, the output cap, the slot semaphore
and its bounded wait, garbage input, the stall watchdog, the start-up check.
"""

from __future__ import annotations

import functools
import os
import random
import time

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from dgproxy.engine.codec import (
    INSTALL_HINT, Codec, CodecBusy, CodecError, OutputTooLarge, check_xdelta3)

# Odd sizes on purpose: nothing lines up with xdelta3's windows or pipe buffers.
ODD_CHUNKS = (1, 7, 4093, 65537, 333, 131071, 2, 100003)


def async_test(fn):
    """Run an C{async def} test method as a Deferred on the real reactor."""
    @functools.wraps(fn)
    def wrapper(self):
        return defer.ensureDeferred(fn(self))
    return wrapper


def sleep(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


def odd_pieces(data: bytes):
    pos, i = 0, 0
    while pos < len(data):
        n = ODD_CHUNKS[i % len(ODD_CHUNKS)]
        yield data[pos:pos + n]
        pos += n
        i += 1


def pid_gone(pid: int) -> bool:
    """True once the child no longer exists (it was reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


class CodecCase(unittest.TestCase):
    """A temp directory with a source file, and helpers to drive one run."""

    concurrency = 2
    wait_timeout = 5.0
    stall_timeout = 10.0

    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.rng = random.Random(0xD317A)
        self.codec = Codec(reactor, self.concurrency, wait_timeout=self.wait_timeout,
                           stall_timeout=self.stall_timeout)

    def write_file(self, name: str, data: bytes) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def random_bytes(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    async def run_codec(self, mode: str, source_path: str, data: bytes, cap=None) -> bytes:
        """Feed C{data} in odd pieces; return the whole output or raise."""
        out: list[bytes] = []
        run = await self.codec.start(mode, source_path, out.append, cap=cap)
        try:
            for piece in odd_pieces(data):
                await run.write(piece)
            await run.finish()
        except BaseException:
            run.abort()
            raise
        return b"".join(out)

    def assertAllSlotsFree(self):
        self.assertEqual(self.codec.available, self.concurrency)
        self.assertEqual(self.codec.semaphore.waiting, [])


class RoundTripTests(CodecCase):

    @async_test
    async def test_similar_data_round_trip(self):
        source = self.random_bytes(1024 * 1024 + 17)
        target = bytearray(source)
        # A few edits: overwrite, insert, delete, append.
        target[1000:1100] = self.random_bytes(100)
        target[500_000:500_000] = b"inserted bytes " * 50
        del target[800_000:801_234]
        target += self.random_bytes(3000)
        target = bytes(target)
        src = self.write_file("source", source)

        delta = await self.run_codec("encode", src, target)
        self.assertLess(len(delta), len(target) // 20,
                        "a delta of a lightly edited file should be small")
        self.assertTrue(delta.startswith(b"\xd6\xc3\xc4"), "VCDIFF magic expected")
        rebuilt = await self.run_codec("decode", src, delta)
        self.assertEqual(rebuilt, target)
        self.assertAllSlotsFree()

    @async_test
    async def test_random_data_round_trip(self):
        source = self.random_bytes(300_000)
        target = self.random_bytes(700_001)
        src = self.write_file("source", source)
        delta = await self.run_codec("encode", src, target)
        # Unrelated data cannot compress (-D: no secondary compression).
        self.assertGreater(len(delta), len(target) * 9 // 10)
        self.assertEqual(await self.run_codec("decode", src, delta), target)
        self.assertAllSlotsFree()

    @async_test
    async def test_self_delta_and_empty_target(self):
        data = self.random_bytes(200_000)
        src = self.write_file("source", data)
        delta = await self.run_codec("encode", src, data)
        self.assertLess(len(delta), 1000, "encoding a file against itself is tiny")
        self.assertEqual(await self.run_codec("decode", src, delta), data)
        empty_delta = await self.run_codec("encode", src, b"")
        self.assertEqual(await self.run_codec("decode", src, empty_delta), b"")
        self.assertAllSlotsFree()

    @async_test
    async def test_output_size_is_reported(self):
        src = self.write_file("source", self.random_bytes(50_000))
        out: list[bytes] = []
        run = await self.codec.start("encode", src, out.append)
        for piece in odd_pieces(self.random_bytes(80_000)):
            await run.write(piece)
        size = await run.finish()
        self.assertEqual(size, sum(map(len, out)))
        self.assertEqual(run.output_size, size)
        self.assertIsNone(run.failed)

    @async_test
    async def test_bad_mode_is_refused_without_taking_a_slot(self):
        src = self.write_file("source", b"x")
        with self.assertRaises(ValueError):
            await self.codec.start("compress", src, lambda _: None)
        self.assertAllSlotsFree()


class OutputCapTests(CodecCase):

    @async_test
    async def test_cap_kills_the_child(self):
        src = self.write_file("source", self.random_bytes(100_000))
        target = self.random_bytes(2 * 1024 * 1024)
        out: list[bytes] = []
        run = await self.codec.start("encode", src, out.append, cap=10_000)
        pid = run.transport.pid
        self.assertIsNotNone(pid)
        write_error = None
        for piece in odd_pieces(target):
            try:
                await run.write(piece)
            except CodecError as e:
                write_error = e
                break
        with self.assertRaises(OutputTooLarge):
            await run.finish()
        self.assertIsInstance(run.failed, OutputTooLarge)
        if write_error is not None:
            self.assertIsInstance(write_error, OutputTooLarge)
        # The sink never saw more than the cap, and the child is gone and reaped.
        self.assertLessEqual(sum(map(len, out)), 10_000)
        self.assertTrue(pid_gone(pid), f"xdelta3 child {pid} still exists")
        self.assertAllSlotsFree()

    @async_test
    async def test_decode_cap_guards_against_bombs(self):
        # A tiny delta that expands to 1 MiB: decoding it with a small cap fails.
        source = self.random_bytes(1024 * 1024)
        src = self.write_file("source", source)
        delta = await self.run_codec("encode", src, source)
        with self.assertRaises(OutputTooLarge):
            await self.run_codec("decode", src, delta, cap=4096)
        # The exact size as the cap is allowed.
        self.assertEqual(await self.run_codec("decode", src, delta, cap=len(source)), source)
        self.assertAllSlotsFree()

    @async_test
    async def test_failing_sink_is_a_codec_error(self):
        src = self.write_file("source", self.random_bytes(10_000))

        def sink(data):
            raise OSError(28, "No space left on device")

        run = await self.codec.start("encode", src, sink)
        try:
            for piece in odd_pieces(self.random_bytes(200_000)):
                await run.write(piece)
        except CodecError:
            pass
        with self.assertRaises(CodecError) as cm:
            await run.finish()
        self.assertIn("cannot store codec output", str(cm.exception))
        self.assertAllSlotsFree()


class SemaphoreTests(CodecCase):

    concurrency = 1
    wait_timeout = 0.4

    @async_test
    async def test_second_start_waits_then_gets_the_slot(self):
        # A generous bound here: this test is about queueing, not the timeout.
        self.codec = Codec(reactor, 1, wait_timeout=30.0, stall_timeout=30.0)
        src = self.write_file("source", self.random_bytes(10_000))
        first_out: list[bytes] = []
        first = await self.codec.start("encode", src, first_out.append)
        self.assertEqual(self.codec.available, 0)
        second_out: list[bytes] = []
        waiting = defer.ensureDeferred(self.codec.start("encode", src, second_out.append))
        await sleep(0.1)
        self.assertFalse(waiting.called, "a second run must wait for the only slot")
        await first.write(b"hello")
        await first.finish()
        second = await waiting
        self.assertEqual(self.codec.available, 0)
        await second.write(b"world")
        await second.finish()
        self.assertAllSlotsFree()

    @async_test
    async def test_second_start_gives_up_with_codec_busy(self):
        src = self.write_file("source", self.random_bytes(10_000))
        first = await self.codec.start("encode", src, lambda _: None)
        started = time.monotonic()
        try:
            with self.assertRaises(CodecBusy):
                await self.codec.start("encode", src, lambda _: None)
            waited = time.monotonic() - started
            self.assertGreaterEqual(waited, self.wait_timeout * 0.9,
                                    "CodecBusy must come after the bounded wait, not at once")
            self.assertLess(waited, self.wait_timeout + 3)
            # The cancelled waiter does not linger in the semaphore's queue.
            self.assertEqual(self.codec.semaphore.waiting, [])
            self.assertEqual(self.codec.available, 0)
        finally:
            await first.finish()
        self.assertAllSlotsFree()
        # And the codec still works afterwards.
        again = await self.codec.start("encode", src, lambda _: None)
        await again.finish()
        self.assertAllSlotsFree()

    @async_test
    async def test_try_start_never_waits(self):
        if not hasattr(self.codec, "try_start"):
            raise unittest.SkipTest("Codec.try_start not present")
        src = self.write_file("source", self.random_bytes(10_000))
        out: list[bytes] = []
        first = self.codec.try_start("encode", src, out.append)
        self.assertIsNotNone(first)
        self.assertEqual(self.codec.available, 0)
        self.assertIsNone(self.codec.try_start("encode", src, lambda _: None))
        self.assertEqual(self.codec.semaphore.waiting, [])
        await first.write(b"payload")
        await first.finish()
        self.assertAllSlotsFree()
        second = self.codec.try_start("decode", src, out.append)
        self.assertIsNotNone(second)
        second.abort()
        with self.assertRaises(CodecError):
            await second.finish()
        self.assertAllSlotsFree()

    @async_test
    async def test_slot_returns_after_success_failure_and_abort(self):
        src = self.write_file("source", self.random_bytes(20_000))

        # success
        await self.run_codec("encode", src, self.random_bytes(5000))
        self.assertAllSlotsFree()

        # failure: garbage on decode
        with self.assertRaises(CodecError):
            await self.run_codec("decode", src, b"this is not a VCDIFF stream" * 100)
        self.assertAllSlotsFree()

        # failure: the cap
        with self.assertRaises(OutputTooLarge):
            await self.run_codec("encode", src, self.random_bytes(100_000), cap=100)
        self.assertAllSlotsFree()

        # abort mid-stream
        run = await self.codec.start("encode", src, lambda _: None)
        pid = run.transport.pid
        await run.write(self.random_bytes(1000))
        self.assertEqual(self.codec.available, 0)
        run.abort()
        with self.assertRaises(CodecError):
            await run.finish()
        self.assertTrue(pid_gone(pid))
        self.assertAllSlotsFree()
        run.abort()  # a second abort is harmless
        self.assertAllSlotsFree()

        # a source file that does not exist
        with self.assertRaises(CodecError):
            await self.run_codec("encode", os.path.join(self.dir, "missing"), b"data")
        self.assertAllSlotsFree()


class FailureTests(CodecCase):

    @async_test
    async def test_garbage_delta_is_a_codec_error(self):
        src = self.write_file("source", self.random_bytes(50_000))
        for garbage in (b"garbage", self.random_bytes(100_000), b"\xd6\xc3\xc4\x00" + b"\xff" * 64):
            with self.assertRaises(CodecError) as cm:
                await self.run_codec("decode", src, garbage)
            self.assertNotIsInstance(cm.exception, OutputTooLarge)
            self.assertIn("xdelta3 failed", str(cm.exception))
        self.assertAllSlotsFree()

    @async_test
    async def test_truncated_delta_is_a_codec_error(self):
        source = self.random_bytes(200_000)
        src = self.write_file("source", source)
        target = source[:100_000] + self.random_bytes(50_000) + source[100_000:]
        delta = await self.run_codec("encode", src, target)
        with self.assertRaises(CodecError):
            await self.run_codec("decode", src, delta[: len(delta) // 2])
        self.assertAllSlotsFree()

    @async_test
    async def test_write_after_failure_raises(self):
        src = self.write_file("source", self.random_bytes(1000))
        run = await self.codec.start("decode", src, lambda _: None)
        await run.write(b"definitely not vcdiff" * 10)
        with self.assertRaises(CodecError):
            await run.finish()
        with self.assertRaises(CodecError):
            await run.write(b"more")
        self.assertAllSlotsFree()


class StallTests(CodecCase):

    stall_timeout = 1.0

    @async_test
    async def test_child_without_input_is_killed(self):
        src = self.write_file("source", self.random_bytes(10_000))
        run = await self.codec.start("encode", src, lambda _: None)
        pid = run.transport.pid
        started = time.monotonic()
        deadline = started + 10
        while run.failed is None and time.monotonic() < deadline:
            await sleep(0.05)
        self.assertIsInstance(run.failed, CodecError)
        self.assertIn("no progress", str(run.failed))
        self.assertGreaterEqual(time.monotonic() - started, self.stall_timeout * 0.9)
        with self.assertRaises(CodecError):
            await run.finish()
        self.assertTrue(pid_gone(pid), f"stalled xdelta3 child {pid} still exists")
        self.assertAllSlotsFree()

    @async_test
    async def test_steady_progress_is_not_a_stall(self):
        # Input arriving more often than the stall timeout keeps the run alive
        # even though the whole run lasts longer than the timeout.
        source = self.random_bytes(50_000)
        src = self.write_file("source", source)
        out: list[bytes] = []
        run = await self.codec.start("encode", src, out.append)
        try:
            for i in range(8):
                await run.write(source[i * 1000:(i + 1) * 1000])
                await sleep(self.stall_timeout / 5)
            await run.finish()
        finally:
            if run.failed is not None:
                run.abort()
                try:
                    await run.finish()
                except CodecError:
                    pass
        self.assertIsNone(run.failed, "feeding stdin is progress (SPEC: no stdin/stdout "
                                      "progress for the stall timeout)")
        rebuilt = await self.run_codec("decode", src, b"".join(out))
        self.assertEqual(rebuilt, source[:8000])
        self.assertAllSlotsFree()



class CheckXdelta3Tests(unittest.TestCase):

    def test_real_binary(self):
        banner = check_xdelta3()
        self.assertIn("xdelta", banner.lower())

    def test_bogus_binary_name(self):
        with self.assertRaises(RuntimeError) as cm:
            check_xdelta3("xdelta3-no-such-binary-dgproxy")
        self.assertIn(INSTALL_HINT, str(cm.exception))
        self.assertIn("apt-get install xdelta3", str(cm.exception))

    def test_binary_that_does_not_work(self):
        # Exists, runs, but is not xdelta3: the self-test must catch it.
        with self.assertRaises(RuntimeError) as cm:
            check_xdelta3("false")
        self.assertIn(INSTALL_HINT, str(cm.exception))
