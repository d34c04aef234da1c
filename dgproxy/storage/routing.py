"""Bucket routing: each client-visible bucket lives on one backend.

L{RoutingBackend} is itself an L{IBackend}: the engine above sees one
backend with virtual bucket names, and each call is sent to the backend the
bucket is routed to, under its real name there (C{alias}). Unrouted buckets
live on the default backend under their own name.
"""

from __future__ import annotations

from typing import Mapping, Optional

from zope.interface import implementer

from dgproxy.storage.interface import BucketInfo, IBackend


@implementer(IBackend)
class RoutingBackend:
    def __init__(self, backends: Mapping[str, object], default: str,
                 routes: Mapping[str, tuple[str, str]]):
        """C{routes} maps a virtual bucket to (backend name, real bucket)."""
        self.backends = dict(backends)
        self.default = default
        self.routes = dict(routes)
        self.name = "router"

    def resolve(self, bucket: str) -> tuple[object, str]:
        backend_name, real = self.routes.get(bucket, (self.default, bucket))
        return self.backends[backend_name], real

    def backend_name(self, bucket: str) -> str:
        return self.routes.get(bucket, (self.default, bucket))[0]

    async def list_buckets(self):
        shown: dict[str, BucketInfo] = {}
        hidden_real = {(b, r) for b, r in self.routes.values()}
        for bucket in await self.backends[self.default].list_buckets():
            if (self.default, bucket.name) not in hidden_real:
                shown[bucket.name] = bucket
        for virtual, (backend_name, real) in self.routes.items():
            for bucket in await self.backends[backend_name].list_buckets():
                if bucket.name == real:
                    shown[virtual] = BucketInfo(virtual, bucket.created)
        return sorted(shown.values(), key=lambda b: b.name)

    def bucket_exists(self, bucket: str):
        backend, real = self.resolve(bucket)
        return backend.bucket_exists(real)

    def create_bucket(self, bucket: str):
        backend, real = self.resolve(bucket)
        return backend.create_bucket(real)

    def delete_bucket(self, bucket: str):
        backend, real = self.resolve(bucket)
        return backend.delete_bucket(real)

    def local_file(self, bucket: str, key: str):
        backend, real = self.resolve(bucket)
        local = getattr(backend, "local_file", None)
        return local(real, key) if local else None

    def can_assemble(self, bucket: str) -> bool:
        backend, real = self.resolve(bucket)
        can = getattr(backend, "can_assemble", None)
        return bool(can and can(real))

    def assemble(self, bucket: str, key: str, sources: list[str], meta):
        backend, real = self.resolve(bucket)
        return backend.assemble(real, key, sources, meta)

    def open_with_stat(self, bucket: str, key: str, byte_range=None):
        backend, real = self.resolve(bucket)
        return backend.open_with_stat(real, key, byte_range)

    def stat(self, bucket: str, key: str):
        backend, real = self.resolve(bucket)
        return backend.stat(real, key)

    def open_read(self, bucket: str, key: str, offset: int = 0, length: Optional[int] = None,
                  stored=None):
        backend, real = self.resolve(bucket)
        return backend.open_read(real, key, offset, length, stored)

    def discard(self, bucket: str, key: str):
        backend, real = self.resolve(bucket)
        return backend.discard(real, key)

    def open_write(self, bucket: str, key: str, size: Optional[int] = None, hint=None):
        backend, real = self.resolve(bucket)
        return backend.open_write(real, key, size=size, hint=hint)

    def delete(self, bucket: str, key: str):
        backend, real = self.resolve(bucket)
        return backend.delete(real, key)

    def list(self, bucket: str, prefix: str, delimiter: Optional[str], **hints):
        backend, real = self.resolve(bucket)
        return backend.list(real, prefix, delimiter, **hints)
