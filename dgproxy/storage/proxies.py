"""Reaching an S3 service through an outbound HTTP proxy, as corporate
networks require: the proxy is taken from the environment every AWS tool
reads (C{HTTPS_PROXY}, C{HTTP_PROXY}, C{NO_PROXY}, upper or lower case).

An https:// service is reached through a C{CONNECT} tunnel, so TLS still
runs end to end with the service and the proxy sees only the host name. An
http:// service gets its requests in absolute form (C{GET http://host/path}),
as plain HTTP proxies expect."""

from __future__ import annotations

import base64
import urllib.request
from typing import Mapping, Optional
from urllib.parse import unquote, urlsplit

from twisted.internet import defer, error as net_error
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

MAX_ANSWER_HEAD = 16 * 1024


class ProxyRefused(net_error.ConnectError):
    """The proxy would not open a tunnel (its status line says why)."""


class Proxy:
    """One proxy URL: where it listens, and the Basic credentials in it."""

    def __init__(self, url: str):
        parts = urlsplit(url if "://" in url else "http://" + url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"proxy {url!r}: only http:// proxies are supported")
        self.url = f"http://{parts.hostname}:{parts.port or 80}"
        self.host = parts.hostname
        self.port = parts.port or 80
        self.authorization: Optional[bytes] = None
        if parts.username is not None:
            user_pass = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self.authorization = b"Basic " + base64.b64encode(user_pass.encode("utf-8"))

    def __repr__(self) -> str:
        return self.url  # never the credentials: this goes into log lines


def _proxies(environment: Optional[Mapping[str, str]]) -> dict[str, str]:
    """{scheme or "no": value} from the *_PROXY variables, as urllib reads them."""
    if environment is None:
        return urllib.request.getproxies_environment()
    return {k.lower()[:-len("_proxy")]: v for k, v in environment.items()
            if k.lower().endswith("_proxy") and v}


def check_proxies(environment: Optional[Mapping[str, str]] = None) -> None:
    """Raise ValueError, at start-up, for an HTTP(S)_PROXY dgproxy cannot use."""
    for scheme in ("http", "https"):
        url = _proxies(environment).get(scheme)
        if url:
            Proxy(url)


def proxy_for(scheme: str, host: str,
              environment: Optional[Mapping[str, str]] = None) -> Optional[Proxy]:
    """The proxy a request to C{scheme}://C{host} goes through, or None
    (none set, or C{NO_PROXY} names the host or one of its domains)."""
    proxies = _proxies(environment)
    url = proxies.get(scheme)
    if not url or urllib.request.proxy_bypass_environment(host, proxies):
        return None
    return Proxy(url)


class _Tunnel(Protocol):
    """Asks the proxy for a tunnel; once it is open, hands the connection to
    the protocol that wanted it and passes everything through."""

    def __init__(self, wanted: Factory, target: bytes, authorization: Optional[bytes],
                 opened: defer.Deferred):
        self._wanted = wanted
        self._target = target
        self._authorization = authorization
        self._opened = opened
        self._head = b""
        self._inner: Optional[Protocol] = None

    def connectionMade(self):
        lines = [b"CONNECT " + self._target + b" HTTP/1.1", b"Host: " + self._target]
        if self._authorization is not None:
            lines.append(b"Proxy-Authorization: " + self._authorization)
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n")

    def dataReceived(self, data: bytes):
        if self._inner is not None:
            self._inner.dataReceived(data)
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_ANSWER_HEAD:
                self._refused(b"an answer head over 16 KiB")
            return
        status_line = self._head.split(b"\r\n", 1)[0]
        rest, self._head = self._head[end + 4:], b""
        fields = status_line.split(None, 2)
        if len(fields) < 2 or not fields[0].startswith(b"HTTP/1.") or fields[1] != b"200":
            self._refused(status_line[:200])
            return
        if self._opened is None or self._opened.called:  # given up on (timed out, cancelled)
            self.transport.abortConnection()
            return
        inner = self._wanted.buildProtocol(self.transport.getPeer())
        if inner is None:
            self._refused(b"no protocol for the tunnel")
            return
        self._inner = inner
        inner.makeConnection(self.transport)
        opened, self._opened = self._opened, None
        opened.callback(inner)
        if rest:
            inner.dataReceived(rest)

    def _refused(self, why: bytes) -> None:
        self.transport.abortConnection()
        self._fail(ProxyRefused(string=f"proxy refused CONNECT {self._target.decode()}: "
                                       f"{why.decode('latin-1')}"))

    def _fail(self, error: Exception) -> None:
        opened, self._opened = self._opened, None
        if opened is not None and not opened.called:
            opened.errback(error)

    def connectionLost(self, reason):
        if self._inner is not None:
            self._inner.connectionLost(reason)
        else:
            self._fail(net_error.ConnectionLost(
                f"proxy closed the connection before opening a tunnel to {self._target.decode()}"))


class _TunnelFactory(Factory):
    def __init__(self, wanted: Factory, target: bytes, authorization: Optional[bytes],
                 opened: defer.Deferred):
        self._args = (wanted, target, authorization, opened)

    def buildProtocol(self, addr):
        return _Tunnel(*self._args)


@implementer(IStreamClientEndpoint)
class TunnelEndpoint:
    """C{host}:C{port} through a C{CONNECT} tunnel of the proxy that
    C{to_proxy} connects to. A proxy that does not answer within C{timeout}
    seconds fails the connection attempt."""

    def __init__(self, reactor, to_proxy: IStreamClientEndpoint, proxy: Proxy, host: str,
                 port: int, timeout: float):
        self._reactor = reactor
        self._to_proxy = to_proxy
        self._proxy = proxy
        self._target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._timeout = timeout

    def connect(self, factory: Factory) -> defer.Deferred:
        tunnels: list[_Tunnel] = []

        def stop(why: Exception) -> None:
            """Fail the attempt now, and drop whatever it has opened so far."""
            if not opened.called:
                opened.errback(why)
            if tunnels:
                tunnels[0].transport.abortConnection()
            else:
                connecting.cancel()

        opened: defer.Deferred = defer.Deferred(
            lambda d: stop(defer.CancelledError(f"tunnel to {self._target} cancelled")))
        connecting = self._to_proxy.connect(_TunnelFactory(
            factory, self._target.encode("ascii"), self._proxy.authorization, opened))

        def failed(f):
            if not opened.called:
                opened.errback(f)

        connecting.addCallbacks(tunnels.append, failed)
        timer = self._reactor.callLater(self._timeout, lambda: stop(net_error.TimeoutError(
            string=f"proxy {self._proxy!r} did not open a tunnel to {self._target} "
                   f"within {self._timeout:g} s")))

        def settled(result):
            if timer.active():
                timer.cancel()
            return result

        return opened.addBoth(settled)
