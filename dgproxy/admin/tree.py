"""The C{/_/} resource tree: operational endpoints now, the admin API later."""

from __future__ import annotations

import json

from twisted.web import resource

from dgproxy import __version__


class JSONResource(resource.Resource):
    isLeaf = True

    def __init__(self, produce):
        super().__init__()
        self._produce = produce

    def render_GET(self, request):
        status, doc = self._produce()
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        data = json.dumps(doc).encode()
        request.setHeader(b"content-length", b"%d" % len(data))
        return data


class _NotFound(resource.Resource):
    isLeaf = True

    def render(self, request):
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"application/json")
        return b'{"error":"not_found"}'


class AdminRoot(resource.Resource):
    """Children of C{/_/}; anything unknown is a JSON 404."""

    def getChild(self, path, request):
        return _NotFound()


def build_admin_root(health, ready, reencrypt=None, metrics=None) -> resource.Resource:
    """The site root: C{/_/health}, C{/_/ready}, C{/_/metrics} and the admin API;
    C{health}/C{ready} return (status, doc)."""
    root = resource.Resource()
    under = AdminRoot()
    root.putChild(b"_", under)
    under.putChild(b"health", JSONResource(health))
    under.putChild(b"ready", JSONResource(ready))
    if metrics is not None:
        under.putChild(b"metrics", metrics)
    api, admin, jobs = AdminRoot(), AdminRoot(), AdminRoot()
    under.putChild(b"api", api)
    api.putChild(b"admin", admin)
    admin.putChild(b"jobs", jobs)
    if reencrypt is not None:
        jobs.putChild(b"reencrypt", reencrypt)
    return root


def version_doc() -> dict:
    return {"version": __version__}
