"""Byte streams with backpressure: the one shape every body takes.

A body moves through dgproxy as an L{IByteSource}: something the next stage
pulls from with C{read()}, getting a L{Deferred} of the next chunk (C{b""} at
the end). Because a stage only asks for the next chunk when it has dealt with
the last one, backpressure falls out of the shape: at the socket edge,
L{BodyStream} pauses the client's transport while its buffer is full, and
L{pump_to_request} stops pulling while the client's socket is full.
"""

from __future__ import annotations

import hashlib
from collections import deque
from typing import Callable, Optional

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from dgproxy.sockets import SOCKET_CHUNK

CHUNK = 256 * 1024


class ClientDisconnected(Exception):
    """The client went away before its request body was complete."""


class IByteSource(Interface):
    """A stream of bytes pulled one chunk at a time."""

    def read(size: int = CHUNK) -> defer.Deferred:
        """Fire with up to C{size} bytes; C{b""} means the stream has ended."""

    def close() -> None:
        """Release what the source holds; safe to call more than once."""


@implementer(IByteSource)
class BodyStream:
    """Turns pushed chunks (from a socket) into a pulled L{IByteSource}.

    C{pause}/C{resume} are called when the buffer goes above C{high} bytes
    and back below it, so a slow reader slows the writer down.
    """

    def __init__(self, pause: Callable[[], None], resume: Callable[[], None],
                 high: int = 2 * CHUNK):
        self._pause = pause
        self._resume = resume
        self._high = high
        self._chunks: deque[bytes] = deque()
        self._offset = 0  # bytes of the first chunk already read
        self._buffered = 0
        self._paused = False
        self._done = False
        self._failure: Optional[Failure] = None
        self._waiting: Optional[defer.Deferred] = None
        self._relay: Optional[Callable[[bytes], None]] = None
        self._relayed: Optional[defer.Deferred] = None
        self._relay_count = 0
        self.received = 0

    # push side
    def feed(self, data: bytes) -> None:
        if self._done or self._failure is not None or not data:
            return
        self.received += len(data)
        if self._relay is not None:
            self._relay_count += len(data)
            self._relay(data)
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered >= self._high:
            # Pause again even if already paused: the channel may have
            # resumed the transport behind our back.
            self._paused = True
            self._pause()
        self._wake()

    def finish(self) -> None:
        self._done = True
        self._wake()

    def fail(self, reason: Failure | Exception) -> None:
        if self._done or self._failure is not None:
            return
        self._failure = reason if isinstance(reason, Failure) else Failure(reason)
        self._wake()

    # relay side: instead of being read, the stream writes into a consumer
    def relay(self, write: Callable[[bytes], None]) -> defer.Deferred:
        """Hand every chunk, buffered or still to come, straight to C{write}:
        no Deferred per chunk. After this the stream cannot be read. Fires
        with the bytes written once the body ends, or fails as a read would.
        The consumer paces the source with L{pause_source}/L{resume_source}."""
        if self._waiting is not None or self._relay is not None:
            raise RuntimeError("relay on a BodyStream that is being read")
        relayed = self._relayed = defer.Deferred()
        offset, self._offset = self._offset, 0
        while self._chunks and self._failure is None:
            chunk = self._chunks.popleft()
            if offset:
                chunk, offset = chunk[offset:], 0
            self._relay_count += len(chunk)
            write(chunk)
        self._chunks.clear()
        self._buffered = 0
        self._relay = write
        self._wake()
        if self._relayed is not None and self._paused:
            self.resume_source()
        return relayed

    def pause_source(self) -> None:
        self._paused = True
        self._pause()

    def resume_source(self) -> None:
        self._paused = False
        self._resume()

    @property
    def finished(self) -> bool:
        return self._done

    # pull side
    def read(self, size: int = CHUNK) -> defer.Deferred:
        if self._waiting is not None:
            raise RuntimeError("concurrent read on a BodyStream")
        if self._chunks:
            return defer.succeed(self._take(size))
        if self._failure is not None:
            return defer.fail(self._failure)
        if self._done:
            return defer.succeed(b"")
        self._waiting = defer.Deferred()
        self._waiting.size = size  # type: ignore[attr-defined]
        return self._waiting

    def close(self) -> None:
        self._chunks.clear()
        self._offset = 0
        self._buffered = 0
        if self._failure is None and not self._done:
            self._failure = Failure(ClientDisconnected("body closed by reader"))
        if self._paused:
            self._paused = False
            self._resume()
        if self._relayed is not None:
            self._wake()

    def _take(self, size: int) -> bytes:
        # A chunk larger than the read is consumed from an offset: slicing
        # off its remainder would copy it again on every read.
        out = []
        n = 0
        while self._chunks and n < size:
            chunk = self._chunks[0]
            start = self._offset
            left = len(chunk) - start
            room = size - n
            if left <= room:
                out.append(chunk[start:] if start else chunk)
                self._chunks.popleft()
                self._offset = 0
                n += left
            else:
                out.append(chunk[start:start + room])
                self._offset = start + room
                n += room
        self._buffered -= n
        if self._paused and self._buffered < max(1, self._high // 2):
            self._paused = False
            self._resume()
        return out[0] if len(out) == 1 else b"".join(out)

    def _wake(self) -> None:
        if self._relayed is not None:
            if self._failure is not None:
                d, self._relayed = self._relayed, None
                d.errback(self._failure)
            elif self._done:
                d, self._relayed = self._relayed, None
                d.callback(self._relay_count)
            return
        d, self._waiting = self._waiting, None
        if d is None:
            return
        if self._chunks:
            d.callback(self._take(d.size))
        elif self._failure is not None:
            d.errback(self._failure)
        elif self._done:
            d.callback(b"")
        else:
            self._waiting = d


@implementer(IByteSource)
class BytesSource:
    """An in-memory source, for small bodies (XML documents, tests)."""

    def __init__(self, data: bytes):
        self._data = memoryview(data)
        self._pos = 0

    def read(self, size: int = CHUNK) -> defer.Deferred:
        chunk = bytes(self._data[self._pos:self._pos + size])
        self._pos += len(chunk)
        return defer.succeed(chunk)

    def close(self) -> None:
        self._pos = len(self._data)


@implementer(IByteSource)
class FileSource:
    """Reads C{length} bytes of an open file from C{offset}, then closes it.

    Reads are synchronous: a read of a local file is a page-cache copy, the
    same trade Twisted's own static file producers make.
    """

    def __init__(self, fileobj, offset: int = 0, length: Optional[int] = None):
        self._file = fileobj
        self._remaining = length
        if offset:
            fileobj.seek(offset)

    def read(self, size: int = CHUNK) -> defer.Deferred:
        if self._file is None:
            return defer.succeed(b"")
        if self._remaining is not None:
            size = min(size, self._remaining)
        try:
            data = self._file.read(size) if size > 0 else b""
        except OSError as e:
            self.close()
            return defer.fail(e)
        if self._remaining is not None:
            self._remaining -= len(data)
        if not data:
            self.close()
        return defer.succeed(data)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@implementer(IByteSource)
class SliceSource:
    """C{length} bytes from C{offset} of another source: for a service that
    answers a ranged read with the whole blob."""

    def __init__(self, source, offset: int, length: int):
        self._source = source
        self._skip = offset
        self._remaining = length
        self._pending = b""

    async def _read(self, size: int) -> bytes:
        while not self._pending and self._remaining > 0:
            chunk = await self._source.read(max(size, CHUNK))
            if not chunk:
                break
            if len(chunk) <= self._skip:
                self._skip -= len(chunk)
                continue
            self._pending = chunk[self._skip:self._skip + self._remaining]
            self._skip = 0
        data, self._pending = self._pending[:size], self._pending[size:]
        self._remaining -= len(data)
        if not data or self._remaining == 0:
            self._source.close()
        return data

    def read(self, size: int = CHUNK) -> defer.Deferred:
        return defer.ensureDeferred(self._read(size))

    def close(self) -> None:
        self._pending = b""
        self._remaining = 0
        self._source.close()


@implementer(IByteSource)
class HashingSource:
    """Passes a source through while computing MD5 and SHA-256 of what passed
    (either may be turned off; it is then None)."""

    def __init__(self, source, want_sha256: bool = True, want_md5: bool = True):
        self._source = source
        self.md5 = hashlib.md5() if want_md5 else None
        self.sha256 = hashlib.sha256() if want_sha256 else None
        self.size = 0

    def read(self, size: int = CHUNK) -> defer.Deferred:
        return self._source.read(size).addCallback(self._seen)

    def _seen(self, data: bytes) -> bytes:
        if data:
            self.size += len(data)
            if self.md5 is not None:
                self.md5.update(data)
            if self.sha256 is not None:
                self.sha256.update(data)
        return data

    def close(self) -> None:
        self._source.close()


class FileSink:
    """Writes to a local file in the reactor's thread pool, batched.

    Data is gathered into batches of L{batch} bytes; one batch is written in
    a thread while the next fills, so a slow disk slows the writer (the
    Deferred from L{write} waits) without blocking the reactor."""

    batch = 1024 * 1024

    def __init__(self, fileobj):
        self.file = fileobj
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._inflight: Optional[defer.Deferred] = None
        self.size = 0

    def write(self, data: bytes) -> defer.Deferred:
        self.size += len(data)
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size < self.batch:
            return defer.succeed(None)
        return defer.ensureDeferred(self._start_batch())

    async def _start_batch(self) -> None:
        from twisted.internet.threads import deferToThread
        if self._inflight is not None:
            await self._inflight
        data = b"".join(self._pending)
        self._pending, self._pending_size = [], 0
        self._inflight = deferToThread(self.file.write, data)

    async def flush(self) -> None:
        """Wait until every byte given to L{write} is in the file."""
        if self._pending:
            await self._start_batch()
        if self._inflight is not None:
            await self._inflight
        self.file.flush()

    def discard(self) -> None:
        """Forget pending data; an in-flight write's failure is ignored."""
        self._pending, self._pending_size = [], 0
        if self._inflight is not None:
            self._inflight.addErrback(lambda _: None)


@implementer(IPushProducer)
class PauseGate:
    """A push producer's pause state as something to wait on.

    Register it with a consumer (a request, a pipe, an upload); while the
    consumer is full, L{paused} is a Deferred that fires on resume."""

    def __init__(self):
        self.paused: Optional[defer.Deferred] = None
        self.stopped = False

    def pauseProducing(self) -> None:
        if self.paused is None:
            self.paused = defer.Deferred()

    def resumeProducing(self) -> None:
        d, self.paused = self.paused, None
        if d is not None:
            d.callback(None)

    def stopProducing(self) -> None:
        self.stopped = True
        self.resumeProducing()


class _IntoRequest:
    """Copies a source into a Twisted request as its registered producer:
    cleans up either way, and a client that went away is L{ClientDisconnected}."""

    stopped = False

    def __init__(self, source, request):
        self._source = source
        self._request = request

    async def _copy(self) -> int:
        raise NotImplementedError

    async def run(self) -> int:
        sent = 0
        self._request.registerProducer(self, True)
        try:
            sent = await self._copy()
        except ClientDisconnected:
            if not self.stopped:
                raise
        finally:
            self._source.close()
            if not self.stopped:
                self._request.unregisterProducer()
        if self.stopped:
            raise ClientDisconnected("client went away mid-response")
        return sent


class _RequestPump(PauseGate, _IntoRequest):
    """Pulls chunks from a source into the request, pausing while it is full."""

    def __init__(self, source, request):
        PauseGate.__init__(self)
        _IntoRequest.__init__(self, source, request)

    async def _copy(self) -> int:
        sent = 0
        while not self.stopped:
            if self.paused is not None:
                await self.paused
                continue
            chunk = await self._source.read(SOCKET_CHUNK)
            if not chunk:
                break
            sent += len(chunk)
            self._request.write(chunk)
        return sent


@implementer(IPushProducer)
class _RequestRelay(_IntoRequest):
    """Lets a L{BodyStream} write straight into the request; the request's
    backpressure pauses the stream's source (a socket)."""

    def __init__(self, source, stream: BodyStream, request, prefix: bytes):
        super().__init__(source, request)
        self._stream = stream
        self._prefix = prefix

    def pauseProducing(self) -> None:
        self._stream.pause_source()

    def resumeProducing(self) -> None:
        self._stream.resume_source()

    def stopProducing(self) -> None:
        self.stopped = True
        self._stream.close()

    async def _copy(self) -> int:
        if self._prefix:
            self._request.write(self._prefix)
        return len(self._prefix) + await self._stream.relay(self._request.write)


def pump_to_request(source, request) -> defer.Deferred:
    """Copy C{source} into C{request} with backpressure; fires with bytes sent.

    A source over a socket (it has C{relay_stream}) is relayed: its chunks
    are written into the request as they arrive, without a Deferred each."""
    take = getattr(source, "relay_stream", None)
    found = take() if take is not None else None
    if found is not None:
        prefix, stream = found
        return defer.ensureDeferred(_RequestRelay(source, stream, request, prefix).run())
    return defer.ensureDeferred(_RequestPump(source, request).run())


class BodyTooLarge(Exception):
    """A body grew past the limit it was copied under."""


async def drain(source, sink_write: Callable[[bytes], object],
                limit: Optional[int] = None) -> int:
    """Pull every chunk of C{source} into C{sink_write}, awaiting it when it
    returns a Deferred; returns the byte count. More than C{limit} bytes
    raises L{BodyTooLarge}. The source is closed either way."""
    total = 0
    try:
        while True:
            chunk = await source.read(CHUNK)
            if not chunk:
                return total
            total += len(chunk)
            if limit is not None and total > limit:
                raise BodyTooLarge(total)
            result = sink_write(chunk)
            if isinstance(result, defer.Deferred):
                await result
    finally:
        source.close()


async def read_all(source, limit: int) -> bytes:
    """Read a whole small body; more than C{limit} bytes raises L{ValueError}."""
    parts = []
    total = 0
    try:
        while True:
            chunk = await source.read(CHUNK)
            if not chunk:
                return b"".join(parts)
            total += len(chunk)
            if total > limit:
                raise ValueError(f"body larger than {limit} bytes")
            parts.append(chunk)
    finally:
        source.close()
