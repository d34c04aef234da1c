"""Builds every part of a running dgproxy once and wires them together.

This is the only module that constructs the parts; everything else gets
what it needs passed in.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Optional

from twisted.application import internet, service
from twisted.internet import defer, reactor, task
from twisted.logger import ILogObserver, Logger

from dgproxy import __version__
from dgproxy.admin.jobs import ReencryptResource
from dgproxy.admin.tree import build_admin_root
from dgproxy.observability.health import Readiness, health_doc
from dgproxy.observability.logging import LogLevelError, make_observer
from dgproxy.observability.metrics import Metrics, MetricsResource, PrometheusEngineStats
from dgproxy.storage.reencrypt import ReencryptJobs
from dgproxy.auth.authenticator import Authenticator
from dgproxy.config import Config, ConfigError, load
from dgproxy.engine.codec import Codec, check_xdelta3
from dgproxy.engine.policy import DeltaPolicy
from dgproxy.engine.references import ReferenceCache, References
from dgproxy.engine.spool import Spool
from dgproxy.engine.multipart import Multipart
from dgproxy.engine.store import ObjectStore
from dgproxy.s3.multipart_ops import MultipartOperations
from dgproxy.http.site import DGSite
from dgproxy.s3.front import S3Front
from dgproxy.s3.operations import Operations
from dgproxy.storage.credentials import BackendCredentials, CredentialsUnavailable
from dgproxy.storage.encrypting import EncryptingBackend, KeyRing, derive_key_id, parse_key
from dgproxy.storage.filesystem import FilesystemBackend, XattrUnsupported
from dgproxy.storage.interface import StorageError
from dgproxy.storage.routing import RoutingBackend
from dgproxy.storage.metacache import MetadataCache
from dgproxy.storage.s3 import S3Backend
from dgproxy.storage.s3client import S3Client, default_endpoint, probe_blocking
from dgproxy.sockets import tune_tcp

log = Logger(namespace="dgproxy")

CACHE_WARNING = ("[cache] In-memory reference cache is only {mb} MB — "
                 "recommend ≥1024 MB for production")
NO_AUTH_MESSAGE = (
    "FATAL: No authentication configured. dgproxy refuses to start without S3 "
    "credentials: set DGP_ACCESS_KEY_ID + DGP_SECRET_ACCESS_KEY (or access.access_key_id / "
    "access.secret_access_key), or DGP_AUTHENTICATION=none for explicit open access.")


class Fatal(Exception):
    """A start-up problem the operator must fix; printed as one line."""


class DrainingService(service.MultiService):
    """Stops listening first, then waits (bounded) for in-flight requests."""

    def __init__(self, site: DGSite, drain_timeout: int, log_observer=None):
        super().__init__()
        self.site = site
        self.drain_timeout = drain_timeout
        self.log_observer = log_observer

    def setServiceParent(self, parent):
        super().setServiceParent(parent)
        # twistd starts logging with the application's ILogObserver, if it has one.
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.log_observer)

    async def _drain(self) -> None:
        """Let in-flight requests finish, then close every connection once its
        response is written, all within the drain timeout."""
        self.site.draining = True
        deadline = reactor.seconds() + self.drain_timeout
        pending = list(self.site.inflight)
        if pending:
            log.info("Draining {n} in-flight request(s) (up to {t}s)", n=len(pending),
                     t=self.drain_timeout)
            await _within(defer.DeferredList(pending, consumeErrors=True),
                          deadline - reactor.seconds())
        closing = self.site.close_connections()
        if closing:
            await _within(defer.DeferredList(closing, consumeErrors=True),
                          max(0.0, deadline - reactor.seconds()))
        # twistd would re-raise SIGTERM to exit; a completed drain is a clean exit.
        if getattr(reactor, "_exitSignal", None) == signal.SIGTERM:
            reactor._exitSignal = None

    def stopService(self):
        d = defer.maybeDeferred(super().stopService)
        d.addCallback(lambda _: defer.ensureDeferred(self._drain()))
        return d


async def _within(d: defer.Deferred, seconds: float) -> None:
    """Wait for C{d}, at most C{seconds}."""
    timeout = task.deferLater(reactor, max(0.0, seconds), lambda: None)
    await defer.DeferredList([d, timeout], fireOnOneCallback=True, consumeErrors=True)
    if not timeout.called:
        timeout.cancel()


def env_suffix(backend_name: str) -> str:
    return backend_name.upper().replace("-", "_").replace(".", "_")


def encryption_for(bc, env) -> tuple[KeyRing, Optional[dict], list[tuple[str, str]]]:
    """The key ring and native-SSE settings of one backend, and the start-up
    messages (level, text) about them. Env supplies only the secrets."""
    enc = dict(bc.encryption or {})
    mode = enc.get("mode", "none")
    singleton = bc.name == "default"
    key_var = "DGP_ENCRYPTION_KEY" if singleton else f"DGP_BACKEND_{env_suffix(bc.name)}_ENCRYPTION_KEY"
    kms_var = "DGP_SSE_KMS_KEY_ID" if singleton else f"DGP_BACKEND_{env_suffix(bc.name)}_SSE_KMS_KEY_ID"
    messages = []
    key = legacy = None
    key_hex = enc.get("key")
    if mode == "aes256-gcm-proxy":
        if env.get(key_var):
            key_hex = env[key_var]
        elif key_hex:
            messages.append(("warn", f"backend '{bc.name}' encryption key was loaded from config "
                                     f"file (not {key_var}). Keep an off-box backup of the key; if "
                                     "the config file is lost, all encrypted objects on this "
                                     "backend become unrecoverable."))
        if key_hex:
            key = parse_key(key_hex, f"backend '{bc.name}' key")
        else:
            messages.append(("warn", f"backend '{bc.name}' has encryption mode aes256-gcm-proxy "
                                     "but no key is configured — writes will NOT be encrypted on "
                                     f"this backend. Check YAML or env var ({key_var})."))
    if enc.get("legacy_key"):
        legacy = parse_key(enc["legacy_key"], f"backend '{bc.name}' legacy_key")
    ring = KeyRing(
        backend=bc.name, key=key,
        key_id=enc.get("key_id") or (derive_key_id(bc.name, key) if key else None),
        legacy_key=legacy,
        legacy_key_id=enc.get("legacy_key_id") or (
            derive_key_id(f"{bc.name}::legacy", legacy) if legacy else None))
    if key is not None:
        messages.append(("info", f"backend '{bc.name}' encryption: ENABLED (AES-256-GCM proxy, "
                                 f"key_id={ring.key_id})"))
    if legacy is not None:
        messages.append(("info", f"backend '{bc.name}' decrypt-only shim active (legacy "
                                 f"key_id='{ring.legacy_key_id}') — reads of objects stamped with "
                                 "that id will decrypt with legacy_key; new writes use the current "
                                 "mode."))
    native = None
    if mode in ("sse-kms", "sse-s3"):
        if bc.type != "s3":
            raise Fatal(f"backend '{bc.name}' uses a native S3 encryption mode ({mode}) on a "
                        "filesystem backend — native modes require S3. Change mode to "
                        "'aes256-gcm-proxy' or 'none'.")
        native = {"mode": mode, "kms_key_id": env.get(kms_var) or enc.get("kms_key_id"),
                  "bucket_key_enabled": enc.get("bucket_key_enabled", True)}
        if mode == "sse-kms" and not native["kms_key_id"]:
            raise Fatal(f"backend '{bc.name}' uses sse-kms but no kms_key_id is configured "
                        f"(encryption.kms_key_id or {kms_var})")
        messages.append(("info", f"backend '{bc.name}' encryption: ENABLED (native {mode})"))
    return ring, native, messages


def check_key_ids(rings: list[KeyRing], explicit: dict[str, Optional[str]]) -> None:
    """Two backends may share an explicit key_id only with the same key bytes."""
    seen: dict[str, KeyRing] = {}
    for ring in rings:
        if ring.key is None or not explicit.get(ring.backend):
            continue
        other = seen.get(ring.key_id)
        if other is not None and other.key != ring.key:
            raise Fatal(f"backends {other.backend} and {ring.backend} share key_id "
                        f"'{ring.key_id}' but declare DIFFERENT keys. Either make the keys "
                        "identical (intentional cross-backend portability) or give each backend a "
                        "distinct key_id.")
        seen[ring.key_id] = ring


def build_backends(config: Config, spool: Spool, metrics: Metrics,
                   list_metadata: MetadataCache):
    """Every configured backend, checked, behind a router when there are
    several or any bucket is routed; returns (backend, start-up log lines).
    S3 backends report their requests into C{metrics} and keep what their
    listings learn in C{list_metadata} (one budget for all)."""
    backends = {}
    lines = []
    rings = []
    default = config.default_backend_name
    routes = {}
    for bucket, policy in config.buckets.items():
        if policy.backend is not None:
            target = default if policy.backend == "default" else policy.backend
            routes[bucket] = (target, policy.alias or bucket)
    placed = {bucket: routes.get(bucket, (default, bucket)) for bucket in config.buckets}
    for bc in config.backends:
        try:
            ring, native, messages = encryption_for(bc, os.environ)
        except ValueError as e:
            raise Fatal(str(e)) from None
        rings.append(ring)
        for level, text in messages:
            (log.warn if level == "warn" else log.info)("{text}", text=text)
        if bc.type == "filesystem":
            fs = FilesystemBackend(bc.path or config.data_dir, bc.name)
            try:
                swept = fs.prepare()
            except XattrUnsupported as e:
                raise Fatal(str(e)) from None
            except OSError as e:
                raise Fatal(f"Cannot use data directory {fs.root}: {e.strerror}") from None
            backends[bc.name] = fs
            lines.append(f"Backend '{bc.name}': filesystem at {fs.root} "
                         f"({swept} stale temp file(s) swept)")
        else:
            try:
                credentials = BackendCredentials.resolve(bc.access_key_id, bc.secret_access_key)
            except CredentialsUnavailable as e:
                raise Fatal(f"S3 backend '{bc.name}' has no usable credentials: {e}") from None
            try:
                client = S3Client(reactor, bc.name, bc.endpoint or default_endpoint(bc.region),
                                  bc.region, credentials, bc.force_path_style,
                                  connect_timeout=config.s3_connect_timeout_secs,
                                  read_timeout=config.s3_read_timeout_secs)
            except ValueError as e:
                raise Fatal(f"S3 backend '{bc.name}': {e}") from None
            client.report = metrics.backend(bc.name)
            try:
                listed = probe_blocking(client, timeout=client.connect_timeout)
            except StorageError as e:
                raise Fatal(f"S3 backend '{bc.name}' at {client.endpoint} failed its start-up "
                            f"check: {e}") from None
            backends[bc.name] = S3Backend(client, spool, native_sse=native,
                                          full_list_metadata=ring.key is not None
                                          or ring.legacy_key is not None,
                                          declared=tuple(real for name, real in placed.values()
                                                         if name == bc.name),
                                          metadata=list_metadata)
            credentials.start_renewing(reactor, bc.name)
            lines.append(f"Backend '{bc.name}': S3 at {client.endpoint} (region {bc.region}), "
                         f"{credentials.describe()}"
                         + (f", through proxy {client.proxy!r}" if client.proxy else ""))
            if not listed:
                lines.append(f"Backend '{bc.name}': ListBuckets is denied to these credentials "
                             f"(AccessDenied), so they are valid; buckets are listed from the "
                             f"config instead")
    check_key_ids(rings, {bc.name: (bc.encryption or {}).get("key_id") for bc in config.backends})
    for ring in rings:
        backends[ring.backend] = EncryptingBackend(backends[ring.backend], ring)
    for bucket, (target, real) in routes.items():
        lines.append(f"Bucket '{bucket}' → backend '{target}' as '{real}'")
    for bucket, (name, real) in placed.items():
        inner = backends[name].inner
        if isinstance(inner, FilesystemBackend):
            try:
                os.makedirs(os.path.join(inner.root, real, "deltaspaces"), exist_ok=True)
            except OSError as e:
                raise Fatal(f"Cannot create declared bucket {bucket!r}: {e.strerror}") from None
    if len(backends) == 1 and not routes:
        return backends[default], lines
    return RoutingBackend(backends, default, routes), lines


# glibc gives allocations above its mmap threshold pages of their own, and
# frees them back at once; every 1 MiB socket read then costs 256 page faults
# (measured: about a third of the CPU of a 1 MiB GET through the S3 backend).
# Buffers up to this size come from the heap instead, which keeps this much
# free memory at its top before returning any to the kernel.
MALLOC_MMAP_THRESHOLD = 4 * 1024 * 1024
MALLOC_TRIM_THRESHOLD = 32 * 1024 * 1024


def tune_allocator() -> bool:
    """Keep body-sized buffers on the heap (glibc only; elsewhere a no-op)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, MALLOC_MMAP_THRESHOLD)
                and mallopt(m_trim_threshold, MALLOC_TRIM_THRESHOLD))


def build(config: Config) -> DrainingService:
    """Check the configuration and the environment, then build the service."""
    tune_allocator()
    tune_tcp()
    if not config.open_access and not config.access_key_id:
        raise Fatal(NO_AUTH_MESSAGE)
    try:
        xdelta3_version = check_xdelta3()
    except RuntimeError as e:
        raise Fatal(str(e)) from None
    spool = Spool(config.spool_dir)
    try:
        spool_swept = spool.prepare()
    except OSError as e:
        raise Fatal(f"Cannot use spool directory {spool.directory}: {e.strerror}") from None
    default_type = next(b.type for b in config.backends if b.name == config.default_backend_name)
    metrics = Metrics(default_type)
    list_metadata = MetadataCache(config.metadata_cache_mb * 1024 * 1024)
    backend, descriptions = build_backends(config, spool, metrics, list_metadata)
    codec = Codec(reactor, config.codec_concurrency)
    cache = ReferenceCache(config.cache_mb * 1024 * 1024)
    store = ObjectStore(backend, config.max_object_size, DeltaPolicy.from_config(config), codec,
                        References(backend, cache, spool), spool, PrometheusEngineStats(metrics))
    authenticator = Authenticator(config.access_key_id, config.secret_access_key,
                                  config.open_access, config.clock_skew_seconds)
    operations = Operations(store, config.max_object_size)
    multipart = Multipart(store, config.max_multipart_uploads, config.multipart_idle_ttl_hours)
    operations.on_bucket_deleted = multipart.forget_bucket
    front = S3Front(authenticator, operations, MultipartOperations(operations, multipart),
                    config.virtual_host_domains, metrics)
    metrics.watch(cache, codec, multipart, list_metadata)
    readiness = Readiness(backend.backends[backend.default] if isinstance(backend, RoutingBackend)
                          else backend)
    front.write_gate = lambda bucket: jobs.blocked(bucket)
    jobs = ReencryptJobs(backend)
    admin = build_admin_root(lambda: (200, health_doc(config, cache)), readiness.report,
                             reencrypt=ReencryptResource(authenticator, jobs, backend.bucket_exists),
                             metrics=MetricsResource(metrics))
    site = DGSite(front, admin, metrics)
    site.displayTracebacks = False

    host, port = config.listen_host_port
    try:
        observer = make_observer(config.log_level, config.log_format)
    except LogLevelError as e:
        raise Fatal(f"DGP_LOG_LEVEL: {e}") from None
    top = DrainingService(site, config.drain_timeout_secs, observer)
    readiness.start()
    internet.TCPServer(port, site, interface=host).setServiceParent(top)
    sweeper = internet.TimerService(config.multipart_sweep_interval_secs,
                                    lambda: defer.ensureDeferred(multipart.sweep_all()))
    sweeper.setServiceParent(top)
    reactor.callWhenRunning(lambda: defer.ensureDeferred(jobs.resume_all()).addErrback(
        lambda f: log.failure("Resuming re-encrypt jobs failed", f)))

    log.info("dgproxy {version} starting on {addr}", version=__version__, addr=config.listen_addr)
    log.info("Config: {source}", source=config.source)
    for line in descriptions:
        log.info("{line}", line=line)
    log.info("Reference cache: {mb} MB; codec slots: {slots} ({xdelta3}); spool: {spool} "
             "({spool_swept} stale file(s) swept)", mb=config.cache_mb,
             slots=config.codec_concurrency, xdelta3=xdelta3_version, spool=spool.directory,
             spool_swept=spool_swept)
    if authenticator.open_access:
        log.warn("Authentication: none — all S3 data is accessible without credentials")
    else:
        log.info("Authentication: SigV4 with access key {akid}", akid=config.access_key_id)
    if config.cache_mb < 1024:
        log.warn(CACHE_WARNING.format(mb=config.cache_mb))
    return top


def make_service(config_path: str | None) -> service.IService:
    """The twistd entry point: print one line and exit 1 on a fatal problem."""
    try:
        return build(load(config_path))
    except ConfigError as e:
        sys.stderr.write(f"dgproxy: config error: {e}\n")
    except Fatal as e:
        sys.stderr.write(f"dgproxy: {e}\n")
    sys.stderr.flush()
    raise SystemExit(1)
