"""Unit: which proxy an upstream request takes (HTTP(S)_PROXY, NO_PROXY), and
the CONNECT tunnel against whatever a proxy may answer."""

from __future__ import annotations

import base64

from hypothesis import given, strategies as st
from twisted.internet import defer, error as net_error, task
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from dgproxy.storage.proxies import (
    Proxy, ProxyRefused, TunnelEndpoint, _Tunnel, check_proxies, proxy_for)


class ChoiceTests(unittest.TestCase):
    ENV = {"HTTPS_PROXY": "http://proxy.corp:3128", "http_proxy": "http://web.corp:8080",
           "NO_PROXY": "localhost,127.0.0.1,.internal,minio.lan:9000"}

    def test_each_scheme_takes_its_own_variable(self):
        self.assertEqual(repr(proxy_for("https", "s3.eu-central-1.amazonaws.com", self.ENV)),
                         "http://proxy.corp:3128")
        self.assertEqual(repr(proxy_for("http", "s3.example.com", self.ENV)),
                         "http://web.corp:8080")
        self.assertIsNone(proxy_for("https", "s3.example.com", {"HTTP_PROXY": "http://p:1"}))
        self.assertIsNone(proxy_for("https", "s3.example.com", {}))

    def test_no_proxy_names_hosts_and_domains(self):
        for host in ("localhost", "127.0.0.1", "ceph.internal", "a.b.internal"):
            self.assertIsNone(proxy_for("https", host, self.ENV), host)
        self.assertIsNotNone(proxy_for("https", "internal.example.com", self.ENV))
        self.assertIsNone(proxy_for("https", "anything", {**self.ENV, "NO_PROXY": "*"}))

    def test_credentials_are_sent_not_shown(self):
        p = Proxy("http://svc%40corp:p%3Ass@proxy.corp:3128")
        self.assertEqual(p.authorization,
                         b"Basic " + base64.b64encode(b"svc@corp:p:ss"))
        self.assertEqual(repr(p), "http://proxy.corp:3128")
        self.assertEqual((Proxy("proxy.corp").host, Proxy("proxy.corp").port), ("proxy.corp", 80))
        self.assertIsNone(Proxy("http://proxy.corp:3128").authorization)

    def test_proxies_dgproxy_cannot_use_are_refused_up_front(self):
        for url in ("socks5://127.0.0.1:1080", "https://proxy.corp:443", "http://"):
            self.assertRaises(ValueError, check_proxies, {"HTTPS_PROXY": url})
        check_proxies({"HTTPS_PROXY": "http://proxy.corp:3128", "NO_PROXY": "*"})


class _Inner(Protocol):
    def __init__(self):
        self.received = b""
        self.lost = None

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.lost = reason


def _tunnel(authorization=None):
    inner = _Inner()
    opened = defer.Deferred()
    tunnel = _Tunnel(Factory.forProtocol(lambda: inner), b"bucket.s3.amazonaws.com:443",
                     authorization, opened)
    transport = StringTransport()
    tunnel.makeConnection(transport)
    return tunnel, transport, opened, inner


class TunnelTests(unittest.TestCase):
    def test_asks_for_the_host_and_hands_over_the_connection(self):
        tunnel, transport, opened, inner = _tunnel(b"Basic abc")
        self.assertEqual(transport.value(),
                         b"CONNECT bucket.s3.amazonaws.com:443 HTTP/1.1\r\n"
                         b"Host: bucket.s3.amazonaws.com:443\r\nProxy-Authorization: Basic abc\r\n\r\n")
        tunnel.dataReceived(b"HTTP/1.1 200 Connection established\r\nVia: x\r\n\r\n\x16\x03")
        self.assertIs(self.successResultOf(opened), inner)
        self.assertIs(inner.transport, transport)
        tunnel.dataReceived(b"more")
        self.assertEqual(inner.received, b"\x16\x03more")
        tunnel.connectionLost(net_error.ConnectionDone())
        self.assertIsNotNone(inner.lost)

    def test_a_refusal_names_the_status_and_closes(self):
        tunnel, transport, opened, inner = _tunnel()
        tunnel.dataReceived(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
        failure = self.failureResultOf(opened, ProxyRefused)
        self.assertIn("407 Proxy Authentication Required", str(failure.value))
        self.assertTrue(transport.disconnecting or transport.disconnected)
        tunnel.connectionLost(net_error.ConnectionDone())  # no second errback
        self.assertIsNone(inner.transport)

    def test_a_tunnel_opened_after_the_attempt_was_given_up_is_dropped(self):
        tunnel, transport, opened, inner = _tunnel()
        opened.errback(net_error.TimeoutError())
        self.failureResultOf(opened)
        tunnel.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
        self.assertIsNone(inner.transport)
        self.assertTrue(transport.disconnecting or transport.disconnected)

    def test_a_proxy_that_hangs_up_fails_the_attempt(self):
        tunnel, transport, opened, inner = _tunnel()
        tunnel.dataReceived(b"HTTP/1.1 200 OK\r\n")
        tunnel.connectionLost(net_error.ConnectionDone())
        self.failureResultOf(opened, net_error.ConnectionLost)

    def test_an_endless_answer_head_is_refused(self):
        tunnel, transport, opened, inner = _tunnel()
        tunnel.dataReceived(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 4000)
        self.failureResultOf(opened, ProxyRefused)

    @given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=6))
    def test_any_answer_in_any_pieces_settles_once(self, answer, cuts):
        tunnel, transport, opened, inner = _tunnel()
        results = []
        opened.addBoth(results.append)
        points = sorted({c for c in cuts if c <= len(answer)} | {0, len(answer)})
        for a, b in zip(points, points[1:]):
            tunnel.dataReceived(answer[a:b])
        tunnel.connectionLost(net_error.ConnectionDone())
        self.assertEqual(len(results), 1)
        head = answer.split(b"\r\n\r\n", 1)
        ok = (len(head) == 2 and len(head[0]) <= 16 * 1024
              and head[0].split(b"\r\n")[0].split(None, 2)[:2] in
              ([b"HTTP/1.0", b"200"], [b"HTTP/1.1", b"200"]))
        if ok:
            self.assertIs(results[0], inner)
            self.assertEqual(inner.received, head[1])
        else:
            self.assertIsInstance(results[0].value, (ProxyRefused, net_error.ConnectionLost))


class _NeverConnects:
    """A proxy endpoint whose connection attempts hang until cancelled."""

    def __init__(self):
        self.attempts = 0
        self.cancelled = 0

    def connect(self, factory):
        self.attempts += 1
        return defer.Deferred(lambda d: setattr(self, "cancelled", self.cancelled + 1))


class TunnelEndpointTests(unittest.TestCase):
    def test_a_silent_proxy_times_out(self):
        clock = task.Clock()
        to_proxy = _NeverConnects()
        endpoint = TunnelEndpoint(clock, to_proxy, Proxy("http://p:3128"), "s3.example", 443, 5)
        d = endpoint.connect(Factory.forProtocol(Protocol))
        clock.advance(4.9)
        self.assertNoResult(d)
        clock.advance(0.2)
        failure = self.failureResultOf(d, net_error.TimeoutError)
        self.assertIn("did not open a tunnel to s3.example:443 within 5 s", str(failure.value))
        self.assertEqual((to_proxy.attempts, to_proxy.cancelled), (1, 1))

    def test_cancel_stops_the_attempt(self):
        clock = task.Clock()
        to_proxy = _NeverConnects()
        endpoint = TunnelEndpoint(clock, to_proxy, Proxy("http://p:3128"), "::1", 9000, 5)
        d = endpoint.connect(Factory.forProtocol(Protocol))
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual((to_proxy.attempts, to_proxy.cancelled), (1, 1))
        self.assertEqual(clock.getDelayedCalls(), [])
