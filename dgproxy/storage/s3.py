"""S3 backend: blobs in a real object store, spoken to with Twisted's Agent
(the one treq builds on) over a persistent connection pool.

Requests are signed with botocore's SigV4 signer (signing only; no boto3
client in the server). Downloads stream from the upstream socket with
backpressure. Uploads need their metadata in the request headers: one of
known size whose metadata is known up front streams straight upstream;
otherwise (the metadata needs the body's hashes) a writer spools to a local
file and PUTs it at commit. Memory stays bounded either way, and nothing is
visible upstream until the blob is complete.
"""

from __future__ import annotations

import io
import os
import random
import re
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from typing import Callable, Mapping, Optional
from urllib.parse import quote, unquote_plus, urlsplit
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
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer
from zope.interface import implementer

from dgproxy.storage.credentials import BackendCredentials
from dgproxy.storage.interface import (
    AlreadyExists, BackendUnavailable, BucketInfo, BucketMissing, BucketNotEmptyError, ByteRange,
    IBackend, IObjectWriter, StoredObject, UpstreamError, open_span)
from dgproxy.storage.metadata import (
    DELTA_SUFFIX, REFERENCE_NAME, ObjectMetadata, from_s3_headers, to_s3_headers)
from dgproxy.storage.proxies import TunnelEndpoint, check_proxies, proxy_for
from dgproxy.storage.trust import Trust
from dgproxy.streams import BodyStream, BytesSource, PauseGate, SliceSource
from dgproxy.wire import feed_head_apart, parse_http_date

log = Logger(namespace="dgproxy.storage.s3")

UNSIGNED = "UNSIGNED-PAYLOAD"
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
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


LIST_HEAD_CONCURRENCY = 10
PARTS_IN_FLIGHT = 4  # parts of one upstream multipart upload sent or copied at once


def _http_date(value: Optional[str]) -> datetime:
    return parse_http_date(value) or datetime.now(timezone.utc)


def _iso(value: str) -> datetime:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(timezone.utc)
    except ValueError:
        return datetime.now(timezone.utc)


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


class _ResponseSource:
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


def _headers(response) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v[0].decode("latin-1")
            for k, v in response.headers.getAllRawHeaders()}


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+)")


def _served_whole(response, byte_range: ByteRange) -> Optional[int]:
    """The blob's size from a 206's C{Content-Range}, if the answer carries
    exactly the bytes C{byte_range} asks for; None otherwise."""
    values = response.headers.getRawHeaders(b"content-range") or [b""]
    m = _CONTENT_RANGE.fullmatch(values[0].decode("latin-1").strip())
    if not m:
        return None
    first, last, total = (int(g) for g in m.groups())
    if byte_range.resolve(total) != (first, last) or response.length != last - first + 1:
        return None
    return total


@implementer(IBodyProducer)
class _PushBody(PauseGate):
    """The body of a streaming upstream PUT, written to as the client's arrives."""

    def __init__(self, length: int):
        super().__init__()
        self.length = length
        self._consumer = None
        self._started = defer.Deferred()
        self._finished = defer.Deferred()

    def startProducing(self, consumer):
        self._consumer = consumer
        self._started.callback(None)
        return self._finished

    async def write(self, data: bytes) -> None:
        if not self._started.called:
            await self._started
        if self.stopped:
            raise BackendUnavailable("upload", "upstream stopped reading the body")
        self._consumer.write(data)
        if self.paused is not None:
            await self.paused

    def end(self) -> None:
        if not self._finished.called:
            self._finished.callback(None)


def _passed_on(d: defer.Deferred) -> defer.Deferred:
    """A new Deferred that fires with C{d}'s result (which it takes over).

    Awaiting C{d} itself goes wrong from code that runs inside one of C{d}'s
    own callbacks: it returns the value in hand at that point. A streaming
    upload on a new connection is such code: the Agent starts the body (and
    so resumes the writer, which may finish it) from the callback that has
    the connection, and awaiting the request's Deferred there returned the
    connection instead of the response."""
    out = defer.Deferred()
    d.addBoth(out.callback)
    return out


@implementer(IObjectWriter)
class _StreamingWriter:
    """Streams a blob straight into an upstream PUT whose headers were sent
    first (its size and metadata known up front, bar the hashes: readers take
    the MD5 from the upstream ETag). The latest chunk is held back until
    L{commit}: the body's checks (Content-MD5, signed SHA-256, checksums) end
    with its last byte, and until the service has every byte it stores
    nothing. Aborting cuts the connection, so no partial object is stored."""

    hashes_needed = False

    def __init__(self, backend: "S3Backend", bucket: str, key: str, body: _PushBody,
                 response: defer.Deferred):
        self._backend = backend
        self._bucket = bucket
        self._key = key
        self._body = body
        self._response = response
        self._done = False
        self._sent = 0
        self._held = b""
        self._answered = False
        self._gave_up = False

        def answered(result):
            self._answered = True
            return result

        response.addBoth(answered)

    def write(self, data: bytes) -> defer.Deferred:
        if self._gave_up:
            seconds = self._backend.client.read_timeout
            return defer.fail(BackendUnavailable(self._backend.name,
                                                 f"the upload stopped moving for {seconds} s"))
        if self._answered:
            return defer.fail(BackendUnavailable(self._backend.name,
                                                 "upstream answered before the body ended"))
        held, self._held = self._held, data
        self._sent += len(held)
        if not held:
            return defer.succeed(None)
        d = defer.ensureDeferred(self._body.write(held))
        if not d.called:  # the service is not taking bytes: it has the read timeout
            client = self._backend.client
            timer = client.reactor.callLater(client.read_timeout, self._give_up)

            def taken(result):
                if timer.active():
                    timer.cancel()
                return result

            d.addBoth(taken)
        return d

    async def commit(self, metadata: ObjectMetadata, exclusive: bool = False) -> str:
        """Fires with the upstream ETag (the service's MD5 of what it stored).
        The last chunk must be taken and the answer must come within the
        client's read timeout."""
        if exclusive:
            raise ValueError("a streaming upload cannot be exclusive")
        client = self._backend.client
        timer = client.reactor.callLater(client.read_timeout, self._give_up)
        try:
            if self._held:
                await self.write(b"")
            self._done = True
            if self._sent != self._body.length:
                self._response.cancel()
                raise BackendUnavailable(self._backend.name,
                                         "body length differs from the one sent")
            self._body.end()
            response = await _passed_on(self._response)
        except Exception:
            if not self._gave_up:
                raise
            raise BackendUnavailable(self._backend.name, f"no answer to an upload within "
                                     f"{client.read_timeout} s") from None
        finally:
            if timer.active():
                timer.cancel()
        if response.code not in (200, 201):
            raise await self._backend.client.error_of(response)
        await treq.content(response)
        etag = response.headers.getRawHeaders(b"etag", [b""])[0].decode("latin-1").strip('"')
        if metadata.md5 and len(etag) == 32 and etag != metadata.md5:
            await self._backend.discard(self._bucket, self._key)
            raise UpstreamError(500, "BadDigest", f"upstream stored {etag}, sent {metadata.md5}")
        return etag

    def _give_up(self) -> None:
        if self._gave_up:
            return
        self._gave_up = True
        log.error("S3 backend '{backend}' did not take or answer an upload within {seconds} s",
                  backend=self._backend.name, seconds=self._backend.client.read_timeout)
        self._body.stopProducing()
        self._response.cancel()

    def abort(self) -> None:
        if not self._done:
            self._done = True
            self._held = b""
            self._body.stopProducing()
            self._response.cancel()
            self._response.addErrback(lambda _: None)


@implementer(IObjectWriter)
class _SpoolingWriter:
    """Spools a blob locally; L{commit} PUTs it with its metadata."""

    hashes_needed = True

    def __init__(self, backend: "S3Backend", bucket: str, key: str, spool_file):
        self._backend = backend
        self._bucket = bucket
        self._key = key
        self._spool = spool_file
        from dgproxy.streams import FileSink
        self._sink = FileSink(spool_file.file)
        self._done = False

    def write(self, data: bytes):
        return self._sink.write(data)

    async def commit(self, metadata: ObjectMetadata, exclusive: bool = False) -> None:
        try:
            await self._sink.flush()
            await self._backend.put_file(self._bucket, self._key, self._spool.path, metadata,
                                         exclusive)
        finally:
            self._done = True
            self._spool.release()

    def abort(self) -> None:
        if not self._done:
            self._done = True
            self._sink.discard()
            self._spool.release()


@implementer(IBackend)
class S3Backend:
    """Blobs and their C{x-amz-meta-dg-*} metadata in an S3 service."""

    def __init__(self, client: S3Client, spool, name: Optional[str] = None,
                 native_sse: Optional[dict] = None, full_list_metadata: bool = False,
                 declared: tuple[str, ...] = ()):
        """C{native_sse}: {mode: sse-kms|sse-s3, kms_key_id, bucket_key_enabled} to have
        the service encrypt; C{full_list_metadata}: LIST sizes and ETags are not the
        logical ones (proxy-side encryption), so every listed key needs metadata;
        C{declared}: the buckets the config puts here (real names), listed in
        place of ListBuckets when the keys may not list all buckets."""
        self.client = client
        self.spool = spool
        self.name = name or client.name
        self.native_sse = native_sse
        self.full_list_metadata = full_list_metadata
        self.declared = tuple(declared)
        self._list_meta: dict[tuple, ObjectMetadata] = {}
        self._said_scoped = False

    async def _fail(self, response, bucket: Optional[str] = None):
        err = await self.client.error_of(response)
        if err.code == "NoSuchBucket":
            raise BucketMissing(bucket or "")
        raise err

    # -- buckets -----------------------------------------------------------
    async def list_buckets(self):
        response = await self.client.request("GET", None)
        if response.code != 200:
            err = await self.client.error_of(response)
            if not self.client.keys_accepted(err):
                raise err
            return await self._declared_buckets()
        root = parse_xml(await treq.content(response))
        out = []
        for b in root.iter("Bucket"):
            out.append(BucketInfo(b.findtext("Name"),
                                  _iso(b.findtext("CreationDate") or "")))
        return sorted(out, key=lambda b: b.name)

    async def _declared_buckets(self) -> list[BucketInfo]:
        """For keys scoped to their buckets: the declared ones that exist
        (HEAD needs only s3:ListBucket on each). HEAD tells no creation
        date, so they show the epoch."""
        if not self._said_scoped:
            self._said_scoped = True
            log.info("Backend '{backend}': ListBuckets is denied to its credentials; "
                     "listing the buckets the config declares on it instead: {names}",
                     backend=self.name, names=", ".join(self.declared) or "none")
        found = []
        for name in self.declared:
            try:
                if await self.bucket_exists(name):
                    found.append(BucketInfo(name, _EPOCH))
            except UpstreamError as e:
                if e.status != 403:  # 403: not one these keys may use
                    raise
        return sorted(found, key=lambda b: b.name)

    async def bucket_exists(self, bucket: str) -> bool:
        response = await self.client.request("HEAD", bucket)
        await treq.content(response)
        if response.code == 200:
            return True
        if response.code == 404:
            return False
        raise UpstreamError(response.code, f"HTTP{response.code}", "HEAD bucket failed")

    async def create_bucket(self, bucket: str) -> bool:
        response = await self.client.request("PUT", bucket, idempotent=False,
                                             body=location_constraint(self.client.endpoint,
                                                                      self.client.region))
        if response.code == 200:
            await treq.content(response)
            return True
        err = await self.client.error_of(response)
        if err.code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            return False
        raise err

    async def delete_bucket(self, bucket: str) -> None:
        objects, _ = await self.list(bucket, "", None, with_metadata=False)
        if any(not _internal(o.key) for o in objects):
            raise BucketNotEmptyError(bucket)
        for o in objects:  # internal leftovers (references)
            await self.delete(bucket, o.key)
        response = await self.client.request("DELETE", bucket)
        if response.code not in (200, 204):
            err = await self.client.error_of(response)
            if err.code == "NoSuchBucket":
                raise BucketMissing(bucket)
            if err.code == "BucketNotEmpty":
                raise BucketNotEmptyError(bucket)
            raise err
        await treq.content(response)

    # -- objects -------------------------------------------------------------
    def _stored(self, key: str, response, size: Optional[int] = None) -> StoredObject:
        """The blob a HEAD or GET answer describes; C{size} where the answer's
        length is not the blob's (a HEAD's, a range's)."""
        h = _headers(response)
        if size is None:
            size = response.length
        modified = _http_date(h.get("last-modified"))
        etag = h.get("etag", "").strip('"')
        meta = from_s3_headers(h, size, modified)
        if meta is not None and not meta.md5:
            meta = meta.with_changes(md5=_fallback_md5(meta, etag))
        return StoredObject(key, size, modified, meta, etag=etag)

    async def open_with_stat(self, bucket: str, key: str,
                             byte_range: Optional[ByteRange] = None):
        """(StoredObject, source) from one GET, or None: the metadata comes
        with the body, saving the HEAD a read would otherwise start with. A
        range is sent as it is, and the blob's size read from the answer's
        C{Content-Range}."""
        headers = {} if byte_range is None else {"Range": byte_range.header()}
        response = await self.client.request("GET", bucket, key, headers=headers)
        if response.code == 404:
            await treq.content(response)
            return None
        if response.code == 206 and byte_range is not None:
            total = _served_whole(response, byte_range)
            if total is not None:
                return (self._stored(key, response, size=total),
                        _ResponseSource(response, self.client))
        elif response.code == 200 and isinstance(response.length, int):
            stored = self._stored(key, response)
            source = _ResponseSource(response, self.client)
            if byte_range is None:
                return stored, source
            # A service that ignores Range sends the whole blob: cut the range out.
            span = byte_range.resolve(response.length)
            if span is None:
                source.close()
                return stored, None
            return stored, SliceSource(source, span[0], span[1] - span[0] + 1)
        elif response.code not in (200, 206, 416):
            await self._fail(response, bucket)
        # A chunked answer (no size), an unsatisfiable range (the 416 carries
        # no metadata) or a 206 of other bytes than asked: HEAD, then GET.
        _ResponseSource(response, self.client).close()
        stored = await self.stat(bucket, key)
        return None if stored is None else await open_span(self, bucket, key, stored, byte_range,
                                                           stored.size)

    async def stat(self, bucket: str, key: str) -> Optional[StoredObject]:
        response = await self.client.request("HEAD", bucket, key)
        await treq.content(response)
        if response.code == 404:
            return None
        if response.code != 200:
            raise UpstreamError(response.code, f"HTTP{response.code}", f"HEAD {key} failed")
        return self._stored(key, response,
                            size=int(response.headers.getRawHeaders(b"content-length", [b"0"])[0]))

    async def open_read(self, bucket: str, key: str, offset: int = 0,
                        length: Optional[int] = None, stored=None):
        headers = {}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            if length == 0:
                return BytesSource(b"")
            headers["Range"] = f"bytes={offset}-{end}"
        response = await self.client.request("GET", bucket, key, headers=headers)
        if response.code == 404:
            await treq.content(response)
            return None
        if response.code not in (200, 206):
            await self._fail(response, bucket)
        source = _ResponseSource(response, self.client)
        if response.code == 200 and headers:
            # A service that ignores Range sends the whole blob: cut the range out.
            if length is None:
                length = response.length - offset if isinstance(response.length, int) else 2 ** 63
            return SliceSource(source, offset, length)
        return source

    async def open_write(self, bucket: str, key: str, size: Optional[int] = None,
                         hint: Optional[ObjectMetadata] = None):
        """A writer. With the size and the metadata known up front (C{hint},
        hashes not needed), the body streams straight upstream; otherwise it
        is spooled and PUT at commit, once its hashes are known."""
        if (size is None or hint is None or self.native_sse is not None
                or hint.multipart_etag is not None):
            # (An assembled upload is joined upstream by L{assemble}; one
            # that comes here is sent from the spool, in parts.)
            return _SpoolingWriter(self, bucket, key, self.spool.create("upload"))
        headers = self._object_headers(hint, key)
        body = _PushBody(size)
        response = self.client.stream_put(bucket, key, headers, body)
        return _StreamingWriter(self, bucket, key, body, response)


    def _object_headers(self, meta: ObjectMetadata, key: str) -> dict:
        """The headers that create an object: its metadata, and native SSE."""
        headers = {"Content-Type": "application/octet-stream", **to_s3_headers(meta, key)}
        if self.native_sse is not None:
            if self.native_sse["mode"] == "sse-kms":
                headers["x-amz-server-side-encryption"] = "aws:kms"
                headers["x-amz-server-side-encryption-aws-kms-key-id"] = self.native_sse["kms_key_id"]
                if self.native_sse.get("bucket_key_enabled", True):
                    headers["x-amz-server-side-encryption-bucket-key-enabled"] = "true"
            else:
                headers["x-amz-server-side-encryption"] = "AES256"
            headers["x-amz-meta-dg-encrypted-native"] = self.native_sse["mode"]
        return headers

    def can_assemble(self, bucket: str) -> bool:
        return True

    async def assemble(self, bucket: str, key: str, sources: list[str],
                       meta: ObjectMetadata) -> None:
        """Make C{key} the concatenation of the stored blobs C{sources}, inside
        the service: an upstream multipart upload whose parts are copied from
        them (UploadPartCopy), so no byte passes through dgproxy. They must be
        at least 5 MiB each but the last, as a client's parts are. On failure
        the upload is aborted and C{key} is untouched."""
        async def copy_part(upload_id: str, number: int) -> str:
            response = await self.client.request(
                "PUT", bucket, key, query={"partNumber": str(number), "uploadId": upload_id},
                headers={"x-amz-copy-source": quote(f"{bucket}/{sources[number - 1]}", safe="/~")})
            if response.code != 200:
                raise await self._refusal(response, bucket, key)
            # Like Complete, a copy can fail after its 200 has begun. (The
            # answer's name varies: SeaweedFS does not say CopyPartResult.)
            answer = parse_xml(await treq.content(response))
            etag = answer.findtext("ETag")
            if not etag:
                raise _error_in(answer, "UploadPartCopy")
            return etag

        await self._as_upload(bucket, key, self._object_headers(meta, key), len(sources),
                              copy_part)

    async def put_file(self, bucket: str, key: str, path: str, meta: ObjectMetadata,
                       exclusive: bool) -> None:
        headers = self._object_headers(meta, key)
        if meta.multipart_etag is not None and not exclusive:
            return await self._put_file_in_parts(bucket, key, path, headers)
        if exclusive:
            headers["If-None-Match"] = "*"
        response = await self.client.request("PUT", bucket, key, headers=headers,
                                             body_path=path, idempotent=True)
        if response.code in (200, 201):
            await treq.content(response)
            return
        raise await self._refusal(response, bucket, key)

    async def _refusal(self, response, bucket: str, key: str) -> Exception:
        err = await self.client.error_of(response)
        if err.status == 412:
            return AlreadyExists(key)
        if err.code == "NoSuchBucket":
            return BucketMissing(bucket)
        return err

    async def _put_file_in_parts(self, bucket: str, key: str, path: str, headers: dict) -> None:
        """Store an object a client uploaded in parts as an upstream multipart
        upload: its upstream ETag then ends in C{-N}, which tells a listing to
        look up its metadata (the client's ETag is the multipart one, not the
        MD5 a single PUT gets), and it may be larger than a PUT's 5 GiB.
        Each part is retried on its own."""
        size = os.path.getsize(path)
        part = upstream_part_size(size)

        offsets = range(0, max(size, 1), part)

        async def send_part(upload_id: str, number: int) -> str:
            offset = offsets[number - 1]
            response = await self.client.request(
                "PUT", bucket, key, query={"partNumber": str(number), "uploadId": upload_id},
                body_path=path, body_range=(offset, min(part, size - offset)))
            if response.code != 200:
                raise await self._refusal(response, bucket, key)
            await treq.content(response)
            return response.headers.getRawHeaders(b"etag", [b""])[0].decode("latin-1")

        await self._as_upload(bucket, key, headers, len(offsets), send_part)

    async def _as_upload(self, bucket: str, key: str, headers: dict, count: int,
                         put_part) -> None:
        """Create an upstream multipart upload with C{headers}, put its parts
        with C{put_part(upload_id, number)} (it returns the part's ETag),
        L{PARTS_IN_FLIGHT} at a time, and complete it; on any failure abort
        it, so C{key} is untouched."""
        upload_id = await self._create_upload(bucket, key, headers)
        try:
            etags = await in_flight(count, lambda n: put_part(upload_id, n), PARTS_IN_FLIGHT)
            await self._complete_upload(bucket, key, upload_id, etags)
        except BaseException:
            self._abandon(bucket, key, upload_id)
            raise

    async def _create_upload(self, bucket: str, key: str, headers: dict) -> str:
        """CreateMultipartUpload with the object's headers; its upload id."""
        response = await self.client.request("POST", bucket, key, query={"uploads": None},
                                             headers=headers, idempotent=False)
        if response.code != 200:
            raise await self._refusal(response, bucket, key)
        upload_id = parse_xml(await treq.content(response)).findtext("UploadId")
        if not upload_id:
            raise UpstreamError(500, "InternalError", "CreateMultipartUpload gave no UploadId")
        return upload_id

    async def _complete_upload(self, bucket: str, key: str, upload_id: str,
                               etags: list[str]) -> None:
        listing = "".join(f"<Part><PartNumber>{n}</PartNumber>"
                          f"<ETag>\"{xml_escape(e.strip(chr(34)))}\"</ETag></Part>"
                          for n, e in enumerate(etags, 1))
        response = await self.client.request(
            "POST", bucket, key, query={"uploadId": upload_id}, idempotent=False,
            body=f"<CompleteMultipartUpload>{listing}</CompleteMultipartUpload>".encode())
        if response.code != 200:
            raise await self._refusal(response, bucket, key)
        # A Complete can fail after its 200 has begun: the error is the body.
        answer = parse_xml(await treq.content(response))
        if answer.tag != "CompleteMultipartUploadResult":
            raise _error_in(answer, "CompleteMultipartUpload")

    def _abandon(self, bucket: str, key: str, upload_id: str) -> None:
        """Abort an upstream multipart upload, in the background: its parts
        cost storage until then (a bucket lifecycle rule catches what a
        failed abort leaves)."""
        d = defer.ensureDeferred(self.client.request(
            "DELETE", bucket, key, query={"uploadId": upload_id}))
        d.addCallback(treq.content)
        d.addErrback(lambda f: log.warn(
            "S3 backend '{backend}': could not abort upload {upload} of {key}: {error}",
            backend=self.name, upload=upload_id, key=key, error=f.getErrorMessage()))

    async def discard(self, bucket: str, key: str) -> None:
        """One DELETE; S3 answers 204 whether or not the key existed."""
        response = await self.client.request("DELETE", bucket, key)
        await treq.content(response)
        if response.code not in (200, 204, 404):
            raise UpstreamError(response.code, f"HTTP{response.code}", f"DELETE {key} failed")

    async def delete(self, bucket: str, key: str) -> bool:
        existed = await self.stat(bucket, key) is not None
        if not existed:
            return False
        response = await self.client.request("DELETE", bucket, key)
        await treq.content(response)
        if response.code not in (200, 204, 404):
            raise UpstreamError(response.code, f"HTTP{response.code}", f"DELETE {key} failed")
        return True

    async def list(self, bucket: str, prefix: str, delimiter: Optional[str],
                   with_metadata: bool = True, start_after: Optional[str] = None,
                   more=None):
        """Stored objects under C{prefix} and the common prefixes: all pages,
        or (with C{more}) pages until it answers 0, each next one sized to about
        twice what it still wants: the page after a full one usually only
        has to show that a client's page is complete.

        Delta blobs need their original size and ETag: those come from one
        HEAD each, cached by the upstream ETag, so a repeated listing costs
        no HEADs (SPEC §3 ⚑)."""
        objects: list[StoredObject] = []
        prefixes: list[str] = []
        token = None
        page = 1000
        while True:
            # URL-encoded keys: XML 1.0 cannot carry control characters (Go's
            # encoder puts U+FFFD in their place) and its parsers turn CR into LF.
            query = {"list-type": "2", "prefix": prefix, "max-keys": str(page),
                     "encoding-type": "url"}
            if delimiter:
                query["delimiter"] = delimiter
            if token:
                query["continuation-token"] = token
            elif start_after and start_after > prefix:
                query["start-after"] = start_after
            response = await self.client.request("GET", bucket, query=query)
            if response.code != 200:
                await self._fail(response, bucket)
            root = parse_xml(await treq.content(response))
            # Decoded only if the service says it encoded (one that ignores
            # the parameter sends keys as they are).
            decoded = (unquote_plus if root.findtext("EncodingType") == "url"
                       else str)
            for c in root.iter("Contents"):
                key = decoded(c.findtext("Key") or "")
                etag = (c.findtext("ETag") or "").strip('"')
                objects.append(StoredObject(key, int(c.findtext("Size") or 0),
                                            _iso(c.findtext("LastModified") or ""),
                                            None, etag=etag))
            for p in root.iter("CommonPrefixes"):
                value = decoded(p.findtext("Prefix") or "")
                if value.rstrip("/").rpartition("/")[2] != ".dg":
                    prefixes.append(value)
            if (root.findtext("IsTruncated") or "false") != "true":
                break
            token = root.findtext("NextContinuationToken")
            if not token:
                break
            if more is not None:
                wanted = more(objects, prefixes)
                if wanted <= 0:
                    break
                page = min(1000, max(32, 2 * wanted))
        if with_metadata:
            objects = await self._with_list_metadata(bucket, objects)
        return objects, prefixes

    async def _with_list_metadata(self, bucket: str, objects: list[StoredObject]):
        """Fill metadata where LIST alone cannot give the original size/ETag."""
        need = [i for i, o in enumerate(objects)
                if self.full_list_metadata or o.key.endswith(DELTA_SUFFIX)
                or "-" in (o.etag or "")]
        sem = defer.DeferredSemaphore(LIST_HEAD_CONCURRENCY)

        async def fill(i: int) -> None:
            o = objects[i]
            cache_key = (bucket, o.key, o.etag)
            meta = self._list_meta.get(cache_key)
            if meta is None:
                stored = await self.stat(bucket, o.key)
                if stored is None or stored.metadata is None:
                    return
                meta = stored.metadata
                if len(self._list_meta) > 100_000:
                    self._list_meta.clear()
                self._list_meta[cache_key] = meta
            objects[i] = StoredObject(o.key, o.size, o.modified, meta, etag=o.etag)

        await defer.gatherResults(
            [sem.run(lambda i=i: defer.ensureDeferred(fill(i))) for i in need],
            consumeErrors=True)
        return objects


def _error_in(answer: ET.Element, what: str) -> UpstreamError:
    """The error an S3 service sends as the body of a 200 when an operation
    fails after its answer began (Complete, UploadPartCopy)."""
    return UpstreamError(500, answer.findtext("Code") or "InternalError",
                         answer.findtext("Message") or f"{what} failed")


async def in_flight(count: int, run, width: int) -> list:
    """C{run(n)} for n in 1..C{count}, at most C{width} at once; their results
    in order. The first failure stops new runs and is raised once the running
    ones have ended (so nothing is still writing when the caller cleans up)."""
    results: list = [None] * count
    numbers = iter(range(1, count + 1))
    failures: list = []

    async def worker() -> None:
        for n in numbers:
            if failures:
                return
            try:
                results[n - 1] = await run(n)
            except BaseException as e:
                failures.append(e)
                return

    await defer.DeferredList([defer.ensureDeferred(worker()) for _ in range(min(width, count))])
    if failures:
        raise failures[0]
    return results


def upstream_part_size(size: int) -> int:
    """Part size for storing C{size} bytes as an upstream multipart upload:
    16 MiB, or more where 10,000 parts (S3's most) would not hold it."""
    mib = 1024 * 1024
    smallest = -(-size // 10_000)
    return max(16 * mib, -(-smallest // mib) * mib)


def _internal(key: str) -> bool:
    return key.rpartition("/")[2] == REFERENCE_NAME or key.startswith(".dg/")


def _fallback_md5(meta: ObjectMetadata, upstream_etag: str) -> str:
    """An ETag source for objects written without C{dg-md5} (the Python tool):
    the upstream ETag of a single-PUT original, else part of the SHA-256."""
    if meta.note != "delta" and len(upstream_etag) == 32 and "-" not in upstream_etag:
        return upstream_etag
    return meta.file_sha256[:32]


def probe_blocking(client: S3Client, timeout: float = 10.0) -> bool:
    """Start-up check, before the reactor runs: the service answers ListBuckets
    and accepts the credentials. False when it refused the listing itself but
    took the keys (L{denied_but_valid}).

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
