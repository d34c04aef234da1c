"""The signed HTTP client for one S3 service, which L{dgproxy.storage.s3}
builds its backend on.

Twisted's Agent (the one treq builds on) over a persistent connection pool;
requests signed with botocore's SigV4 signer (signing only, no boto3 client
in the server); connect and read timeouts, and retries with backoff for
idempotent calls; an outbound proxy and a CA bundle from the environment;
upstream errors read from their S3 XML; response bodies streamed with
backpressure; and the blocking probe that checks a service at start-up.
"""

from __future__ import annotations

import io
import os
import random
import re
import xml.etree.ElementTree as ET
from typing import Callable, Mapping, Optional
from urllib.parse import quote, urlsplit
from xml.sax.saxutils import escape as xml_escape

import treq
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from twisted.internet import defer, error as net_error, task
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web.client import (
    Agent, FileBodyProducer, HTTPConnectionPool, ProxyAgent,
    RequestTransmissionFailed, ResponseDone, ResponseNeverReceived, _HTTP11ClientFactory)
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from dgproxy.storage.credentials import BackendCredentials
from dgproxy.storage.interface import BackendUnavailable, UpstreamError
from dgproxy.storage.proxies import TunnelEndpoint, check_proxies, proxy_for
from dgproxy.storage.trust import Trust
from dgproxy.streams import BodyStream
from dgproxy.wire import feed_head_apart

# The S3 backend's namespace (for DGP_LOG_LEVEL): its client logs under it too.
log = Logger(namespace="dgproxy.storage.s3")

UNSIGNED = "UNSIGNED-PAYLOAD"

# Bodies are streamed, so their hash is not known when the request is
# signed: say so. Without this botocore signs the hash of the (empty)
# AWSRequest body, which AWS, MinIO and Ceph refuse for any upload
# (XAmzContentSHA256Mismatch); SeaweedFS does not check.
_UNSIGNED_BODIES = Config(s3={"payload_signing_enabled": False})
_DEFAULT_PORTS = {"http": ":80", "https": ":443"}


def default_endpoint(region: str) -> str:
    """AWS's S3 endpoint for C{region}: requests must be signed for the
    region of the endpoint they go to, so the global one only serves us-east-1."""
    return f"https://s3.{region}.amazonaws.com" + (".cn" if region.startswith("cn-") else "")


def location_constraint(endpoint: str, region: str) -> Optional[bytes]:
    """The CreateBucket body AWS needs outside us-east-1 (the region the
    bucket is made in); None for us-east-1 and for other services, which
    take their own region or ignore it (Ceph refuses one it does not know)."""
    host = (urlsplit(endpoint).hostname or "").lower()
    if region == "us-east-1" or not host.endswith((".amazonaws.com", ".amazonaws.com.cn")):
        return None
    return (f'<CreateBucketConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            f"<LocationConstraint>{xml_escape(region)}</LocationConstraint>"
            f"</CreateBucketConfiguration>").encode()


def host_header(url: str) -> str:
    """The Host a request to C{url} carries (the port only when not the
    scheme's default), as Twisted's Agent and botocore's signer both derive it."""
    scheme, _, rest = url.partition("://")
    netloc = rest.split("/", 1)[0].split("?", 1)[0]
    default = _DEFAULT_PORTS.get(scheme)
    return netloc[:-len(default)] if default and netloc.endswith(default) else netloc


class UpstreamBodyFailed(Exception):
    """An upstream response body ended early: whoever is sending it on must
    cut its own connection (its headers promised a length)."""


class _StreamProtocol(Protocol):
    """Feeds an upstream response body into a L{BodyStream}. A body that goes
    silent for C{idle_timeout} seconds, while dgproxy is not itself holding
    it back for a slow reader, is cut off: it fails the stream."""

    def __init__(self, client: "S3Client"):
        self.stream: Optional[BodyStream] = None
        self._client = client
        self._timer = None
        self.timed_out = False

    def connectionMade(self):
        self.stream = BodyStream(self._pause, self._resume)
        self._arm()

    def _arm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._client.read_timeout)
        else:
            self._timer = self._client.reactor.callLater(self._client.read_timeout, self._silent)

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _pause(self) -> None:
        self._disarm()
        self.transport.pauseProducing()

    def _resume(self) -> None:
        self.transport.resumeProducing()
        if not self.stream.finished:
            self._arm()

    def _silent(self) -> None:
        self._timer = None
        self.timed_out = True
        log.error("S3 backend '{backend}' sent no byte of a response body for {seconds} s; "
                  "giving up on it", backend=self._client.name, seconds=self._client.read_timeout)
        self.transport.stopProducing()

    def dataReceived(self, data: bytes):
        if self._timer is not None:
            self._arm()
        self.stream.feed(data)

    def connectionLost(self, reason):
        self._disarm()
        if reason.check(ResponseDone, PotentialDataLoss):
            self.stream.finish()
        else:
            why = "went silent" if self.timed_out else f"failed: {reason.value}"
            self.stream.fail(UpstreamBodyFailed(f"upstream body {why}"))


class ResponseSource:
    """An L{IByteSource} over an upstream response body."""

    def __init__(self, response, client: "S3Client"):
        self._proto = _StreamProtocol(client)
        self._response = response
        response.deliverBody(self._proto)

    def read(self, size: int = 256 * 1024):
        return self._proto.stream.read(size)

    def relay_stream(self):
        """(bytes already taken, the L{BodyStream}) for L{pump_to_request}."""
        return b"", self._proto.stream

    def close(self) -> None:
        stream = self._proto.stream
        if stream is not None and not stream.finished:
            stream.close()
            transport = getattr(self._proto, "transport", None)
            if transport is not None:
                try:
                    transport.stopProducing()
                except Exception:
                    pass


class _ClientProtocol(HTTP11ClientProtocol):
    """Feeds a response's head and the body after it to the parser apart."""

    def dataReceived(self, data: bytes) -> None:
        parser = self._parser
        if parser is not None and parser.line_mode:
            feed_head_apart(data, super().dataReceived)
        else:
            super().dataReceived(data)


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """One endpoint per scheme, host and port, made once: the Agent's own
    factory builds a new one for every request. An https:// host that
    C{HTTPS_PROXY} applies to is reached through a tunnel of that proxy."""

    def __init__(self, reactor, connect_timeout: float, trust: Trust,
                 environment: Optional[Mapping[str, str]] = None):
        self._reactor = reactor
        self._timeout = connect_timeout
        self._environment = environment
        self._tls = trust.policy
        self._made: dict[tuple, object] = {}

    def endpointForURI(self, uri):
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._made.get(key)
        if endpoint is None:
            host = uri.host.decode("ascii")
            if uri.scheme not in (b"http", b"https"):
                raise SchemeNotSupported(f"Unsupported scheme: {uri.scheme!r}")
            endpoint = HostnameEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
            if uri.scheme == b"https":
                proxy = proxy_for("https", host, self._environment)
                if proxy is not None:
                    endpoint = TunnelEndpoint(
                        self._reactor, HostnameEndpoint(self._reactor, proxy.host, proxy.port,
                                                        timeout=self._timeout),
                        proxy, host, uri.port, self._timeout)
                endpoint = wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), endpoint)
            if len(self._made) > 1000:  # virtual-hosted style: one host per bucket
                self._made.clear()
            self._made[key] = endpoint
        return endpoint


class _QuietFactory(_HTTP11ClientFactory):
    noisy = False  # no "Starting factory" line per upstream connection

    def buildProtocol(self, addr):
        return _ClientProtocol(self._quiescentCallback)


_XML_ENCODING = re.compile(rb"""\A(?:\xef\xbb\xbf)?\s*<\?xml[^>]*?encoding\s*=\s*["']([^"']*)["']""")


# The root element's default namespace declaration, when it is the first attribute.
_ROOT_XMLNS = re.compile(
    rb"""\A((?:\xef\xbb\xbf)?\s*(?:<\?xml[^>]*\?>\s*)?<[^\s>/!?]+)\s+xmlns\s*=\s*(?:"[^"]*"|'[^']*')""")


def parse_xml(body: bytes) -> ET.Element:
    """An S3 service's XML answer, parsed by the C ElementTree parser, with
    bare element names whatever namespace the service declares: AWS's, none
    (some S3-compatible services), or another (Google Cloud Storage's XML API
    uses C{http://doc.s3.amazonaws.com/2006-03-01}). The root's default
    declaration is taken off before parsing (expat then builds no
    C{{namespace}}name strings: a SeaweedFS listing page parses about 7 %
    faster); any other declaration is taken off the names afterwards.

    What defusedxml guards against needs a DTD (entity expansion, external
    entities), and no S3 answer has one: a body with a DTD is refused, and so
    is one whose encoding could hide it from that check (a NUL byte, as
    UTF-16 and UTF-32 have; a declared encoding other than UTF-8 or ASCII).
    Expat (2.4.1 and later) limits entity expansion itself as well."""
    declared = _XML_ENCODING.match(body)
    if (b"<!DOCTYPE" in body or b"\x00" in body
            or (declared and declared.group(1).lower() not in (b"utf-8", b"us-ascii"))):
        raise ET.ParseError("refused: a DTD, a NUL byte or an unexpected encoding")
    body = _ROOT_XMLNS.sub(rb"\1", body, count=1)
    root = ET.fromstring(body)
    if b"xmlns" in body:  # declarations left (prefixes, inner defaults): names lose them
        for el in root.iter():
            if el.tag[:1] == "{":
                el.tag = el.tag.rpartition("}")[2]
    return root


def _jittered(delay: float) -> float:
    """A retry's wait, spread ±50 % so that requests failed together do not
    all come back together."""
    return delay * (0.5 + random.random())


class UpstreamReport:
    """What an S3 client tells of its requests, for metrics: nothing, here."""

    def answered(self, method: str, status: int, seconds: float) -> None:
        """An answer's head arrived C{seconds} after the request went."""

    def failed(self, method: str, why: str, seconds: float) -> None:
        """No answer: C{why} is "unreachable" or "timeout"."""

    def retried(self, reason: str) -> None:
        """An idempotent request is sent again ("unreachable", "status_503", ...)."""


class S3Client:
    """Signed requests to one S3 endpoint, with retries for idempotent calls."""

    def __init__(self, reactor, name: str, endpoint: str, region: str,
                 credentials: BackendCredentials, path_style: bool = True,
                 connect_timeout: float = 10.0, read_timeout: float = 10.0, retries: int = 3,
                 environment: Optional[Mapping[str, str]] = None):
        """C{environment}: where the proxy and CA bundle variables are read
        (the process's own by default)."""
        self.reactor = reactor
        self.name = name
        self.endpoint = endpoint.rstrip("/")
        self.region = region
        self.path_style = path_style
        self.credentials = credentials
        self._signer: Optional[S3SigV4Auth] = None
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool._factory = _QuietFactory
        self.pool.maxPersistentPerHost = 32
        self.pool.retryAutomatically = False
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.retries = retries
        # The Agent itself, not treq.request: treq wraps every request in
        # cookie, redirect and gzip-decoding agents; the last would unzip an
        # object stored with Content-Encoding: gzip and corrupt the bytes.
        self.trust = Trust(os.environ if environment is None else environment)
        self.agent = Agent.usingEndpointFactory(
            reactor, _Endpoints(reactor, connect_timeout, self.trust, environment), pool=self.pool)
        self._environment = environment
        check_proxies(environment)
        self.proxy = proxy_for(urlsplit(self.endpoint).scheme, urlsplit(self.endpoint).hostname
                               or "", environment)
        self._http_proxies: dict[str, ProxyAgent] = {}  # by proxy URL
        self._http_routes: dict[str, tuple] = {}  # http:// host -> (Agent, proxy credentials)
        self.report = UpstreamReport()  # service.py puts the metrics' in

    def keys_accepted(self, error: UpstreamError) -> bool:
        """A refusal that proves the service took our signature: keys scoped
        to some buckets (an AWS role without s3:ListAllMyBuckets) are refused
        ListBuckets with AccessDenied, while bad keys get InvalidAccessKeyId,
        SignatureDoesNotMatch or ExpiredToken (and unsigned requests
        AccessDenied too, which proves nothing)."""
        return (error.status == 403 and error.code == "AccessDenied"
                and self.credentials.current is not None)

    def url(self, bucket: Optional[str], key: Optional[str] = None,
            query: Optional[dict] = None) -> str:
        path = ""
        base = self.endpoint
        if bucket:
            scheme, _, host = base.partition("://")
            # A dotted name as a host would not match the service's wildcard
            # certificate: such buckets go in the path, as the AWS SDKs send them.
            if self.path_style or ("." in bucket and scheme == "https"):
                path = "/" + bucket
            else:
                base = f"{scheme}://{bucket}.{host}"
        if key is not None:
            path += "/" + quote(key, safe="/~")
        url = base + (path or "/")
        if query:
            url += "?" + "&".join(
                quote(k, safe="~") + ("=" + quote(v, safe="~") if v is not None else "")
                for k, v in sorted(query.items()))
        return url

    def _signed_headers(self, method: str, url: str, headers: dict) -> dict:
        """C{headers} with Host and, given credentials, the SigV4 signature
        over them (the body unsigned). Host is set here, not left to the
        Agent, so that what is signed is what is sent."""
        req = AWSRequest(method=method, url=url, headers=dict(headers))
        req.headers["Host"] = host_header(url)
        req.headers["x-amz-content-sha256"] = UNSIGNED
        keys = self.credentials.current
        if keys is not None:
            if self._signer is None or self._signer.credentials is not keys:
                self._signer = S3SigV4Auth(keys, "s3", self.region)  # renewed keys
            req.context["client_config"] = _UNSIGNED_BODIES
            self._signer.add_auth(req)
        return {k: [v] for k, v in req.headers.items()}

    def _agent_for(self, url: str, headers: dict):
        """The pooled Agent, or for an http:// host that C{HTTP_PROXY} applies
        to, an Agent that sends the request to that proxy in absolute form
        (adding the proxy's credentials to C{headers})."""
        if not url.startswith("http://"):
            return self.agent
        host = urlsplit(url).hostname or ""
        if host not in self._http_routes:
            if len(self._http_routes) > 1000:  # virtual-hosted style: one host per bucket
                self._http_routes.clear()
            self._http_routes[host] = self._http_route(host)
        agent, authorization = self._http_routes[host]
        if authorization is not None:
            headers["Proxy-Authorization"] = [authorization]
        return agent

    def _http_route(self, host: str) -> tuple:
        """(Agent, proxy credentials) for an http:// host, decided once."""
        proxy = proxy_for("http", host, self._environment)
        if proxy is None:
            return self.agent, None
        if proxy.url not in self._http_proxies:
            to_proxy = HostnameEndpoint(self.reactor, proxy.host, proxy.port,
                                        timeout=self.connect_timeout)
            # A connection per request: proxies such as tinyproxy close theirs
            # after each answer without saying so, and a streaming PUT sent on
            # such a connection could not be replayed.
            pool = HTTPConnectionPool(self.reactor, persistent=False)
            pool._factory = _QuietFactory
            self._http_proxies[proxy.url] = ProxyAgent(to_proxy, self.reactor, pool=pool)
        auth = proxy.authorization.decode("ascii") if proxy.authorization is not None else None
        return self._http_proxies[proxy.url], auth

    def _send(self, method: str, url: str, headers: dict, body=None,
              timeout: Optional[float] = None,
              progress: Optional[Callable[[], int]] = None) -> defer.Deferred:
        """One signed request on the pooled Agent; fires with the response
        once its headers arrived. It is cancelled after C{timeout} seconds,
        or, with C{progress} (how much of the body has gone), once that has
        not moved for C{timeout} seconds: an upload may take long, but it
        may not stall."""
        signed = self._signed_headers(method, url, headers)
        d = self._agent_for(url, signed).request(method.encode("ascii"), url.encode("ascii"),
                                                 Headers(signed), body)
        started, timed_out = self.reactor.seconds(), []

        def reported(result):
            seconds = self.reactor.seconds() - started
            if not isinstance(result, Failure):
                self.report.answered(method, result.code, seconds)
            elif timed_out:
                self.report.failed(method, "timeout", seconds)
            elif not result.check(defer.CancelledError):  # cancelled: the client went away
                self.report.failed(method, "unreachable", seconds)
            return result

        d.addBoth(reported)

        def give_up():
            timed_out.append(True)
            d.cancel()

        if timeout is None:
            return d
        if progress is None:
            timer = self.reactor.callLater(timeout, give_up)

            def stop():
                if timer.active():
                    timer.cancel()
        else:
            seen = [progress(), self.reactor.seconds()]

            def check():
                now, moved = self.reactor.seconds(), progress()
                if moved != seen[0]:
                    seen[0], seen[1] = moved, now
                elif now - seen[1] >= timeout:
                    give_up()

            watchdog = task.LoopingCall(check)
            watchdog.clock = self.reactor
            watchdog.start(timeout / 4, now=False)

            def stop():
                if watchdog.running:
                    watchdog.stop()

        def settled(result):
            stop()
            return result

        return d.addBoth(settled)

    async def request(self, method: str, bucket: Optional[str], key: Optional[str] = None,
                      query: Optional[dict] = None, headers: Optional[dict] = None,
                      body_path: Optional[str] = None, idempotent: bool = True,
                      body_range: Optional[tuple[int, int]] = None,
                      body: Optional[bytes] = None):
        """Send one request; returns the (unbuffered) response. The body is
        C{body}, or the file at C{body_path} (only the (offset, length)
        C{body_range} of it, if given).

        Connection failures and 5xx answers are retried with backoff for
        idempotent calls; a backend that stays unreachable raises
        L{BackendUnavailable}."""
        url = self.url(bucket, key, query)
        attempts = self.retries if idempotent else 1
        delay = 0.2
        for attempt in range(1, attempts + 1):
            data = progress = None
            hdrs = dict(headers or {})
            if body_path is not None:
                f = open(body_path, "rb")
                if body_range is not None:
                    f = _FileSlice(f, *body_range)
                    size = body_range[1]
                else:
                    size = os.fstat(f.fileno()).st_size
                # Content-Length comes from the producer: a copy in the
                # headers would be sent twice, and signed as one.
                data = FileBodyProducer(f, readSize=256 * 1024)
                progress = _sent_of(f, size)
            elif body is not None:
                data = FileBodyProducer(io.BytesIO(body))
            try:
                response = await self._send(method, url, hdrs, data, timeout=self.read_timeout,
                                            progress=progress)
            except (net_error.ConnectError, net_error.ConnectionLost, net_error.TimeoutError,
                    defer.CancelledError, net_error.DNSLookupError,
                    ResponseNeverReceived, RequestTransmissionFailed) as e:
                if attempt == attempts:
                    log.error("S3 backend '{backend}' at {endpoint} unreachable: {error}",
                              backend=self.name, endpoint=self.endpoint, error=_reason(e))
                    raise BackendUnavailable(self.name, _reason(e)) from None
                self.report.retried("unreachable")
                await task.deferLater(self.reactor, _jittered(delay), lambda: None)
                delay *= 2
                continue
            finally:
                if body_path is not None:
                    f.close()
            if response.code >= 500 and attempt < attempts:
                self.report.retried(f"status_{response.code}")
                await treq.content(response)
                await task.deferLater(self.reactor, _jittered(delay), lambda: None)
                delay *= 2
                continue
            return response
        raise AssertionError("unreachable")

    def stream_put(self, bucket: str, key: str, headers: dict, body) -> defer.Deferred:
        """Start a PUT whose body the caller writes as it goes (not retried:
        the body cannot be replayed). Fires with the response."""
        d = self._send("PUT", self.url(bucket, key), headers, body)

        def unavailable(failure):
            if failure.check(defer.CancelledError) or "CancelledError" in repr(failure.value):
                return failure  # we aborted it (the client went away)
            log.error("S3 backend '{backend}' failed a streaming PUT: {error}",
                      backend=self.name, error=_reason(failure.value))
            raise BackendUnavailable(self.name, _reason(failure.value))

        return d.addErrback(unavailable)

    async def error_of(self, response) -> UpstreamError:
        body = await treq.content(response) if response.code != 304 else b""
        region = response.headers.getRawHeaders(b"x-amz-bucket-region", [b""])[0]
        return self.error_from(response.code, body, region.decode("latin-1"))

    def error_from(self, status: int, body: bytes, bucket_region: str = "") -> UpstreamError:
        """The error an answer's status and S3 XML body describe. A bucket in
        another region than the one this backend signs for (AWS answers 301,
        or 400 AuthorizationHeaderMalformed) is named in the message: that
        only reaches the log, as clients are told 500 InternalError for both."""
        code, message, region = f"HTTP{status}", "", bucket_region
        try:
            root = parse_xml(body)
            code = root.findtext("Code") or code
            message = root.findtext("Message") or ""
            region = root.findtext("Region") or region
        except Exception:
            pass
        if region and region != self.region and (
                status in (301, 307) or code == "AuthorizationHeaderMalformed"):
            message += (f" [the bucket is in region {region}; backend '{self.name}' signs for "
                        f"{self.region} at {self.endpoint}: set the backend's region and endpoint]")
        return UpstreamError(status, code, message)


class _FileSlice:
    """C{length} bytes of an open file from C{offset} on, as a file of its
    own to L{FileBodyProducer} (which learns the length by seeking to the end)."""

    def __init__(self, f, offset: int, length: int):
        self._f, self._start, self._end = f, offset, offset + length
        f.seek(offset)

    def read(self, n: int = -1) -> bytes:
        left = self._end - self._f.tell()
        return self._f.read(left if n is None or n < 0 else min(n, left)) if left > 0 else b""

    def tell(self) -> int:
        return self._f.tell() - self._start

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: self._start, os.SEEK_CUR: self._f.tell(), os.SEEK_END: self._end}
        self._f.seek(min(max(base[whence] + offset, self._start), self._end))
        return self.tell()

    def close(self) -> None:
        self._f.close()

    @property
    def closed(self) -> bool:
        return self._f.closed


def _sent_of(f, size: int) -> Callable[[], int]:
    """How much of a file a L{FileBodyProducer} has sent (it closes the file
    once it has read all of it)."""
    return lambda: size if f.closed else f.tell()


def _reason(error: BaseException) -> str:
    """What went wrong, for a log line (Twisted's wrapped failures say little)."""
    inner = getattr(error, "reasons", None)
    if inner:
        error = inner[0].value
    return str(error) or type(error).__name__


def probe_blocking(client: S3Client, timeout: float = 10.0) -> bool:
    """Start-up check, before the reactor runs: the service answers ListBuckets
    and accepts the credentials. False when it refused the listing itself but
    took the keys (L{S3Client.keys_accepted}).

    Raises L{BackendUnavailable} or L{UpstreamError} with what went wrong."""
    import urllib.error
    import urllib.request
    url = client.url(None)
    headers = {k: v[0] for k, v in client._signed_headers("GET", url, {}).items()}
    request = urllib.request.Request(url, headers=headers, method="GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout,
                                    context=client.trust.ssl_context()) as response:
            response.read()
            return True
    except urllib.error.HTTPError as e:
        body = e.read()
        if e.code == 407 or (e.code == 401 and client.proxy is not None):
            # S3 refuses with 403; 401 is a proxy that misuses it (tinyproxy)
            raise BackendUnavailable(client.name, f"{client.endpoint}: the proxy "
                                     f"{client.proxy!r} refused: {e.code} {e.reason}") from None
        code = f"HTTP{e.code}"
        try:
            code = parse_xml(body).findtext("Code") or code
        except Exception:
            pass
        error = UpstreamError(e.code, code, "ListBuckets refused (are the credentials right?)")
        if client.keys_accepted(error):
            return False
        raise error from None
    except OSError as e:
        raise BackendUnavailable(client.name, f"{client.endpoint}: {getattr(e, 'reason', e)}") from None
