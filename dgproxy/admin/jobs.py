"""C{/_/api/admin/jobs/reencrypt}: start and watch re-encryption jobs.

Until the admin session layer exists, these endpoints take the same SigV4
credentials as S3 (the C{dgproxy reencrypt} command signs its requests).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Optional

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server

from dgproxy.auth.sigv4 import AuthFailure, SignedRequest

log = Logger(namespace="dgproxy.admin")
MAX_BUCKETS = 100
MIN_RATE = 64 * 1024  # bytes per second; below it a job would crawl for days by a slip of units


def parse_start_request(body: bytes) -> tuple[list[str], Optional[float]]:
    """(buckets, max_bytes_per_second) from a POST body, or ValueError naming the fault."""
    try:
        doc = json.loads(body or b"{}")
    except ValueError:
        raise ValueError("no buckets given")
    if not isinstance(doc, dict):
        raise ValueError("no buckets given")
    buckets = doc.get("buckets")
    if not isinstance(buckets, list) or not buckets or not all(isinstance(b, str) for b in buckets):
        raise ValueError("no buckets given")
    if len(buckets) > MAX_BUCKETS:
        raise ValueError("too many buckets (max 100)")
    rate = doc.get("max_bytes_per_second")
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float))
                             or not MIN_RATE <= rate < float("inf")):
        raise ValueError(f"max_bytes_per_second must be a number of at least {MIN_RATE}")
    return buckets, rate


def _json(request, status: int, doc) -> None:
    data = json.dumps(doc).encode()
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(data))
    request.write(data)
    request.finish()


class ReencryptResource(resource.Resource):
    isLeaf = True

    def __init__(self, authenticator, jobs, bucket_exists):
        super().__init__()
        self.authenticator = authenticator
        self.jobs = jobs
        self.bucket_exists = bucket_exists

    def _authorised(self, request) -> bool:
        if self.authenticator.open_access:
            return True
        signed = SignedRequest(method=request.method.decode("latin-1"), raw_path=request.raw_path,
                               raw_query=request.raw_query, headers=request.header_map())
        try:
            _, auth = self.authenticator.authenticate(signed)
        except AuthFailure as f:
            log.info("Admin request refused ({reason})", reason=f.reason)
            return False
        declared = (auth.payload_hash or "").lower()
        if len(declared) == 64:
            actual = hashlib.sha256(request.body_bytes()).hexdigest()
            return hmac.compare_digest(declared, actual)
        return True

    def render_GET(self, request):
        if not self._authorised(request):
            _json(request, 403, {"error": "access_denied"})
            return server.NOT_DONE_YET
        bucket = request.args.get(b"bucket", [b""])[0].decode("utf-8", "replace")
        if not bucket:
            _json(request, 400, {"error": "bad_request", "message": "give ?bucket=NAME"})
            return server.NOT_DONE_YET
        d = defer.ensureDeferred(self.jobs.status(bucket))
        d.addCallback(lambda st: _json(request, 200 if st else 404,
                                       st or {"error": "no_job", "bucket": bucket}))
        d.addErrback(lambda f: (log.failure("status failed", f),
                                _json(request, 500, {"error": "internal"})))
        return server.NOT_DONE_YET

    def render_POST(self, request):
        if not self._authorised(request):
            _json(request, 403, {"error": "access_denied"})
            return server.NOT_DONE_YET
        try:
            buckets, rate = parse_start_request(request.body_bytes())
        except ValueError as e:
            _json(request, 400, {"error": "bad_request", "message": str(e)})
            return server.NOT_DONE_YET

        async def start():
            started, failed = [], []
            for bucket in buckets:
                if not await self.bucket_exists(bucket):
                    failed.append({"bucket": bucket, "error": "bucket not found"})
                    continue
                state = self.jobs.start(bucket, rate)
                started.append({"bucket": bucket, "status": state["status"]})
                log.info("AUDIT | action=reencrypt_started | bucket={bucket}", bucket=bucket)
            return {"started": started, "errors": failed}

        d = defer.ensureDeferred(start())
        d.addCallback(lambda doc: _json(request, 202, doc))
        d.addErrback(lambda f: (log.failure("start failed", f),
                                _json(request, 500, {"error": "internal"})))
        return server.NOT_DONE_YET
