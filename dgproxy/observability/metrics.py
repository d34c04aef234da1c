"""Prometheus metrics (SPEC §9), served at C{/_/metrics}.

Counters and histograms are fed by the parts that own the numbers: the HTTP
edge (every request, including those auth refused), the S3 front (auth), the
engine (through L{PrometheusEngineStats}). Gauges whose truth lives elsewhere
(cache, codec slots, open multipart uploads, peak RSS) are read at scrape
time. No label ever carries a bucket name or a key.
"""

from __future__ import annotations

import resource as _resource
import sys

import prometheus_client
from prometheus_client import (
    CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.web import resource

from dgproxy import __version__
from dgproxy.engine.store import EngineStats

prometheus_client.disable_created_metrics()

SIZE_BUCKETS = (1024, 10240, 102400, 1048576, 10485760, 104857600)
CODEC_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
RATIO_BUCKETS = (0.01, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def peak_rss_bytes() -> int:
    peak = _resource.getrusage(_resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class Metrics:
    """Every collector, in one registry of its own."""

    def __init__(self, backend_type: str):
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        Gauge("deltaglider_build_info", "Build metadata (always 1).", ["version", "backend_type"],
              registry=r).labels(__version__, backend_type).set(1)
        self.http_requests = Counter(
            "deltaglider_http_requests", "HTTP requests by method, status and S3 operation.",
            ["method", "status", "operation"], registry=r)
        self.http_duration = Histogram(
            "deltaglider_http_request_duration_seconds", "Request duration.",
            ["method", "operation"], registry=r)
        self.http_request_size = Histogram(
            "deltaglider_http_request_size_bytes", "Request body size.", ["method"],
            buckets=SIZE_BUCKETS, registry=r)
        self.http_response_size = Histogram(
            "deltaglider_http_response_size_bytes", "Response body size.", ["method"],
            buckets=SIZE_BUCKETS, registry=r)
        self.compression_ratio = Histogram(
            "deltaglider_delta_compression_ratio", "delta size / original size of stored deltas.",
            buckets=RATIO_BUCKETS, registry=r)
        self.bytes_saved = Counter(
            "deltaglider_delta_bytes_saved", "Bytes not stored thanks to deltas.", registry=r)
        self.encode_duration = Histogram(
            "deltaglider_delta_encode_duration_seconds", "xdelta3 encode time.",
            buckets=CODEC_BUCKETS, registry=r)
        self.decode_duration = Histogram(
            "deltaglider_delta_decode_duration_seconds", "xdelta3 decode (rebuild) time.",
            buckets=CODEC_BUCKETS, registry=r)
        self.decisions = Counter(
            "deltaglider_delta_decisions", "Storage decision per PUT.", ["decision"], registry=r)
        for label in ("delta", "passthrough", "reference"):
            self.decisions.labels(label)
        self.auth_attempts = Counter(
            "deltaglider_auth_attempts", "SigV4 authentication attempts.", ["result"], registry=r)
        self.auth_failures = Counter(
            "deltaglider_auth_failures", "SigV4 authentication failures by reason.", ["reason"],
            registry=r)
        self.backend_requests = Counter(
            "deltaglider_backend_requests", "Requests to S3 backends by backend, method and "
            "status: the answer's HTTP status, or unreachable / timeout.",
            ["backend", "method", "status"], registry=r)
        self.backend_duration = Histogram(
            "deltaglider_backend_request_duration_seconds", "Time from sending a request to an "
            "S3 backend to the head of its answer.", ["backend", "method"], registry=r)
        self.backend_retries = Counter(
            "deltaglider_backend_retries", "Idempotent S3 backend requests sent again, by reason.",
            ["backend", "reason"], registry=r)
        self._auth_success = self.auth_attempts.labels("success")
        self._per_request: dict[tuple, tuple] = {}
        self._sources = None

    def watch(self, cache, codec, multipart, listed) -> None:
        """Read these at scrape time (reference cache, codec, multipart, the
        S3 backends' listing metadata)."""
        self._sources = (cache, codec, multipart, listed)
        self.registry.register(_ScrapeTimeCollector(self))

    # -- HTTP ------------------------------------------------------------------
    def request_done(self, method: str, status: int, operation: str, seconds: float,
                     received: int, sent: int) -> None:
        method = method if method in _METHODS else "OTHER"
        key = (method, status, operation)
        children = self._per_request.get(key)
        if children is None:
            # labels() checks and locks on every call; a request's four series
            # are looked up once per combination (a bounded set) instead.
            children = self._per_request[key] = (
                self.http_requests.labels(method, str(status), operation),
                self.http_duration.labels(method, operation),
                self.http_request_size.labels(method),
                self.http_response_size.labels(method))
        count, duration, request_size, response_size = children
        count.inc()
        duration.observe(seconds)
        request_size.observe(received)
        response_size.observe(sent)

    # -- S3 backends -----------------------------------------------------------
    def backend(self, name: str) -> "BackendReport":
        """What S3 backend C{name}'s client reports into (its C{report})."""
        return BackendReport(self, name)

    # -- auth ------------------------------------------------------------------
    def auth_ok(self) -> None:
        self._auth_success.inc()

    def auth_failed(self, reason: str) -> None:
        self.auth_attempts.labels("failure").inc()
        self.auth_failures.labels(reason).inc()


_METHODS = {"GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS", "PATCH"}


class BackendReport:
    """One S3 backend's requests, answers and retries as metrics (the
    methods of the S3 client's C{UpstreamReport})."""

    def __init__(self, metrics: Metrics, backend: str):
        self._m = metrics
        self._backend = backend
        self._children: dict[tuple, tuple] = {}

    def _series(self, method: str, status: str) -> tuple:
        key = (method, status)
        children = self._children.get(key)
        if children is None:  # labels() locks on every call: once per combination
            children = self._children[key] = (
                self._m.backend_requests.labels(self._backend, method, status),
                self._m.backend_duration.labels(self._backend, method))
        return children

    def answered(self, method: str, status: int, seconds: float) -> None:
        count, duration = self._series(method, str(status))
        count.inc()
        duration.observe(seconds)

    def failed(self, method: str, why: str, seconds: float) -> None:
        count, duration = self._series(method, why)
        count.inc()
        duration.observe(seconds)

    def retried(self, reason: str) -> None:
        self._m.backend_retries.labels(self._backend, reason).inc()


class PrometheusEngineStats(EngineStats):
    """The engine's reports, also recorded as Prometheus metrics."""

    def __init__(self, metrics: Metrics):
        super().__init__()
        self._m = metrics

    def decision(self, label: str) -> None:
        super().decision(label)
        self._m.decisions.labels(label).inc()

    def delta_stored(self, original: int, delta: int) -> None:
        super().delta_stored(original, delta)
        self._m.bytes_saved.inc(max(0, original - delta))
        if original:
            self._m.compression_ratio.observe(delta / original)

    def encoded(self, seconds: float) -> None:
        super().encoded(seconds)
        self._m.encode_duration.observe(seconds)

    def decoded(self, seconds: float) -> None:
        super().decoded(seconds)
        self._m.decode_duration.observe(seconds)


class _ScrapeTimeCollector:
    def __init__(self, metrics: Metrics):
        self._m = metrics

    def collect(self):
        cache, codec, multipart, listed = self._m._sources
        yield GaugeMetricFamily("process_peak_rss_bytes", "Peak resident set size.",
                                value=peak_rss_bytes())
        hits = CounterMetricFamily("deltaglider_cache_hits", "Reference cache hits.")
        hits.add_metric([], cache.stats.hits)
        yield hits
        misses = CounterMetricFamily("deltaglider_cache_misses", "Reference cache misses.")
        misses.add_metric([], cache.stats.misses)
        yield misses
        yield GaugeMetricFamily("deltaglider_cache_size_bytes", "Bytes held by the reference cache.",
                                value=cache.size)
        yield GaugeMetricFamily("deltaglider_cache_entries", "References held in the cache.",
                                value=len(cache))
        yield GaugeMetricFamily("deltaglider_cache_max_bytes", "Reference cache capacity.",
                                value=cache.capacity)
        yield GaugeMetricFamily("deltaglider_cache_utilization_ratio",
                                "Cache size / capacity (0-1).",
                                value=cache.size / cache.capacity if cache.capacity else 0.0)
        yield GaugeMetricFamily("deltaglider_cache_miss_rate_ratio",
                                "Misses / lookups since start-up (0-1).",
                                value=cache.stats.miss_rate)
        yield GaugeMetricFamily("deltaglider_list_metadata_entries",
                                "Objects whose metadata S3 backend listings keep.",
                                value=len(listed))
        yield GaugeMetricFamily("deltaglider_list_metadata_size_bytes",
                                "Estimated bytes of that metadata.", value=listed.size)
        yield GaugeMetricFamily("deltaglider_list_metadata_max_bytes",
                                "Its budget, DGP_METADATA_CACHE_MB x 1048576.",
                                value=listed.budget)
        yield GaugeMetricFamily("deltaglider_codec_semaphore_available",
                                "Free xdelta3 slots (0 = saturated).", value=codec.available)
        yield GaugeMetricFamily("deltaglider_multipart_uploads_inflight",
                                "Open multipart uploads known to this process.",
                                value=multipart.open_uploads())


class MetricsResource(resource.Resource):
    """C{GET /_/metrics}: Prometheus text format, no authentication."""

    isLeaf = True

    def __init__(self, metrics: Metrics):
        super().__init__()
        self._m = metrics

    def render_GET(self, request):
        data = prometheus_client.generate_latest(self._m.registry)
        request.setHeader(b"content-type", prometheus_client.CONTENT_TYPE_LATEST.encode())
        request.setHeader(b"content-length", b"%d" % len(data))
        return data
