"""xdelta3 as a Twisted process: encode and decode, streamed, bounded.

Each run is one C{xdelta3} child (C{-e}/C{-d} C{-D -s SOURCE}) fed on stdin
with backpressure and read on stdout into a sink. A L{DeferredSemaphore}
bounds how many run at once; waiting for a slot is bounded too, after which
the caller gets L{CodecBusy} (503 SlowDown). A run that makes no progress
for C{stall_timeout} seconds is killed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from typing import Callable, Optional

from twisted.internet import defer, error, protocol
from twisted.logger import Logger

from dgproxy.streams import CHUNK, PauseGate

log = Logger(namespace="dgproxy.codec")

INSTALL_HINT = ("xdelta3 was not found or does not work. Install it before starting dgproxy "
                "(Debian/Ubuntu: apt-get install xdelta3; macOS: brew install xdelta).")


ENCODE_WINDOW = 2 * 1024 * 1024
MIN_SOURCE_BUFFER = 512 * 1024
MAX_SOURCE_BUFFER = 64 * 1024 * 1024  # xdelta3's default


def source_buffer(path: str) -> int:
    """xdelta3's source buffer (-B) for this reference: the smallest power of
    two that holds it, within xdelta3's minimum and its default. A small
    reference then costs a small allocation (a 32 KiB pair encodes about ten
    times faster than with the default 64 MiB), a large one what it always did."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return MAX_SOURCE_BUFFER
    buffer = MIN_SOURCE_BUFFER
    while buffer < size and buffer < MAX_SOURCE_BUFFER:
        buffer *= 2
    return buffer


class CodecBusy(Exception):
    """No codec slot became free in time."""


class CodecError(Exception):
    """xdelta3 failed, stalled, or produced more output than allowed."""


class OutputTooLarge(CodecError):
    """The output passed its cap (a losing delta, or a decompression bomb)."""


def check_xdelta3(binary: str = "xdelta3") -> str:
    """Run a real 1-byte encode and decode; return the version banner.

    Raises L{RuntimeError} with L{INSTALL_HINT} if that fails."""
    path = shutil.which(binary)
    if path is None:
        raise RuntimeError(INSTALL_HINT)
    with tempfile.TemporaryDirectory(prefix="dgp-xdelta3-check-") as d:
        src = os.path.join(d, "src")
        with open(src, "wb") as f:
            f.write(b"a")
        try:
            enc = subprocess.run([path, "-e", "-D", "-s", src, "-c"], input=b"b",
                                 capture_output=True, timeout=30)
            dec = subprocess.run([path, "-d", "-D", "-s", src, "-c"], input=enc.stdout,
                                 capture_output=True, timeout=30)
            banner = subprocess.run([path, "-V"], capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as e:
            raise RuntimeError(f"{INSTALL_HINT} ({e})") from None
    if enc.returncode or dec.returncode or dec.stdout != b"b":
        raise RuntimeError(f"{INSTALL_HINT} (self-test failed: "
                           f"{(enc.stderr or dec.stderr).decode(errors='replace').strip()})")
    return (banner.stderr or banner.stdout).decode(errors="replace").splitlines()[0]


class CodecRun(protocol.ProcessProtocol):
    """One xdelta3 child. Feed it with L{write}, end with L{finish}.

    Output goes to C{sink} (a callable taking bytes) as it arrives; more than
    C{cap} bytes of output kills the child with L{OutputTooLarge}."""

    def __init__(self, reactor, sink: Callable[[bytes], None], cap: Optional[int],
                 stall_timeout: float, on_done: Callable[[], None]):
        self._reactor = reactor
        self._sink = sink
        self._cap = cap
        self._stall_timeout = stall_timeout
        self._on_done = on_done
        self._gate = PauseGate()  # the child's stdin: full, drained
        self._stderr: list[bytes] = []
        self._exited = defer.Deferred()
        self._failure: Optional[CodecError] = None
        self._watchdog = None
        self._ended = False
        self.output_size = 0
        self.started = time.monotonic()

    # -- process protocol -----------------------------------------------------
    def connectionMade(self):
        self.transport.registerProducer(self._gate, True)
        self._arm()

    def childDataReceived(self, fd, data):
        self._arm()
        if fd == 1:
            self.output_size += len(data)
            if self._cap is not None and self.output_size > self._cap:
                self._kill(OutputTooLarge(f"output passed {self._cap} bytes"))
                return
            try:
                self._sink(data)
            except Exception as e:  # a full disk, say
                self._kill(CodecError(f"cannot store codec output: {e}"))
        elif fd == 2 and sum(map(len, self._stderr)) < 8192:
            self._stderr.append(data)

    def processEnded(self, reason):
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.cancel()
        self._watchdog = None
        self._end()
        if self._failure is None and not reason.check(error.ProcessDone):
            detail = b"".join(self._stderr).decode(errors="replace").strip()
            self._failure = CodecError(f"xdelta3 failed ({reason.value}): {detail[-500:]}")
        self._exited.callback(None)

    # -- feeding ------------------------------------------------------------------
    async def write(self, data: bytes) -> None:
        if self._failure is not None or self._exited.called:
            raise self._failure or CodecError("xdelta3 exited early")
        self.transport.write(data)
        if self._gate.paused is not None:
            await self._gate.paused
        self._arm()  # the child took input: that is progress too

    async def feed(self, source) -> None:
        """Write all of C{source} to the child (stopping early if it failed);
        raises L{CodecError} if it did."""
        try:
            while self._failure is None:
                chunk = await source.read(CHUNK)
                if not chunk:
                    return
                await self.write(chunk)
            raise self._failure
        finally:
            source.close()

    async def finish(self) -> int:
        """Close stdin, wait for exit; returns the output size or raises."""
        if not self._exited.called:
            try:
                self.transport.unregisterProducer()
            except Exception:
                pass
            self.transport.closeStdin()
        await self._exited
        if self._failure is not None:
            raise self._failure
        return self.output_size

    def abort(self) -> None:
        """Kill the child (safe to call at any time)."""
        if not self._exited.called:
            self._kill(CodecError("aborted"))

    @property
    def failed(self) -> Optional[CodecError]:
        return self._failure

    # -- internals -------------------------------------------------------------------
    def _arm(self) -> None:
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.reset(self._stall_timeout)
        elif not self._exited.called:
            self._watchdog = self._reactor.callLater(self._stall_timeout, self._stalled)

    def _stalled(self) -> None:
        self._watchdog = None
        self._kill(CodecError(f"xdelta3 made no progress for {self._stall_timeout:.0f}s"))

    def _kill(self, failure: CodecError) -> None:
        if self._failure is None:
            self._failure = failure
        self._gate.resumeProducing()
        try:
            self.transport.signalProcess("KILL")
        except (error.ProcessExitedAlready, AttributeError):
            pass

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._on_done()


class Codec:
    """Runs xdelta3 with at most C{concurrency} children at once."""

    def __init__(self, reactor, concurrency: int, binary: str = "xdelta3",
                 wait_timeout: float = 60.0, stall_timeout: float = 30.0):
        self._reactor = reactor
        self.binary = shutil.which(binary) or binary
        self.concurrency = concurrency
        self.semaphore = defer.DeferredSemaphore(concurrency)
        self.wait_timeout = wait_timeout
        self.stall_timeout = stall_timeout

    @property
    def available(self) -> int:
        """Free slots (the C{deltaglider_codec_semaphore_available} gauge)."""
        return self.semaphore.tokens

    async def _acquire(self) -> None:
        d = self.semaphore.acquire()
        if d.called:
            await d
            return
        timer = self._reactor.callLater(self.wait_timeout, d.cancel)
        try:
            await d
        except defer.CancelledError:
            raise CodecBusy(f"no codec slot free within {self.wait_timeout:.0f}s") from None
        finally:
            if timer.active():
                timer.cancel()

    async def start(self, mode: str, source_path: str, sink: Callable[[bytes], None],
                    cap: Optional[int] = None, raw: bool = True) -> CodecRun:
        """Take a slot (waiting a bounded time) and start C{xdelta3 -e|-d -D -s SOURCE -c}.

        The slot is released when the child ends, whatever the outcome."""
        if mode not in ("encode", "decode"):
            raise ValueError(mode)
        await self._acquire()
        return self._spawn(mode, source_path, sink, cap, raw)

    def try_start(self, mode: str, source_path: str, sink: Callable[[bytes], None],
                  cap: Optional[int] = None) -> Optional[CodecRun]:
        """Like L{start}, but only if a slot is free right now; else None."""
        if self.semaphore.tokens <= 0:
            return None
        self.semaphore.acquire()  # fires synchronously: a token is free
        return self._spawn(mode, source_path, sink, cap)

    def _spawn(self, mode: str, source_path: str, sink, cap, raw: bool = True) -> CodecRun:
        """C{raw=False} drops C{-D}: the Python deltaglider tool encodes without
        it, so its deltas of gzip files expect xdelta3's own recompression."""
        run = CodecRun(self._reactor, sink, cap, self.stall_timeout, self.semaphore.release)
        flag = "-e" if mode == "encode" else "-d"
        args = [self.binary, flag] + (["-D"] if raw else []) + ["-q"]
        if mode == "encode":
            # A 2 MiB input window (xdelta3's default is 8 MiB) lets the encoder
            # keep pace with a body that is still arriving, at a delta size
            # within a few tenths of a percent of the default's.
            args += ["-W", str(ENCODE_WINDOW)]
        args += ["-B", str(source_buffer(source_path))]
        args += ["-s", source_path, "-c"]
        try:
            self._reactor.spawnProcess(run, self.binary, args, env={"PATH": "/usr/bin:/bin"},
                                       childFDs={0: "w", 1: "r", 2: "r"})
        except Exception:
            self.semaphore.release()
            raise
        return run
