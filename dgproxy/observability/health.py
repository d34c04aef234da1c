"""C{/_/health} (alive: always 200) and C{/_/ready} (able to serve: 503 with a reason)."""

from __future__ import annotations

from twisted.internet import defer, reactor, task
from twisted.logger import Logger

from dgproxy.observability.metrics import peak_rss_bytes

log = Logger(namespace="dgproxy.health")
CHECK_INTERVAL = 5.0


def health_doc(config, cache) -> dict:
    return {
        "status": "ok",
        "backend": config.default_backend_name,
        "peak_rss_bytes": peak_rss_bytes(),
        "cache_size_bytes": cache.size,
        "cache_max_bytes": cache.capacity,
        "cache_entries": len(cache),
        "cache_utilization_pct": round(100.0 * cache.size / cache.capacity, 2) if cache.capacity else 0.0,
    }


class Readiness:
    """Checks the backends every few seconds; C{report} answers from the last check."""

    def __init__(self, backend, interval: float = CHECK_INTERVAL):
        """C{backend}: the default backend (a routed one being down makes only
        its buckets answer 503, not the instance unready)."""
        self.backend = backend
        self.interval = interval
        self.problem = "not checked yet"
        self._loop = None

    def start(self) -> None:
        self._loop = task.LoopingCall(lambda: defer.ensureDeferred(self.check()))
        reactor.callWhenRunning(lambda: self._loop.start(self.interval, now=True))

    async def check(self) -> None:
        try:
            await self.backend.list_buckets()
        except Exception as e:
            if self.problem is None:
                log.warn("Not ready: {error}", error=str(e))
            self.problem = f"backend check failed: {e}"
            return
        if self.problem is not None and self.problem != "not checked yet":
            log.info("Ready again")
        self.problem = None

    def report(self) -> tuple[int, dict]:
        if self.problem is None:
            return 200, {"status": "ready"}
        return 503, {"status": "not_ready", "reason": self.problem}
