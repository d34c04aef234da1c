"""End-to-end: what an operator sees of a running dgproxy (SPEC §9, §1).

Real traffic goes through a real C{twistd -n dgproxy}; C{/_/metrics} is read
before and after and the test asserts how far each counter or histogram
MOVED, so the order of tests and the traffic of other tests do not matter.
Also: C{/_/health}, C{/_/ready} against a SeaweedFS that is stopped and
started again, and the log output (text and JSON lines, per-namespace levels,
the start-up summary and the seed's cache warning).

Every server started here is stopped here: module-shared servers at
interpreter exit, per-test servers by C{addCleanup}.
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
import random
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from typing import Callable, Optional
from urllib.parse import urlsplit

from botocore import auth as botocore_auth
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial import unittest

from dgproxy import __version__
from tests.e2e.harness import ACCESS_KEY, SECRET_KEY, ProxyProcess
from dgproxy.observability.health import CHECK_INTERVAL
from tests.e2e.seaweed import WEED_ACCESS_KEY, WEED_SECRET_KEY, Seaweed

CACHE_WARNING = ("[cache] In-memory reference cache is only 100 MB — "
                 "recommend ≥1024 MB for production")
CODEC_SLOTS = 5

# What SPEC §9 and the seed promise on /_/metrics, with the Prometheus type.
EXPECTED_FAMILIES = {
    "deltaglider_build_info": "gauge",
    "deltaglider_http_requests": "counter",
    "deltaglider_http_request_duration_seconds": "histogram",
    "deltaglider_http_request_size_bytes": "histogram",
    "deltaglider_http_response_size_bytes": "histogram",
    "deltaglider_delta_compression_ratio": "histogram",
    "deltaglider_delta_bytes_saved": "counter",
    "deltaglider_delta_encode_duration_seconds": "histogram",
    "deltaglider_delta_decode_duration_seconds": "histogram",
    "deltaglider_delta_decisions": "counter",
    "deltaglider_cache_hits": "counter",
    "deltaglider_cache_misses": "counter",
    "deltaglider_cache_size_bytes": "gauge",
    "deltaglider_cache_entries": "gauge",
    "deltaglider_cache_max_bytes": "gauge",
    "deltaglider_cache_utilization_ratio": "gauge",
    "deltaglider_cache_miss_rate_ratio": "gauge",
    "deltaglider_codec_semaphore_available": "gauge",
    "deltaglider_auth_attempts": "counter",
    "deltaglider_auth_failures": "counter",
    "deltaglider_multipart_uploads_inflight": "gauge",
    "process_peak_rss_bytes": "gauge",
    "process_start_time_seconds": "gauge",
    "process_cpu_seconds": "counter",
    "process_open_fds": "gauge",
    "process_max_fds": "gauge",
    "process_resident_memory_bytes": "gauge",
    "process_virtual_memory_bytes": "gauge",
}


# -- servers -------------------------------------------------------------------------------------

_shared: dict[str, ProxyProcess] = {}


# Encrypted storage: references are then read (and cached) through the
# backend; on a plaintext filesystem they are hard-linked and never miss.
ENCRYPTED = dict(env={"DGP_ENCRYPTION_KEY": "11" * 32},
                 config_yaml="storage:\n  backend_encryption: {mode: aes256-gcm-proxy}\n")


def shared_proxy() -> ProxyProcess:
    """The module's main server (text logs, default cache, 5 codec slots, encrypted storage)."""
    proxy = _shared.get("main")
    if proxy is not None and (proxy.proc is None or proxy.proc.poll() is not None):
        proxy = None
    if proxy is None:
        proxy = ProxyProcess(env={"DGP_CODEC_CONCURRENCY": str(CODEC_SLOTS),
                                  **ENCRYPTED["env"]},
                             config_yaml=ENCRYPTED["config_yaml"]).start()
        _shared["main"] = proxy
        atexit.register(proxy.cleanup)
    return proxy


def started(case: unittest.TestCase, **kwargs) -> ProxyProcess:
    """A server of the test's own, stopped and removed when the test ends."""
    proxy = ProxyProcess(**kwargs)
    case.addCleanup(proxy.cleanup)
    return proxy.start()


# -- reading /_/metrics --------------------------------------------------------------------------

class Scrape:
    """One parsed scrape of C{/_/metrics}."""

    def __init__(self, text: str):
        self.text = text
        self.types: dict[str, str] = {}
        self.samples: list[tuple[str, dict, float]] = []
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for s in family.samples:
                self.samples.append((s.name, dict(s.labels), s.value))

    def total(self, name: str, **labels) -> float:
        """Sum of the samples called C{name} whose labels include C{labels}."""
        return sum(v for n, l, v in self.samples
                   if n == name and all(l.get(k) == str(w) for k, w in labels.items()))

    def has(self, name: str, **labels) -> bool:
        return any(n == name and all(l.get(k) == str(w) for k, w in labels.items())
                   for n, l, _ in self.samples)

    def value(self, name: str, **labels) -> float:
        if not self.has(name, **labels):
            raise AssertionError(f"no sample {name}{labels} in the scrape")
        return self.total(name, **labels)


def http_get(url: str, headers: Optional[dict] = None, timeout: float = 10.0,
             method: str = "GET"):
    """(status, headers, body) of a request (a GET unless told), whatever the status."""
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def scrape(proxy: ProxyProcess) -> Scrape:
    status, headers, body = http_get(proxy.endpoint + "/_/metrics")
    if status != 200:
        raise AssertionError(f"/_/metrics answered {status}: {body[:500]!r}")
    return Scrape(body.decode("utf-8"))


def wait_for(predicate: Callable[[], object], timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


# -- traffic -------------------------------------------------------------------------------------

def release(seed: int, size: int = 300_000) -> bytes:
    return random.Random(seed).randbytes(size)


def next_release(body: bytes, seed: int) -> bytes:
    """A small edit of C{body}: deltas against it are tiny."""
    rng = random.Random(seed)
    at = rng.randrange(len(body) - 2000)
    return body[:at] + rng.randbytes(1000) + body[at + 1000:]


_names = iter(range(10_000))


def new_bucket(case: unittest.TestCase, proxy: ProxyProcess) -> str:
    stem = case._testMethodName.replace("_", "-").lower()[5:35].strip("-")
    name = f"obs-{stem}-{next(_names)}-{os.getpid() % 10000}"
    proxy.client().create_bucket(Bucket=name)
    return name


def client_error(fn, **kwargs) -> tuple[int, str, str]:
    """(status, code, request id) of a call that must fail."""
    try:
        fn(**kwargs)
    except ClientError as e:
        meta = e.response.get("ResponseMetadata", {})
        return (meta.get("HTTPStatusCode"), e.response.get("Error", {}).get("Code", ""),
                meta.get("RequestId") or meta.get("HTTPHeaders", {}).get("x-amz-request-id", ""))
    raise AssertionError(f"{fn.__name__}({kwargs}) succeeded")


def signed_at(proxy: ProxyProcess, method: str, path: str,
              when: datetime.datetime) -> tuple[int, bytes]:
    """Send a SigV4 request signed as if at C{when} (UTC); (status, body)."""
    request = AWSRequest(method=method, url=proxy.endpoint + path, data=b"")
    saved = botocore_auth.get_current_datetime
    botocore_auth.get_current_datetime = lambda *a, **k: when.replace(tzinfo=None)
    try:
        S3SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "s3", "us-east-1").add_auth(request)
    finally:
        botocore_auth.get_current_datetime = saved
    status, _headers, body = http_get(proxy.endpoint + path, dict(request.headers.items()),
                                      method=method)
    return status, body


def raw_connection(proxy: ProxyProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=10)


def presigned(proxy: ProxyProcess, op: str, bucket: str, key: str) -> str:
    """Path and query of a presigned URL (signed for the proxy's host)."""
    url = proxy.client(signature_version="s3v4").generate_presigned_url(
        op, Params={"Bucket": bucket, "Key": key}, ExpiresIn=600)
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


# -- metrics -------------------------------------------------------------------------------------

class MetricsEndpointTests(unittest.TestCase):
    """The scrape itself: open, well-formed, complete."""

    def setUp(self):
        self.proxy = shared_proxy()

    def test_metrics_need_no_authentication(self):
        status, headers, body = http_get(self.proxy.endpoint + "/_/metrics")
        self.assertEqual(status, 200, body[:300])
        self.assertTrue(headers.get("content-type", "").startswith("text/plain"), headers.items())
        Scrape(body.decode())  # parses

    def test_bare_metrics_path_is_s3_not_prometheus(self):
        """/metrics is a bucket named 'metrics': it needs a signature."""
        status, _headers, body = http_get(self.proxy.endpoint + "/metrics")
        self.assertEqual(status, 403, body[:300])
        self.assertNotIn(b"# TYPE", body)

    def test_every_promised_metric_is_exposed_with_its_type(self):
        s = scrape(self.proxy)
        for name, kind in EXPECTED_FAMILIES.items():
            self.assertIn(name, s.types, f"{name} missing from /_/metrics")
            self.assertEqual(s.types[name], kind, name)
        ours = [name for name in s.types if name.startswith("deltaglider_")]
        self.assertGreaterEqual(len(ours), 20, "the seed promises 20+ deltaglider_ metrics")
        for decision in ("delta", "passthrough", "reference"):
            self.assertTrue(s.has("deltaglider_delta_decisions_total", decision=decision),
                            decision)

    def test_every_exposed_metric_is_documented(self):
        """docs/reference/metrics.md names every metric a live scrape shows."""
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        with open(os.path.join(root, "docs", "reference", "metrics.md"), encoding="utf-8") as f:
            doc = f.read()
        s = scrape(self.proxy)
        for name, kind in s.types.items():
            shown = name + "_total" if kind == "counter" else name
            self.assertIn(f"`{shown}`", doc, f"{shown} ({kind}) is not in metrics.md")

    def test_build_info(self):
        s = scrape(self.proxy)
        self.assertEqual(s.value("deltaglider_build_info", version=__version__,
                                 backend_type="filesystem"), 1.0)
        infos = [l for n, l, _ in s.samples if n == "deltaglider_build_info"]
        self.assertEqual(len(infos), 1, infos)

    def test_process_metrics(self):
        s = scrape(self.proxy)
        self.assertGreater(s.value("process_resident_memory_bytes"), 1_000_000)
        self.assertGreaterEqual(s.value("process_peak_rss_bytes"),
                                s.value("process_resident_memory_bytes") * 0.99)
        self.assertGreater(s.value("process_open_fds"), 0)
        self.assertGreater(s.value("process_max_fds"), 0)
        self.assertGreater(s.value("process_cpu_seconds_total"), 0)
        start = s.value("process_start_time_seconds")
        self.assertLess(abs(start - time.time()), 600, "process_start_time_seconds is not now-ish")

    def test_codec_semaphore_reads_its_configured_size_at_rest(self):
        s = scrape(self.proxy)
        self.assertEqual(s.value("deltaglider_codec_semaphore_available"), CODEC_SLOTS)

    def test_cache_gauges_are_consistent(self):
        s = scrape(self.proxy)
        self.assertEqual(s.value("deltaglider_cache_max_bytes"), 100 * 1024 * 1024)
        size = s.value("deltaglider_cache_size_bytes")
        self.assertGreaterEqual(size, 0)
        self.assertAlmostEqual(s.value("deltaglider_cache_utilization_ratio"),
                               size / (100 * 1024 * 1024))
        self.assertGreaterEqual(s.value("deltaglider_cache_entries"), 0)
        rate = s.value("deltaglider_cache_miss_rate_ratio")
        self.assertTrue(0.0 <= rate <= 1.0, rate)


class DeltaMetricsTests(unittest.TestCase):
    """Decisions, encode/decode histograms, savings and the reference cache."""

    def setUp(self):
        self.proxy = shared_proxy()
        self.s3 = self.proxy.client()

    def test_first_put_in_a_prefix_counts_as_reference(self):
        bucket = new_bucket(self, self.proxy)
        before = scrape(self.proxy)
        self.s3.put_object(Bucket=bucket, Key="rel/app-1.zip", Body=release(1))
        after = scrape(self.proxy)
        d = lambda name, **l: after.total(name, **l) - before.total(name, **l)
        self.assertEqual(d("deltaglider_delta_decisions_total", decision="reference"), 1)
        self.assertEqual(d("deltaglider_delta_decisions_total", decision="delta"), 0)
        self.assertEqual(d("deltaglider_delta_decisions_total", decision="passthrough"), 0)

    def test_delta_put_moves_delta_decision_encode_histogram_and_savings(self):
        bucket = new_bucket(self, self.proxy)
        v1 = release(2)
        v2 = next_release(v1, 3)
        self.s3.put_object(Bucket=bucket, Key="rel/app-1.zip", Body=v1)
        before = scrape(self.proxy)
        self.s3.put_object(Bucket=bucket, Key="rel/app-2.zip", Body=v2)
        after = scrape(self.proxy)
        d = lambda name, **l: after.total(name, **l) - before.total(name, **l)
        self.assertEqual(d("deltaglider_delta_decisions_total", decision="delta"), 1)
        self.assertEqual(d("deltaglider_delta_decisions_total", decision="reference"), 0)
        self.assertEqual(d("deltaglider_delta_decisions_total", decision="passthrough"), 0)
        self.assertGreaterEqual(d("deltaglider_delta_encode_duration_seconds_count"), 1)
        self.assertGreater(d("deltaglider_delta_encode_duration_seconds_sum"), 0)
        self.assertEqual(d("deltaglider_delta_encode_duration_seconds_bucket", le="+Inf"),
                         d("deltaglider_delta_encode_duration_seconds_count"))
        self.assertEqual(d("deltaglider_delta_compression_ratio_count"), 1)
        ratio = d("deltaglider_delta_compression_ratio_sum")
        self.assertTrue(0 < ratio < 0.1, ratio)
        saved = d("deltaglider_delta_bytes_saved_total")
        self.assertTrue(len(v2) * 0.9 < saved < len(v2), saved)

    def test_reference_put_is_not_counted_as_bytes_saved(self):
        """The first object is stored whole (reference.bin) plus a tiny self-delta: nothing
        is saved, and its self-delta is not a compression ratio an operator should see."""
        bucket = new_bucket(self, self.proxy)
        before = scrape(self.proxy)
        self.s3.put_object(Bucket=bucket, Key="rel/app-1.zip", Body=release(4))
        after = scrape(self.proxy)
        d = lambda name, **l: after.total(name, **l) - before.total(name, **l)
        self.assertEqual(d("deltaglider_delta_decisions_total", decision="reference"), 1)
        self.assertEqual(d("deltaglider_delta_bytes_saved_total"), 0,
                         "a reference PUT stores the whole object, yet counts it as saved")
        self.assertEqual(d("deltaglider_delta_compression_ratio_count"), 0)


    def test_tar_gz_is_passthrough(self):
        bucket = new_bucket(self, self.proxy)
        body = release(5, 50_000)
        self.s3.put_object(Bucket=bucket, Key="rel/app-1.zip", Body=release(6))
        before = scrape(self.proxy)
        self.s3.put_object(Bucket=bucket, Key="rel/app-1.tar.gz", Body=body)
        after = scrape(self.proxy)
        d = lambda name, **l: after.total(name, **l) - before.total(name, **l)
        self.assertEqual(d("deltaglider_delta_decisions_total", decision="passthrough"), 1)
        self.assertEqual(d("deltaglider_delta_decisions_total", decision="delta"), 0)
        self.assertEqual(d("deltaglider_delta_decisions_total", decision="reference"), 0)
        self.assertEqual(d("deltaglider_delta_encode_duration_seconds_count"), 0)
        self.assertEqual(d("deltaglider_delta_bytes_saved_total"), 0)

    def test_delta_get_moves_decode_histogram_and_cache_counters(self):
        bucket = new_bucket(self, self.proxy)
        v1 = release(7)
        v2 = next_release(v1, 8)
        self.s3.put_object(Bucket=bucket, Key="rel/app-1.zip", Body=v1)
        self.s3.put_object(Bucket=bucket, Key="rel/app-2.zip", Body=v2)
        before = scrape(self.proxy)
        got = self.s3.get_object(Bucket=bucket, Key="rel/app-2.zip")["Body"].read()
        after = scrape(self.proxy)
        self.assertEqual(got, v2)
        d = lambda name, **l: after.total(name, **l) - before.total(name, **l)
        self.assertEqual(d("deltaglider_delta_decode_duration_seconds_count"), 1)
        self.assertGreater(d("deltaglider_delta_decode_duration_seconds_sum"), 0)
        self.assertEqual(d("deltaglider_cache_hits_total") + d("deltaglider_cache_misses_total"),
                         1, "one delta GET is one reference-cache lookup")
        rate = after.value("deltaglider_cache_miss_rate_ratio")
        self.assertTrue(0.0 <= rate <= 1.0, rate)
        hits, misses = after.value("deltaglider_cache_hits_total"), after.value(
            "deltaglider_cache_misses_total")
        self.assertAlmostEqual(rate, misses / (hits + misses))
        self.assertEqual(d("deltaglider_delta_encode_duration_seconds_count"), 0)

    def test_plaintext_filesystem_reference_is_linked_and_counts_as_a_hit(self):
        """Unencrypted on a filesystem, a reference is hard-linked, never read
        through the backend: a delta GET is a hit, even on a cold cache."""
        proxy = started(self)
        s3 = proxy.client()
        bucket = new_bucket(self, proxy)
        v1 = release(11)
        v2 = next_release(v1, 12)
        s3.put_object(Bucket=bucket, Key="rel/app-1.zip", Body=v1)
        s3.put_object(Bucket=bucket, Key="rel/app-2.zip", Body=v2)
        before = scrape(proxy)
        self.assertEqual(s3.get_object(Bucket=bucket, Key="rel/app-2.zip")["Body"].read(), v2)
        after = scrape(proxy)
        d = lambda name, **l: after.total(name, **l) - before.total(name, **l)
        self.assertEqual(d("deltaglider_cache_hits_total"), 1)
        self.assertEqual(d("deltaglider_cache_misses_total"), 0)
        self.assertEqual(after.value("deltaglider_cache_entries"), 0)

    def test_passthrough_get_does_not_touch_codec_or_cache(self):
        bucket = new_bucket(self, self.proxy)
        self.s3.put_object(Bucket=bucket, Key="plain.txt", Body=b"x" * 5000)
        before = scrape(self.proxy)
        self.s3.get_object(Bucket=bucket, Key="plain.txt")["Body"].read()
        after = scrape(self.proxy)
        d = lambda name, **l: after.total(name, **l) - before.total(name, **l)
        self.assertEqual(d("deltaglider_delta_decode_duration_seconds_count"), 0)
        self.assertEqual(d("deltaglider_cache_hits_total") + d("deltaglider_cache_misses_total"), 0)

    def test_cold_cache_misses_then_hits(self):
        """A second process on the same data starts cold: the first delta GET misses and fills
        the cache (entries and size move); a GET of another delta of that deltaspace hits.
        (A repeat GET of the same version within 30 s is served from the rebuilt copy and
        moves neither the decode histogram nor the cache counters.)"""
        main = shared_proxy()
        bucket = new_bucket(self, main)
        v1 = release(9)
        v2 = next_release(v1, 10)
        v3 = next_release(v2, 15)
        self.s3.put_object(Bucket=bucket, Key="rel/app-1.zip", Body=v1)
        self.s3.put_object(Bucket=bucket, Key="rel/app-2.zip", Body=v2)
        self.s3.put_object(Bucket=bucket, Key="rel/app-3.zip", Body=v3)
        cold = started(self, data_dir=main.data_dir, **ENCRYPTED)
        c = cold.client()
        s0 = scrape(cold)
        self.assertEqual(s0.value("deltaglider_cache_hits_total"), 0)
        self.assertEqual(s0.value("deltaglider_cache_misses_total"), 0)
        self.assertEqual(s0.value("deltaglider_cache_miss_rate_ratio"), 0.0)
        self.assertEqual(s0.value("deltaglider_cache_entries"), 0)
        self.assertEqual(c.get_object(Bucket=bucket, Key="rel/app-2.zip")["Body"].read(), v2)
        s1 = scrape(cold)
        self.assertEqual(s1.value("deltaglider_cache_misses_total"), 1)
        self.assertEqual(s1.value("deltaglider_cache_hits_total"), 0)
        self.assertEqual(s1.value("deltaglider_cache_miss_rate_ratio"), 1.0)
        self.assertEqual(s1.value("deltaglider_cache_entries"), 1)
        self.assertEqual(s1.value("deltaglider_cache_size_bytes"), len(v1))
        self.assertEqual(c.get_object(Bucket=bucket, Key="rel/app-3.zip")["Body"].read(), v3)
        s2 = scrape(cold)
        self.assertEqual(s2.value("deltaglider_delta_decode_duration_seconds_count"), 2)
        self.assertEqual(s2.value("deltaglider_cache_hits_total"), 1)
        self.assertEqual(s2.value("deltaglider_cache_misses_total"), 1)
        self.assertEqual(s2.value("deltaglider_cache_miss_rate_ratio"), 0.5)
        self.assertEqual(c.get_object(Bucket=bucket, Key="rel/app-3.zip")["Body"].read(), v3)
        s3 = scrape(cold)
        self.assertEqual(s3.value("deltaglider_delta_decode_duration_seconds_count"), 2)
        self.assertEqual(s3.value("deltaglider_cache_hits_total"), 1)
        status, _h, body = http_get(cold.endpoint + "/_/health")
        doc = json.loads(body)
        self.assertEqual(doc["cache_entries"], 1)
        self.assertEqual(doc["cache_size_bytes"], len(v1))

    def test_codec_semaphore_reaches_zero_when_saturated(self):
        """Uploads into a deltaspace hold a codec slot while their body arrives: with every
        slot held the gauge reads 0 (the seed's 'saturated'), and it recovers afterwards."""
        bucket = new_bucket(self, self.proxy)
        self.s3.put_object(Bucket=bucket, Key="rel/app-1.zip", Body=release(11))
        socks = []
        try:
            for i in range(CODEC_SLOTS):
                path = presigned(self.proxy, "put_object", bucket, f"rel/slow-{i}.zip")
                sock = raw_connection(self.proxy)
                socks.append(sock)
                sock.sendall(f"PUT {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.proxy.port}\r\n"
                             f"Content-Length: 300000\r\n\r\n".encode() + b"x" * 1000)
            wait_for(lambda: scrape(self.proxy).value(
                "deltaglider_codec_semaphore_available") == 0, 10, "all codec slots held")
        finally:
            for sock in socks:
                sock.close()
        wait_for(lambda: scrape(self.proxy).value(
            "deltaglider_codec_semaphore_available") == CODEC_SLOTS, 10, "codec slots freed")

    def test_multipart_uploads_inflight(self):
        bucket = new_bucket(self, self.proxy)
        before = scrape(self.proxy).value("deltaglider_multipart_uploads_inflight")
        up = self.s3.create_multipart_upload(Bucket=bucket, Key="big.bin")["UploadId"]
        self.assertEqual(scrape(self.proxy).value("deltaglider_multipart_uploads_inflight"),
                         before + 1)
        self.s3.abort_multipart_upload(Bucket=bucket, Key="big.bin", UploadId=up)
        self.assertEqual(scrape(self.proxy).value("deltaglider_multipart_uploads_inflight"),
                         before)


class AuthAndHttpMetricsTests(unittest.TestCase):
    """Auth failures by reason, HTTP counters (auth refusals included), label hygiene."""

    def setUp(self):
        self.proxy = shared_proxy()
        self.s3 = self.proxy.client()

    def _moved(self, action) -> Callable:
        """How far each metric moved across C{action}. The first scrape is itself a GET
        that is counted once it has been sent, so it shows up in the deltas as one
        C{operation="metrics"} request of C{self.scrape_bytes} bytes."""
        before = scrape(self.proxy)
        self.scrape_bytes = len(before.text.encode())
        action()
        after = scrape(self.proxy)
        return lambda name, **l: after.total(name, **l) - before.total(name, **l)

    def test_bad_signature(self):
        bucket = new_bucket(self, self.proxy)
        bad = self.proxy.client(secret_key="wrong-" + SECRET_KEY[6:])
        result = []
        d = self._moved(lambda: result.append(
            client_error(bad.get_object, Bucket=bucket, Key="some/key.zip")))
        self.assertEqual(result[0][:2], (403, "AccessDenied"))
        self.assertEqual(d("deltaglider_auth_failures_total", reason="invalid_signature"), 1)
        self.assertEqual(d("deltaglider_auth_failures_total"), 1)
        self.assertEqual(d("deltaglider_auth_attempts_total", result="failure"), 1)
        self.assertEqual(d("deltaglider_auth_attempts_total", result="success"), 0)
        self.assertEqual(d("deltaglider_http_requests_total", method="GET", status="403",
                           operation="get_object"), 1)

    def test_unknown_access_key(self):
        bucket = new_bucket(self, self.proxy)
        stranger = self.proxy.client(access_key="AKIDNOBODYKNOWS00001")
        result = []
        d = self._moved(lambda: result.append(
            client_error(stranger.put_object, Bucket=bucket, Key="k.zip", Body=b"data")))
        self.assertEqual(result[0][:2], (403, "AccessDenied"))
        self.assertEqual(d("deltaglider_auth_failures_total", reason="invalid_access_key"), 1)
        self.assertEqual(d("deltaglider_auth_failures_total"), 1)
        self.assertEqual(d("deltaglider_auth_attempts_total", result="failure"), 1)
        self.assertEqual(d("deltaglider_http_requests_total", method="PUT", status="403",
                           operation="put_object"), 1)
        self.assertEqual(d("deltaglider_http_request_duration_seconds_count", method="PUT",
                           operation="put_object"), 1)

    def test_no_authorization_at_all(self):
        bucket = new_bucket(self, self.proxy)
        result = []
        d = self._moved(lambda: result.append(
            http_get(f"{self.proxy.endpoint}/{bucket}/some/key.zip")))
        self.assertEqual(result[0][0], 403)
        self.assertIn(b"AccessDenied", result[0][2])
        self.assertEqual(d("deltaglider_auth_failures_total", reason="missing_header"), 1)
        self.assertEqual(d("deltaglider_auth_failures_total"), 1)
        self.assertEqual(d("deltaglider_http_requests_total", method="GET", status="403",
                           operation="get_object"), 1)

    def test_clock_skew(self):
        bucket = new_bucket(self, self.proxy)
        when = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=2)
        result = []
        d = self._moved(lambda: result.append(signed_at(self.proxy, "GET", f"/{bucket}", when)))
        self.assertEqual(result[0][0], 403)
        self.assertIn(b"RequestTimeTooSkewed", result[0][1])
        self.assertEqual(d("deltaglider_auth_failures_total", reason="clock_skew"), 1)
        self.assertEqual(d("deltaglider_http_requests_total", status="403",
                           operation="list_objects"), 1)

    def test_successful_requests_count_as_auth_success(self):
        bucket = new_bucket(self, self.proxy)
        d = self._moved(lambda: self.s3.head_bucket(Bucket=bucket))
        self.assertEqual(d("deltaglider_auth_attempts_total", result="success"), 1)
        self.assertEqual(d("deltaglider_auth_attempts_total", result="failure"), 0)
        self.assertEqual(d("deltaglider_auth_failures_total"), 0)

    def test_http_metrics_per_request(self):
        bucket = new_bucket(self, self.proxy)
        body = release(12, 20_000)
        d = self._moved(lambda: self.s3.put_object(Bucket=bucket, Key="f.dat", Body=body))
        self.assertEqual(d("deltaglider_http_requests_total", method="PUT", status="200",
                           operation="put_object"), 1)
        self.assertEqual(d("deltaglider_http_request_duration_seconds_count", method="PUT",
                           operation="put_object"), 1)
        self.assertEqual(d("deltaglider_http_request_size_bytes_sum", method="PUT"), len(body))
        self.assertEqual(d("deltaglider_http_request_size_bytes_bucket", method="PUT",
                           le="102400.0") - d("deltaglider_http_request_size_bytes_bucket",
                                              method="PUT", le="10240.0"), 1)
        d = self._moved(lambda: self.s3.get_object(Bucket=bucket, Key="f.dat")["Body"].read())
        self.assertEqual(d("deltaglider_http_requests_total", method="GET", status="200",
                           operation="get_object"), 1)
        self.assertEqual(d("deltaglider_http_response_size_bytes_sum", method="GET"),
                         len(body) + self.scrape_bytes)
        self.assertEqual(d("deltaglider_http_requests_total", method="GET", operation="metrics"),
                         1)
        d = self._moved(lambda: client_error(self.s3.get_object, Bucket=bucket, Key="nope.dat"))
        self.assertEqual(d("deltaglider_http_requests_total", method="GET", status="404",
                           operation="get_object"), 1)

    def test_operation_label_does_not_depend_on_the_auth_outcome(self):
        """HEAD / is 'head_root' whether it is refused (403) or served (200)."""
        now = datetime.datetime.now(datetime.timezone.utc)
        d = self._moved(lambda: (signed_at(self.proxy, "HEAD", "/", now),
                                 http_get(self.proxy.endpoint + "/", method="HEAD")))
        self.assertEqual(d("deltaglider_http_requests_total", method="HEAD", status="403",
                           operation="head_root"), 1)
        self.assertEqual(d("deltaglider_http_requests_total", method="HEAD", status="200",
                           operation="head_root"), 1)


    def test_scrapes_are_counted_as_metrics_operation(self):
        before = scrape(self.proxy)
        after = scrape(self.proxy)
        self.assertEqual(after.total("deltaglider_http_requests_total", method="GET",
                                     status="200", operation="metrics")
                         - before.total("deltaglider_http_requests_total", method="GET",
                                        status="200", operation="metrics"), 1)

    def test_client_disconnect_mid_upload_is_counted_as_499(self):
        bucket = new_bucket(self, self.proxy)
        path = presigned(self.proxy, "put_object", bucket, "cut.dat")
        before = scrape(self.proxy)
        sock = raw_connection(self.proxy)
        sock.sendall(f"PUT {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.proxy.port}\r\n"
                     f"Content-Length: 1000000\r\n\r\n".encode() + b"x" * 10_000)
        time.sleep(0.2)
        sock.close()
        wait_for(lambda: scrape(self.proxy).total(
            "deltaglider_http_requests_total", method="PUT", status="499",
            operation="put_object") > before.total(
            "deltaglider_http_requests_total", method="PUT", status="499",
            operation="put_object"), 10, "a 499 for the cut upload")
        wait_for(lambda: re.search(rf"\[dgproxy\.access#info\] PUT {re.escape(bucket)} 499 ",
                                   self.proxy.log()), 5, "the 499 access-log line")

    def test_client_disconnect_mid_download_is_counted_as_499(self):
        bucket = new_bucket(self, self.proxy)
        self.s3.put_object(Bucket=bucket, Key="big.dat", Body=os.urandom(24 * 1024 * 1024))
        path = presigned(self.proxy, "get_object", bucket, "big.dat")
        before = scrape(self.proxy)
        sock = raw_connection(self.proxy)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.proxy.port}\r\n\r\n"
                     .encode())
        self.assertTrue(sock.recv(65536).startswith(b"HTTP/1.1 200"))
        sock.close()
        wait_for(lambda: scrape(self.proxy).total(
            "deltaglider_http_requests_total", method="GET", status="499",
            operation="get_object") > before.total(
            "deltaglider_http_requests_total", method="GET", status="499",
            operation="get_object"), 10, "a 499 for the cut download")

    def test_no_bucket_or_key_in_any_label(self):
        tag = f"{os.getpid()}{random.randrange(10**6)}"
        bucket = f"obs-secretbucket-{tag}"
        key = f"secretdir-{tag}/secretname-{tag}.zip"
        s3 = self.s3
        s3.create_bucket(Bucket=bucket)
        v1 = release(13, 50_000)
        s3.put_object(Bucket=bucket, Key=key, Body=v1)
        s3.put_object(Bucket=bucket, Key=key.replace(".zip", "-2.zip"), Body=next_release(v1, 1))
        s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        s3.head_object(Bucket=bucket, Key=key)
        s3.list_objects_v2(Bucket=bucket, Prefix=f"secretdir-{tag}/")
        s3.copy_object(Bucket=bucket, Key=key + ".copy", CopySource={"Bucket": bucket, "Key": key})
        client_error(s3.get_object, Bucket=bucket, Key=key + ".missing")
        client_error(self.proxy.client(secret_key="x" * 40).get_object, Bucket=bucket, Key=key)
        http_get(f"{self.proxy.endpoint}/{bucket}/{key}")
        http_get(f"{self.proxy.endpoint}/_/{bucket}")
        s3.delete_object(Bucket=bucket, Key=key)
        s = scrape(self.proxy)
        secrets = {bucket, key, f"secretdir-{tag}", f"secretname-{tag}", tag}
        for name, labels, _ in s.samples:
            for label, value in labels.items():
                for secret in secrets:
                    self.assertNotIn(secret, value, f"{name}{{{label}={value!r}}} leaks {secret!r}")
        operations = {l["operation"] for n, l, _ in s.samples if "operation" in l}
        for op in operations:
            self.assertRegex(op, r"^[a-z_]+$|^-$", "operation labels are a fixed vocabulary")
        self.assertIn("copy_object", operations)
        self.assertIn("list_objects", operations)


# -- health and readiness ------------------------------------------------------------------------

class HealthTests(unittest.TestCase):
    def setUp(self):
        self.proxy = shared_proxy()

    def test_health_document(self):
        status, headers, body = http_get(self.proxy.endpoint + "/_/health")
        self.assertEqual(status, 200)
        self.assertEqual(headers.get("content-type"), "application/json")
        doc = json.loads(body)
        self.assertEqual(doc["status"], "ok")
        for field in ("peak_rss_bytes", "cache_size_bytes", "cache_max_bytes", "cache_entries",
                      "cache_utilization_pct"):
            self.assertIn(field, doc)
            self.assertIsInstance(doc[field], (int, float), field)
            self.assertGreaterEqual(doc[field], 0, field)
        self.assertEqual(doc["cache_max_bytes"], 100 * 1024 * 1024)
        self.assertGreater(doc["peak_rss_bytes"], 1_000_000)
        self.assertLessEqual(doc["cache_utilization_pct"], 100)
        self.assertNotIn("version", doc)

    def test_ready_while_the_backend_works(self):
        status, _h, body = http_get(self.proxy.endpoint + "/_/ready")
        self.assertEqual(status, 200, body)
        self.assertEqual(json.loads(body), {"status": "ready"})

    def test_unknown_admin_path_is_json_404(self):
        status, _h, body = http_get(self.proxy.endpoint + "/_/nonesuch")
        self.assertEqual(status, 404)
        self.assertEqual(json.loads(body), {"error": "not_found"})


class ReadinessOutageTests(unittest.TestCase):
    """dgproxy over SeaweedFS: /_/ready follows the backend; /_/health does not."""

    def test_ready_follows_the_backend(self):
        weed = Seaweed()
        self.addCleanup(weed.cleanup)
        weed.start()
        proxy = started(self, env=weed.backend_env())
        ready = lambda: http_get(proxy.endpoint + "/_/ready", timeout=5)
        wait_for(lambda: ready()[0] == 200, 15, "ready with the backend up")
        self.assertEqual(json.loads(ready()[2]), {"status": "ready"})
        s = scrape(proxy)
        self.assertEqual(s.value("deltaglider_build_info", version=__version__,
                                 backend_type="s3"), 1.0)

        weed.stop()
        status, _h, body = wait_for(lambda: (lambda r: r if r[0] != 200 else None)(ready()),
                                    20, "/_/ready to notice the backend is gone")
        self.assertEqual(status, 503, body)
        doc = json.loads(body)
        self.assertEqual(doc["status"], "not_ready")
        self.assertIsInstance(doc.get("reason"), str)
        self.assertIn("backend", doc["reason"])
        self.assertIn("default", doc["reason"], "the reason names the backend")
        status, _h, body = http_get(proxy.endpoint + "/_/health")
        self.assertEqual(status, 200, "health stays 200 while the reactor runs")
        before = scrape(proxy)
        # one raw signed request: boto3 would retry a 503
        status, body = signed_at(proxy, "GET", "/anything",
                                 datetime.datetime.now(datetime.timezone.utc))
        self.assertEqual(status, 503, body)
        after = scrape(proxy)
        self.assertEqual(after.total("deltaglider_http_requests_total", status="503")
                         - before.total("deltaglider_http_requests_total", status="503"), 1)
        wait_for(lambda: "[dgproxy.health#warn] Not ready" in proxy.log(), 5,
                 "a warning in the log")

        weed.start()
        wait_for(lambda: ready()[0] == 200, 25, "/_/ready to recover once the backend is back")
        self.assertEqual(json.loads(ready()[2]), {"status": "ready"})

    def test_ready_follows_the_default_backend_only(self):
        """SPEC §9: 503 while the DEFAULT backend is unreachable. A routed bucket's backend
        going away makes that bucket answer 503, but the instance still serves every other
        bucket, so a load balancer must not take it out of rotation."""
        weed = Seaweed()
        self.addCleanup(weed.cleanup)
        weed.start()
        proxy = ProxyProcess()
        proxy.config_path = os.path.join(proxy.workdir, "dgproxy.yaml")
        with open(proxy.config_path, "w") as f:
            f.write(f"""\
storage:
  backends:
    - name: local
      type: filesystem
      path: {proxy.workdir}/fsdata
    - name: weed
      type: s3
      endpoint: {weed.endpoint}
      access_key_id: {WEED_ACCESS_KEY}
      secret_access_key: {WEED_SECRET_KEY}
  default_backend: local
  buckets:
    remote:
      backend: weed
""")
        self.addCleanup(proxy.cleanup)
        proxy.start()
        s3 = proxy.client()
        s3.create_bucket(Bucket="localbkt")
        ready = lambda: http_get(proxy.endpoint + "/_/ready", timeout=5)
        wait_for(lambda: ready()[0] == 200, 15, "ready with both backends up")
        weed.stop()
        deadline = time.monotonic() + CHECK_INTERVAL + 1.5
        while time.monotonic() < deadline:
            status, _h, body = ready()
            self.assertEqual(status, 200, body)
            time.sleep(0.25)
        s3.put_object(Bucket="localbkt", Key="k.txt", Body=b"still here")
        self.assertEqual(s3.get_object(Bucket="localbkt", Key="k.txt")["Body"].read(),
                         b"still here")



# -- logs ----------------------------------------------------------------------------------------

def _access_lines_json(log: str) -> list[dict]:
    return [r for r in (json.loads(line) for line in log.splitlines() if line.strip())
            if r.get("namespace") == "dgproxy.access"]


class LoggingTests(unittest.TestCase):

    def test_startup_summary_and_cache_warning(self):
        proxy = shared_proxy()
        log = wait_for(lambda: (lambda t: t if "Authentication:" in t else None)(proxy.log()),
                       5, "the start-up summary")
        self.assertIn(f"starting on 127.0.0.1:{proxy.port}", log)
        self.assertIn(f"Backend 'default': filesystem at {proxy.data_dir}", log)
        self.assertRegex(log, r"Reference cache: 100 MB; codec slots: 5\b")
        self.assertIn(f"Authentication: SigV4 with access key {ACCESS_KEY}", log)
        self.assertNotIn(SECRET_KEY, log)
        warnings = [line for line in log.splitlines() if CACHE_WARNING in line]
        self.assertEqual(len(warnings), 1, log[:3000])
        self.assertTrue(warnings[0].endswith(CACHE_WARNING), warnings[0])
        self.assertIn("#warn]", warnings[0])

    def test_open_access_is_announced(self):
        proxy = started(self, open_access=True, env={"DGP_CACHE_MB": "1024"})
        log = proxy.log()
        self.assertIn("Authentication: none", log)
        self.assertNotIn("[cache] In-memory reference cache is only", log)

    def test_json_lines(self):
        proxy = started(self, env={"DGP_LOG_FORMAT": "json", "DGP_CACHE_MB": "2048"})
        s3 = proxy.client()
        body = release(14, 12_345)
        ids = {}
        ids["create"] = s3.create_bucket(Bucket="jsonlog")["ResponseMetadata"]["RequestId"]
        ids["put"] = s3.put_object(Bucket="jsonlog", Key="a/b.dat",
                                   Body=body)["ResponseMetadata"]["RequestId"]
        got = s3.get_object(Bucket="jsonlog", Key="a/b.dat")
        got["Body"].read()
        ids["get"] = got["ResponseMetadata"]["RequestId"]
        ids["denied"] = client_error(proxy.client(secret_key="y" * 40).get_object,
                                     Bucket="jsonlog", Key="a/b.dat")[2]
        _s, headers, _b = http_get(proxy.endpoint + "/_/metrics")
        ids["metrics"] = headers.get("x-amz-request-id")
        self.assertTrue(all(ids.values()), ids)
        self.assertEqual(proxy.stop(), 0)
        log = proxy.log()
        records = []
        for n, line in enumerate(log.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                self.fail(f"log line {n} is not JSON: {line!r}")
            self.assertIsInstance(record, dict, line)
            for field in ("time", "level", "namespace", "message"):
                self.assertIn(field, record, line)
            records.append(record)
        messages = [r["message"] for r in records]
        self.assertTrue(any(f"starting on 127.0.0.1:{proxy.port}" in m for m in messages))
        self.assertTrue(any(m.startswith("Reference cache: 2048 MB") for m in messages))
        self.assertFalse(any("[cache] In-memory reference cache is only" in m for m in messages),
                         "no cache warning with DGP_CACHE_MB=2048")
        access = _access_lines_json(log)
        by_id = {}
        for r in access:
            for field in ("method", "bucket", "status", "bytes_in", "bytes_out", "duration_ms",
                          "principal", "request_id", "operation"):
                self.assertIn(field, r, r)
            self.assertIsInstance(r["status"], int)
            self.assertIsInstance(r["duration_ms"], int)
            self.assertIsInstance(r["bytes_in"], int)
            self.assertIsInstance(r["bytes_out"], int)
            self.assertNotIn(r["request_id"], by_id, "one access line per request")
            by_id[r["request_id"]] = r
        for name, rid in ids.items():
            self.assertIn(rid, by_id, f"no access line for the {name} request")
        put, get, denied = by_id[ids["put"]], by_id[ids["get"]], by_id[ids["denied"]]
        self.assertEqual((put["method"], put["bucket"], put["status"], put["bytes_in"],
                          put["principal"], put["operation"]),
                         ("PUT", "jsonlog", 200, len(body), "$bootstrap", "put_object"))
        self.assertEqual((get["method"], get["bucket"], get["status"], get["bytes_out"],
                          get["operation"]), ("GET", "jsonlog", 200, len(body), "get_object"))
        self.assertEqual((denied["method"], denied["bucket"], denied["status"]),
                         ("GET", "jsonlog", 403))
        self.assertEqual(by_id[ids["metrics"]]["operation"], "metrics")
        auth = [r for r in records if r["namespace"] == "dgproxy.s3"
                and r.get("request_id") == ids["denied"]]
        self.assertEqual(len(auth), 1, "the auth failure is logged with its reason")
        self.assertEqual(auth[0].get("reason"), "invalid_signature")

    def test_level_filter_per_namespace(self):
        proxy = started(self, env={"DGP_LOG_LEVEL": "warn,dgproxy.access=info"})
        rid = proxy.client().list_buckets()["ResponseMetadata"]["RequestId"]
        client_error(proxy.client(secret_key="z" * 40).list_buckets)
        self.assertEqual(proxy.stop(), 0)
        log = proxy.log()
        lines = [line for line in log.splitlines() if line.strip()]
        access = [line for line in lines if "[dgproxy.access#info]" in line]
        self.assertTrue(any(rid in line for line in access), log)
        self.assertTrue(any(" 403 " in line for line in access), log)
        others = [line for line in lines if "[dgproxy.access#" not in line]
        for line in others:
            self.assertNotRegex(line, r"#(info|debug)\]", "info lines outside dgproxy.access")
            self.assertNotIn("[-]", line, "legacy twisted lines are info: dropped")
        self.assertNotIn("starting on", log)
        self.assertNotIn("Authentication failed", log)
        self.assertTrue(any(line.endswith(CACHE_WARNING) for line in others),
                        "warnings still pass a warn filter")

    def test_invalid_log_level_refuses_to_start(self):
        proxy = ProxyProcess(env={"DGP_LOG_LEVEL": "dgproxy=loud"})
        self.addCleanup(proxy.cleanup)
        proxy.start(wait=False)
        try:
            code = proxy.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.fail("dgproxy started with DGP_LOG_LEVEL=dgproxy=loud")
        self.assertNotEqual(code, 0)
        log = proxy.log()
        self.assertIn("DGP_LOG_LEVEL", log)
        self.assertIn("loud", log)
        self.assertEqual(len([line for line in log.splitlines() if line.strip()]), 1, log)

    def test_invalid_log_format_refuses_to_start_naming_the_variable(self):
        proxy = ProxyProcess(env={"DGP_LOG_FORMAT": "xml"})
        self.addCleanup(proxy.cleanup)
        proxy.start(wait=False)
        try:
            code = proxy.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.fail("dgproxy started with DGP_LOG_FORMAT=xml")
        self.assertNotEqual(code, 0)
        log = proxy.log()
        self.assertIn("'text' or 'json'", log)
        self.assertIn("DGP_LOG_FORMAT", log, "the message names the variable that was set")

