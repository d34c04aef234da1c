"""Rewrite a bucket's blobs under its backend's current encryption key.

After a key rotation (new key plus the old one as C{legacy_key}), or after
turning encryption on or off, old blobs still carry the old state. The job
walks the bucket in key order and rewrites every blob whose state differs
from the backend's (fact sheet encryption §A4): it reads through the
decrypting wrapper (the legacy shim included) and writes through the
encrypting one, each rewrite atomic. Progress and a cursor are kept in
C{.dg/jobs/reencrypt.json} on the backend itself, so a crashed or restarted
process resumes where it stopped. While a job runs, the S3 front answers
writes to the bucket with 503 SlowDown. A job may be held to a byte rate, so
that rewriting a large bucket leaves the backend room for clients' reads.
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime, timezone
from typing import Optional

from twisted.internet import defer, task
from twisted.logger import Logger

from dgproxy.storage.encrypting import KEY_ID, MARKER, NATIVE, EncryptingBackend, EncryptionError
from dgproxy.storage.interface import StorageError
from dgproxy.storage.metadata import PASSTHROUGH, ObjectMetadata
from dgproxy.streams import drain, read_all

log = Logger(namespace="dgproxy.reencrypt")

STATE_KEY = ".dg/jobs/reencrypt.json"
SAVE_EVERY_SECONDS = 2.0


def needs_rewrite(meta: Optional[ObjectMetadata], backend: EncryptingBackend) -> bool:
    if meta is None or NATIVE in meta.user_metadata:
        return False
    marker = meta.user_metadata.get(MARKER)
    keys = backend.keys
    if marker is None:
        return keys.encrypts
    if not keys.encrypts:
        return True
    return meta.user_metadata.get(KEY_ID) != keys.key_id


class Pacer:
    """Holds a job to an average of C{rate} bytes per second (None: no limit)
    by sleeping between rewrites once it is ahead of that rate."""

    def __init__(self, rate: Optional[float], clock):
        self.rate = rate
        self.clock = clock
        self.began = clock.seconds()
        self.done = 0

    async def account(self, nbytes: int) -> None:
        self.done += nbytes
        if not self.rate:
            return
        ahead = self.done / self.rate - (self.clock.seconds() - self.began)
        if ahead > 0:
            await task.deferLater(self.clock, ahead, lambda: None)


class ReencryptJobs:
    """Runs at most one job per bucket in this process; gates writes meanwhile."""

    def __init__(self, router, clock=None):
        from twisted.internet import reactor
        self.router = router  # RoutingBackend or a single backend
        self.clock = clock or reactor
        self.running: dict[str, dict] = {}

    def blocked(self, bucket: str) -> bool:
        return bucket in self.running

    def _backend(self, bucket: str) -> tuple[EncryptingBackend, str]:
        if hasattr(self.router, "resolve"):
            return self.router.resolve(bucket)
        return self.router, bucket

    async def _load(self, backend, real: str) -> Optional[dict]:
        source = await backend.inner.open_read(real, STATE_KEY)
        if source is None:
            return None
        try:
            return json.loads(await read_all(source, 1024 * 1024))
        except ValueError:
            return None

    async def _save(self, backend, real: str, state: dict) -> None:
        data = json.dumps(state).encode()
        writer = await backend.inner.open_write(real, STATE_KEY)
        await writer.write(data)
        await writer.commit(ObjectMetadata(
            tool="dgproxy", original_name="reencrypt.json", file_sha256="", file_size=len(data),
            md5=hashlib.md5(data).hexdigest(), created_at=datetime.now(timezone.utc),
            note=PASSTHROUGH))

    async def status(self, bucket: str) -> Optional[dict]:
        if bucket in self.running:
            return dict(self.running[bucket])
        backend, real = self._backend(bucket)
        return await self._load(backend, real)

    def start(self, bucket: str, max_bytes_per_second: Optional[float] = None) -> dict:
        """Start the job for C{bucket}, or return the running one's state."""
        if bucket in self.running:
            return dict(self.running[bucket])
        state = {"bucket": bucket, "status": "running", "cursor": "", "rewritten": 0,
                 "skipped": 0, "failed": 0, "total": None, "errors": [],
                 "max_bytes_per_second": max_bytes_per_second,
                 "started": datetime.now(timezone.utc).isoformat()}
        self.running[bucket] = state
        defer.ensureDeferred(self._run(bucket, state)).addErrback(
            lambda f: log.failure("Re-encrypt job for {bucket} crashed", f, bucket=bucket))
        return dict(state)

    async def resume_all(self) -> None:
        """At start-up: resume every job a previous process left running."""
        for bucket in await self.router.list_buckets():
            try:
                backend, real = self._backend(bucket.name)
                state = await self._load(backend, real)
            except StorageError:
                continue
            if state and state.get("status") == "running":
                log.info("Resuming re-encrypt job for {bucket} after key {cursor!r}",
                         bucket=bucket.name, cursor=state.get("cursor", ""))
                self.running[bucket.name] = state
                defer.ensureDeferred(self._run(bucket.name, state))

    async def _run(self, bucket: str, state: dict) -> None:
        backend, real = self._backend(bucket)
        try:
            objects, _ = await backend.inner.list(real, "", None)
            state["total"] = len(objects)
            await self._save(backend, real, state)
            last_save = time.monotonic()
            pacer = Pacer(state.get("max_bytes_per_second"), self.clock)
            for obj in objects:
                if obj.key <= state["cursor"] or obj.key == STATE_KEY:
                    continue
                try:
                    stored = await backend.inner.stat(real, obj.key)
                    if stored is not None and needs_rewrite(stored.metadata, backend):
                        await pacer.account(
                            await self._rewrite(backend, real, obj.key, stored.metadata))
                        state["rewritten"] += 1
                    else:
                        state["skipped"] += 1
                except (StorageError, EncryptionError) as e:
                    state["failed"] += 1
                    if len(state["errors"]) < 100:
                        state["errors"].append({"key": obj.key, "error": str(e)})
                    log.error("Re-encrypt of {bucket}/{key} failed: {error}", bucket=bucket,
                              key=obj.key, error=str(e))
                state["cursor"] = obj.key
                if time.monotonic() - last_save > SAVE_EVERY_SECONDS:
                    await self._save(backend, real, state)
                    last_save = time.monotonic()
            state["status"] = "succeeded" if not state["failed"] else "failed"
        except Exception as e:
            state["status"] = "failed"
            state["errors"].append({"key": None, "error": str(e)})
            raise
        finally:
            state["finished"] = datetime.now(timezone.utc).isoformat()
            try:
                await self._save(backend, real, state)
            finally:
                self.running.pop(bucket, None)
            log.info("Re-encrypt job for {bucket}: {status} ({rewritten} rewritten, "
                     "{skipped} already current, {failed} failed)", bucket=bucket,
                     status=state["status"], rewritten=state["rewritten"],
                     skipped=state["skipped"], failed=state["failed"])

    async def _rewrite(self, backend: EncryptingBackend, real: str, key: str,
                       meta: ObjectMetadata) -> int:
        """Rewrite one blob; returns the plaintext bytes moved."""
        source = await backend.open_read(real, key)
        if source is None:
            return 0
        writer = await backend.open_write(real, key)
        try:
            moved = await drain(source, writer.write)
            await writer.commit(meta)
        except BaseException:
            writer.abort()
            raise
        return moved
