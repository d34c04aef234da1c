"""The one listening Site: S3 on C{/}, the admin tree under C{/_/}."""

from __future__ import annotations

import time
from io import BytesIO

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server
from zope.interface import Interface

from dgproxy.http.request import StreamingChannel, StreamingRequest
from dgproxy.streams import read_all

log = Logger(namespace="dgproxy.access")

ADMIN_PREFIX = b"/_/"
ADMIN_BODY_LIMIT = 1024 * 1024


class IRequestHandler(Interface):
    """Handles one S3 request from end-of-headers to the response."""

    def handle(request):
        """Return a Deferred that fires when the response has been sent."""


class DGSite(server.Site):
    """Routes each request to the S3 handler or the admin resource tree."""

    requestFactory = StreamingRequest
    protocol = StreamingChannel

    def __init__(self, s3_handler, admin_root: resource.Resource, metrics=None, **kwargs):
        super().__init__(admin_root, **kwargs)
        self.s3_handler = s3_handler
        self.metrics = metrics
        self.draining = False
        self.inflight: set = set()
        self.channels: dict = {}  # open connection -> Deferred fired when it closes

    def buildProtocol(self, addr):
        channel = super().buildProtocol(addr)
        closed = defer.Deferred()
        self.channels[channel] = closed
        channel.on_close = lambda: (self.channels.pop(channel, None),
                                    closed.called or closed.callback(None))
        return channel

    def close_connections(self) -> list:
        """Ask every open connection to close once its output is written;
        Deferreds that fire as they do."""
        waiting = list(self.channels.values())
        for channel in list(self.channels):
            channel.persistent = False
            if not channel.requests:
                channel.loseConnection()
        return waiting

    def dispatch(self, request: StreamingRequest) -> None:
        if request._disconnected:
            return
        if request.raw_path.startswith(ADMIN_PREFIX) or request.raw_path == b"/_":
            name = request.raw_path[len(ADMIN_PREFIX):].split(b"/", 1)[0].decode("latin-1")
            request.operation = name if name in ("health", "ready", "metrics") else "admin"
            d = defer.ensureDeferred(self._render_admin(request))
        else:
            d = defer.maybeDeferred(self.s3_handler.handle, request)
        self.inflight.add(d)
        d.addErrback(self._crashed, request)
        d.addBoth(lambda r: (self.inflight.discard(d), r)[1])

    async def _render_admin(self, request: StreamingRequest) -> None:
        request.accept_body()
        try:
            data = await read_all(request.body, ADMIN_BODY_LIMIT)
        except ValueError:
            await request.send(413, [("content-type", "application/json")],
                               b'{"error":"body_too_large"}')
            return
        request.content = BytesIO(data)
        request.prepath = []
        request.postpath = [p for p in request.path[1:].split(b"/")]
        request.render(self.getResourceFor(request))

    def _crashed(self, failure, request: StreamingRequest) -> None:
        log.failure("Unhandled error in request {request_id}", failure,
                    request_id=request.request_id)
        if not request.startedWriting and not request._disconnected:
            request.setResponseCode(500)
            request.setHeader(b"content-type", b"application/xml")
            request.setHeader(b"connection", b"close")
            if request.channel is not None:
                request.channel.persistent = False
            request.write(b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>InternalError"
                          b"</Code><Message>We encountered an internal error. Please try again."
                          b"</Message><RequestId>" + request.request_id.encode() +
                          b"</RequestId></Error>")
            request.finish()

    def log(self, request: StreamingRequest) -> None:
        """One access-log line per request."""
        duration = time.monotonic() - getattr(request, "started", time.monotonic())
        method = request.method.decode("latin-1")
        bucket = getattr(request, "bucket", "-")
        bytes_in = getattr(request, "bytes_received", 0)
        bytes_out = getattr(request, "bytes_sent", 0)
        operation = getattr(request, "operation", "-")
        if self.metrics is not None:
            self.metrics.request_done(method.upper(), request.code, operation, duration,
                                      bytes_in, bytes_out)
        duration_ms = int(duration * 1000)
        principal = getattr(request, "principal", "-")
        request_id = getattr(request, "request_id", "-")
        # Rendered here: Twisted's own formatting would cost more than the rest
        # of this line's path together.
        line = (f"{method} {bucket} {request.code} {bytes_in}/{bytes_out} {duration_ms}ms "
                f"{principal} {request_id} {operation}")
        log.info("{dg_line}", dg_line=line, method=method, bucket=bucket, status=request.code,
                 bytes_in=bytes_in, bytes_out=bytes_out, duration_ms=duration_ms,
                 principal=principal, request_id=request_id, operation=operation,
                 client=getattr(request, "client_ip", lambda: "-")())
