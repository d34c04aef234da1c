"""The HTTP edge: requests dispatched at end-of-headers, bodies streamed.

Twisted's own L{Request} buffers the whole body and only then dispatches.
dgproxy needs the opposite: L{StreamingChannel} hands the request to the
site as soon as its headers are in, and L{StreamingRequest} exposes the body
as a L{BodyStream} that pauses the client's socket while the handler is
behind. C{100 Continue} is sent only when a handler asks for the body, which
it does after authenticating the request.
"""

from __future__ import annotations

import secrets
import time
from io import BytesIO
from typing import Optional

from twisted.internet import reactor
from twisted.internet.interfaces import ITCPTransport
from twisted.logger import Logger
from twisted.web import http, server
from twisted.web.http_headers import Headers

from dgproxy.streams import BodyStream, ClientDisconnected, pump_to_request
from dgproxy.wire import feed_head_apart

log = Logger()

DISCARD_LIMIT = 8 * 1024 * 1024


def new_request_id() -> str:
    return secrets.token_hex(8).upper()


class AmzHeaders(Headers):
    """Response headers that keep S3's lowercase C{x-amz-*} names on the wire.

    Twisted writes names in Header-Case; SDKs take the metadata key from the
    wire verbatim, so C{x-amz-meta-k} must not become C{X-Amz-Meta-K}."""

    __slots__ = ()

    def getAllRawHeaders(self):
        for name, values in super().getAllRawHeaders():
            yield (name.lower() if name.startswith(b"X-Amz-") else name), values


class StreamingRequest(server.Request):
    """A request whose body is a L{BodyStream} and whose handler runs early."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.responseHeaders = AmzHeaders()
        self.body: Optional[BodyStream] = None
        self.expected_length: Optional[int] = None
        self.request_id = new_request_id()
        self.started = time.monotonic()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.principal = "-"
        self.bucket = "-"
        self.operation = "-"
        self.raw_path = b""
        self.raw_query = b""
        self._continue_pending = False

    # -- channel callbacks -------------------------------------------------
    def gotLength(self, length: Optional[int]) -> None:
        self.content = None
        self.expected_length = length
        transport = self.channel.transport
        self.body = BodyStream(transport.pauseProducing, transport.resumeProducing)

    def headersReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self.method, self.uri, self.clientproto = command, path, version
        self.raw_path, _, self.raw_query = path.partition(b"?")
        self.path = self.raw_path
        self.args = http.parse_qs(self.raw_query, 1) if self.raw_query else {}
        self.site = self.channel.site
        self.setHeader(b"date", http.datetimeToString())
        self.setHeader(b"x-amz-request-id", self.request_id.encode())
        expect = self.requestHeaders.getRawHeaders(b"expect")
        self._continue_pending = bool(
            expect and expect[0].lower() == b"100-continue" and version == b"HTTP/1.1"
            and self.expected_length != 0)
        # Dispatch on the next reactor turn, once the channel has finished
        # its own bookkeeping for this request.
        reactor.callLater(0, self.site.dispatch, self)

    def handleContentChunk(self, data: bytes) -> None:
        if self.body is not None and not self.finished:
            self.bytes_received += len(data)
            self.body.feed(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.body is not None:
            self.body.finish()

    def connectionLost(self, reason) -> None:
        if self.body is not None and not self.body.finished:
            self.body.fail(ClientDisconnected("client disconnected during the request body"))
        super().connectionLost(reason)

    def write(self, data: bytes) -> None:
        if self.method != b"HEAD" and not self._disconnected:
            self.bytes_sent += len(data)
        super().write(data)

    # -- what handlers use ----------------------------------------------------
    @property
    def body_complete(self) -> bool:
        return self.body is None or self.body.finished

    def header(self, name: str) -> Optional[str]:
        values = self.requestHeaders.getRawHeaders(name.encode("latin-1"))
        return values[0].decode("latin-1") if values else None

    def header_map(self) -> dict[str, list[str]]:
        return {k.decode("latin-1").lower(): [v.decode("latin-1") for v in vs]
                for k, vs in self.requestHeaders.getAllRawHeaders()}

    def client_ip(self) -> str:
        peer = self.getClientAddress()
        return getattr(peer, "host", "-")

    def accept_body(self) -> BodyStream:
        """Ask the client for the body (sending 100 Continue if it waits)."""
        if self._continue_pending and not self._disconnected:
            self._continue_pending = False
            self.channel._send100Continue()
        return self.body

    async def discard_body(self) -> None:
        """Read and drop an unread body so the error response reaches the client.

        A client still waiting for 100 Continue never sends its body: close
        instead. Bodies larger than L{DISCARD_LIMIT} are not read either."""
        if self.body_complete:
            return
        if (self._continue_pending or self.expected_length is None
                or self.expected_length - self.bytes_received > DISCARD_LIMIT):
            self._close_after_response()
            return
        try:
            while await self.body.read():
                pass
        except Exception:
            self._close_after_response()

    def _close_after_response(self) -> None:
        self.responseHeaders.setRawHeaders(b"connection", [b"close"])
        if self.channel is not None:
            self.channel.persistent = False

    async def send(self, status: int, headers: list[tuple[str, str]],
                   body=None, length: Optional[int] = None) -> None:
        """Write a complete response; C{body} is bytes or an L{IByteSource}."""
        if self._disconnected:
            if body is not None and not isinstance(body, bytes):
                body.close()
            self.log_disconnect()
            return
        if not self.body_complete:
            await self.discard_body()
        self.setResponseCode(status)
        for name, value in headers:
            self.responseHeaders.addRawHeader(name.encode("latin-1"), value.encode("latin-1"))
        if isinstance(body, bytes) or body is None:
            data = body or b""
            self.setHeader(b"content-length", b"%d" % (len(data) if length is None else length))
            if self.method != b"HEAD" and data:
                self.write(data)
            self.finish()
            return
        if length is not None:
            self.setHeader(b"content-length", b"%d" % length)
        if self.method == b"HEAD":
            body.close()
            self.finish()
            return
        try:
            await pump_to_request(body, self)
        except ClientDisconnected:
            self.log_disconnect()
            return
        except Exception:
            # Headers are out; the only honest signal left is a cut connection.
            log.failure("Response body failed after headers were sent")
            self._close_after_response()
            if self.channel is not None:
                self.channel.transport.abortConnection()
            return
        if not self._disconnected:
            self.finish()

    def log_disconnect(self) -> None:
        """The access-log line for a request whose client went away (status 499,
        as nginx writes it); Twisted logs only finished requests."""
        if not getattr(self, "_logged_disconnect", False) and self.site is not None:
            self._logged_disconnect = True
            self.code = 499
            self.site.log(self)

    def body_bytes(self) -> bytes:
        """For admin resources rendered the classic Twisted way."""
        return self.content.getvalue() if isinstance(self.content, BytesIO) else b""


class StreamingChannel(http.HTTPChannel):
    """An L{HTTPChannel} that dispatches when the headers are complete."""

    on_close = None

    def connectionMade(self):
        super().connectionMade()
        # Small writes (headers, a short body, a body's last bytes) go out at
        # once: with Nagle on they wait for the client's delayed ACK.
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)

    def dataReceived(self, data: bytes) -> None:
        if self.line_mode:
            feed_head_apart(data, super().dataReceived)
        else:
            super().dataReceived(data)

    def connectionLost(self, reason):
        super().connectionLost(reason)
        if self.on_close is not None:
            self.on_close()

    def allHeadersReceived(self) -> None:
        req = self.requests[-1]
        req.parseCookies()
        self.persistent = self.checkPersistence(req, self._version)
        req.gotLength(self.length)
        req.headersReceived(self._command, self._path, self._version)

    def allContentReceived(self) -> None:
        if not self.requests or self.requests[-1].finished:
            # The response went out before the body finished; the
            # connection is closing, nothing is left to dispatch.
            self.length = 0
            self._transferDecoder = None
            self.setRawMode()
            self._handlingRequest = True
            return
        super().allContentReceived()
