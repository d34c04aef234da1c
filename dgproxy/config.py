"""Configuration: YAML sections plus C{DGP_*} environment into one frozen object.

The file has four optional sections (C{admission}, C{access}, C{storage},
C{advanced}) shaped like the Rust proxy's. Environment variables beat the
file. Every error names the key and the file, so an operator can fix it
without reading code. The result is immutable: a reload builds a new one.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Optional

import yaml

DEFAULT_LISTEN = "127.0.0.1:9000"
CONFIG_SEARCH = ("./dgproxy.yaml", "/etc/dgproxy/dgproxy.yaml")

DEFAULT_DELTA_EXTENSIONS = (
    ".zip", ".tar", ".jar", ".war", ".ear", ".dmg", ".iso", ".sql", ".dump",
    ".bak", ".backup", ".img", ".qcow2", ".vmdk", ".bin",
)


class ConfigError(Exception):
    """A configuration problem, naming the key and where it came from."""

    def __init__(self, key: str, source: str, message: str):
        super().__init__(f"{source}: {key}: {message}")
        self.key = key
        self.source = source
        self.message = message


@dataclass(frozen=True)
class BucketPolicy:
    """Per-bucket settings from C{storage.buckets.<name>}."""

    compression: bool = True
    max_delta_ratio: Optional[float] = None
    backend: Optional[str] = None
    alias: Optional[str] = None
    public_prefixes: tuple[str, ...] = ()
    quota_bytes: Optional[int] = None


@dataclass(frozen=True)
class BackendConfig:
    """One storage backend from C{storage.backends[]} (or the singleton)."""

    name: str
    type: str  # "filesystem" | "s3"
    path: Optional[str] = None
    endpoint: Optional[str] = None
    region: str = "us-east-1"
    force_path_style: bool = True
    access_key_id: Optional[str] = None
    secret_access_key: Optional[str] = None
    encryption: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    """Everything the service is built from; see SPEC §1."""

    source: str = "<defaults>"
    listen_addr: str = DEFAULT_LISTEN
    data_dir: str = "./data"
    access_key_id: Optional[str] = None
    secret_access_key: Optional[str] = None
    authentication: Optional[str] = None
    iam_mode: str = "gui"
    buckets: Mapping[str, BucketPolicy] = field(default_factory=dict)
    log_level: str = "info"
    log_format: str = "text"
    clock_skew_seconds: int = 300
    max_delta_ratio: float = 0.75
    max_delta_object_size: int = 4 * 1024**3
    max_object_size: int = 5 * 1024**3
    delta_extensions: tuple[str, ...] = DEFAULT_DELTA_EXTENSIONS
    cache_mb: int = 100
    metadata_cache_mb: int = 50
    codec_concurrency: int = max(4 * (os.cpu_count() or 1), 4)
    max_multipart_uploads: int = 1000
    multipart_idle_ttl_hours: int = 24
    multipart_sweep_interval_secs: int = 300
    audit_ring_size: int = 500
    rate_limit_max_attempts: int = 100
    rate_limit_window_secs: int = 300
    rate_limit_lockout_secs: int = 600
    trust_proxy_headers: bool = False
    session_ttl_hours: int = 4
    config_sync_bucket: Optional[str] = None
    bootstrap_password_hash: Optional[str] = None
    encryption_key: Optional[str] = None
    s3_endpoint: Optional[str] = None
    s3_region: str = "us-east-1"
    backend_access_key_id: Optional[str] = None
    backend_secret_access_key: Optional[str] = None
    spool_dir: Optional[str] = None
    drain_timeout_secs: int = 30
    s3_connect_timeout_secs: int = 10
    s3_read_timeout_secs: int = 60
    virtual_host_domains: tuple[str, ...] = ("localhost",)
    named_backends: tuple[BackendConfig, ...] = ()
    backend_encryption: Mapping[str, Any] = field(default_factory=dict)
    singleton_backend: Optional[BackendConfig] = None
    default_backend: Optional[str] = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def open_access(self) -> bool:
        return (self.authentication or "").strip().lower() == "none"

    @property
    def listen_host_port(self) -> tuple[str, int]:
        return parse_listen_addr(self.listen_addr, "listen_addr", self.source)

    def bucket_policy(self, name: str) -> BucketPolicy:
        return self.buckets.get(name, BucketPolicy())

    @property
    def backends(self) -> tuple[BackendConfig, ...]:
        """Every backend: the named ones, or the single default one."""
        if self.named_backends:
            return self.named_backends
        enc = self.backend_encryption
        if self.s3_endpoint:  # the environment beats the file
            return (BackendConfig("default", "s3", endpoint=self.s3_endpoint,
                                  region=self.s3_region,
                                  access_key_id=self.backend_access_key_id,
                                  secret_access_key=self.backend_secret_access_key,
                                  encryption=enc),)
        if self.singleton_backend is not None and self.singleton_backend.type == "s3":
            return (replace(self.singleton_backend, encryption=enc),)
        return (BackendConfig("default", "filesystem", path=self.data_dir, encryption=enc),)

    @property
    def default_backend_name(self) -> str:
        return self.default_backend or self.backends[0].name


def parse_listen_addr(value: str, key: str, source: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not re.fullmatch(r"[0-9]{1,5}", port) or not (0 <= int(port) <= 65535):
        raise ConfigError(key, source, f"expected HOST:PORT, got {value!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


# --- schema -------------------------------------------------------------------

_SECTIONS = {"admission", "access", "storage", "advanced", "defaults"}
_ACCESS_KEYS = {"iam_mode", "authentication", "access_key_id", "secret_access_key",
                "iam_users", "iam_groups", "auth_providers", "group_mapping_rules"}
_STORAGE_KEYS = {"backend", "filesystem", "backends", "default_backend", "buckets",
                 "s3", "region", "force_path_style", "access_key_id",
                 "secret_access_key", "backend_encryption", "replication", "lifecycle"}
_BACKEND_KEYS = {"name", "type", "path", "endpoint", "region", "force_path_style",
                 "access_key_id", "secret_access_key", "allow_local", "encryption"}
_BUCKET_KEYS = {"compression", "max_delta_ratio", "backend", "alias", "public_prefixes",
                "public", "quota_bytes", "replication_target_only"}
# advanced key -> (Config field, converter)
_ADVANCED = {
    "listen_addr": ("listen_addr", str),
    "max_delta_ratio": ("max_delta_ratio", float),
    "max_object_size": ("max_object_size", int),
    "max_delta_object_size": ("max_delta_object_size", int),
    "cache_size_mb": ("cache_mb", int),
    "metadata_cache_mb": ("metadata_cache_mb", int),
    "codec_concurrency": ("codec_concurrency", int),
    "log_level": ("log_level", str),
    "log_format": ("log_format", str),
    "clock_skew_seconds": ("clock_skew_seconds", int),
    "config_sync_bucket": ("config_sync_bucket", str),
    "bootstrap_password_hash": ("bootstrap_password_hash", str),
    "delta_extensions": ("delta_extensions", None),
    "spool_dir": ("spool_dir", str),
    "max_multipart_uploads": ("max_multipart_uploads", int),
    "drain_timeout_secs": ("drain_timeout_secs", int),
    "virtual_host_domains": ("virtual_host_domains", "list"),
}
_IGNORED_ADVANCED = {"blocking_threads", "tls", "event_delivery",
                     "config_sync_object_key", "max_passthrough_object_size"}

# env var -> (Config field, converter)
_ENV = {
    "DGP_LISTEN_ADDR": ("listen_addr", str),
    "DGP_DATA_DIR": ("data_dir", str),
    "DGP_ACCESS_KEY_ID": ("access_key_id", str),
    "DGP_SECRET_ACCESS_KEY": ("secret_access_key", str),
    "DGP_AUTHENTICATION": ("authentication", str),
    "DGP_BOOTSTRAP_PASSWORD_HASH": ("bootstrap_password_hash", str),
    "DGP_CLOCK_SKEW_SECONDS": ("clock_skew_seconds", int),
    "DGP_CACHE_MB": ("cache_mb", int),
    "DGP_METADATA_CACHE_MB": ("metadata_cache_mb", int),
    "DGP_CODEC_CONCURRENCY": ("codec_concurrency", int),
    "DGP_MAX_MULTIPART_UPLOADS": ("max_multipart_uploads", int),
    "DGP_MULTIPART_IDLE_TTL_HOURS": ("multipart_idle_ttl_hours", int),
    "DGP_MULTIPART_SWEEP_INTERVAL_SECS": ("multipart_sweep_interval_secs", int),
    "DGP_AUDIT_RING_SIZE": ("audit_ring_size", int),
    "DGP_RATE_LIMIT_MAX_ATTEMPTS": ("rate_limit_max_attempts", int),
    "DGP_RATE_LIMIT_WINDOW_SECS": ("rate_limit_window_secs", int),
    "DGP_RATE_LIMIT_LOCKOUT_SECS": ("rate_limit_lockout_secs", int),
    "DGP_TRUST_PROXY_HEADERS": ("trust_proxy_headers", "bool"),
    "DGP_SESSION_TTL_HOURS": ("session_ttl_hours", int),
    "DGP_CONFIG_SYNC_BUCKET": ("config_sync_bucket", str),
    "DGP_ENCRYPTION_KEY": ("encryption_key", str),
    "DGP_MAX_DELTA_RATIO": ("max_delta_ratio", float),
    "DGP_MAX_OBJECT_SIZE": ("max_object_size", int),
    "DGP_LOG_LEVEL": ("log_level", str),
    "DGP_LOG_FORMAT": ("log_format", str),
    "DGP_S3_ENDPOINT": ("s3_endpoint", str),
    "DGP_S3_REGION": ("s3_region", str),
    "DGP_BE_AWS_ACCESS_KEY_ID": ("backend_access_key_id", str),
    "DGP_BE_AWS_SECRET_ACCESS_KEY": ("backend_secret_access_key", str),
    "DGP_SPOOL_DIR": ("spool_dir", str),
    "DGP_DRAIN_TIMEOUT_SECS": ("drain_timeout_secs", int),
    "DGP_S3_CONNECT_TIMEOUT_SECS": ("s3_connect_timeout_secs", int),
    "DGP_S3_READ_TIMEOUT_SECS": ("s3_read_timeout_secs", int),
    "DGP_VIRTUAL_HOST_DOMAINS": ("virtual_host_domains", "list"),
}

_ENV_REF = re.compile(r"\$\$|\$\{env:([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


def _comment_start(line: str) -> int:
    """Where a YAML comment starts on C{line} (outside quotes), or its length."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return i
    return len(line)


def expand_env(text: str, env: Mapping[str, str], source: str) -> str:
    """Expand C{${env:NAME}} and C{${env:NAME:-default}} outside comments;
    C{$$} is a literal C{$}."""
    lines = text.split("\n")
    out = []
    for line in lines:
        cut = _comment_start(line)
        out.append(_expand(line[:cut], env, source) + line[cut:])
    return "\n".join(out)


def _expand(text: str, env: Mapping[str, str], source: str) -> str:

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, default = m.group(1), m.group(2)
        value = env.get(name, default)
        if value is None:
            raise ConfigError(f"${{env:{name}}}", source, "environment variable is not set")
        if any(ord(c) < 32 for c in value):
            raise ConfigError(f"${{env:{name}}}", source, "value contains control characters")
        return value

    return _ENV_REF.sub(sub, text)


def _convert(value: Any, conv: Any, key: str, source: str) -> Any:
    try:
        if conv == "list":
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise ValueError(value)
            return tuple(i.strip().lower() for i in items if i.strip())
        if conv == "bool":
            if isinstance(value, bool):
                return value
            v = str(value).strip().lower()
            if v in ("true", "1", "yes", "on"):
                return True
            if v in ("false", "0", "no", "off"):
                return False
            raise ValueError(value)
        if conv is int and isinstance(value, bool):
            raise ValueError(value)
        if conv is int and isinstance(value, str):
            return int(value.strip())
        return conv(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(key, source, f"invalid value {value!r}") from None


def _mapping(value: Any, key: str, source: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(key, source, "expected a mapping")
    return value


def _check_keys(section: Mapping[str, Any], allowed: set[str], prefix: str, source: str) -> None:
    for k in section:
        if k not in allowed:
            raise ConfigError(f"{prefix}{k}", source, "unknown key")


def _parse_bucket(name: str, spec: Any, source: str) -> BucketPolicy:
    prefix = f"storage.buckets.{name}."
    spec = _mapping(spec, prefix.rstrip("."), source)
    _check_keys(spec, _BUCKET_KEYS, prefix, source)
    if not _BUCKET_NAME.match(str(name)):
        raise ConfigError(prefix.rstrip("."), source, "not a valid S3 bucket name")
    ratio = spec.get("max_delta_ratio")
    if ratio is not None:
        ratio = _convert(ratio, float, prefix + "max_delta_ratio", source)
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(prefix + "max_delta_ratio", source, "must be between 0.0 and 1.0")
    publics = spec.get("public_prefixes") or []
    if not isinstance(publics, list):
        raise ConfigError(prefix + "public_prefixes", source, "expected a list")
    for p in publics:
        if not isinstance(p, str) or (p and not p.endswith("/")) or ".." in p or "\0" in p or "//" in p:
            raise ConfigError(prefix + "public_prefixes", source,
                              f"{p!r}: each prefix must end with '/' and contain no '..', NUL or '//'")
    if spec.get("public"):
        if publics:
            raise ConfigError(prefix + "public", source, "cannot be combined with public_prefixes")
        publics = [""]
    quota = spec.get("quota_bytes")
    return BucketPolicy(
        compression=_convert(spec.get("compression", True), "bool", prefix + "compression", source),
        max_delta_ratio=ratio,
        backend=spec.get("backend"),
        alias=spec.get("alias"),
        public_prefixes=tuple(publics),
        quota_bytes=None if quota is None else _convert(quota, int, prefix + "quota_bytes", source),
    )


def _parse_backend(spec: Any, key: str, source: str, name: Optional[str] = None) -> BackendConfig:
    spec = _mapping(spec, key, source)
    _check_keys(spec, _BACKEND_KEYS, key + ".", source)
    name = name or spec.get("name")
    if not name or not isinstance(name, str):
        raise ConfigError(key + ".name", source, "every backend needs a name")
    kind = spec.get("type", "filesystem")
    if kind not in ("filesystem", "s3"):
        raise ConfigError(key + ".type", source, "must be 'filesystem' or 's3'")
    endpoint = spec.get("endpoint")
    if kind == "s3" and endpoint and not str(endpoint).startswith(("http://", "https://")):
        raise ConfigError(key + ".endpoint", source, "must start with http:// or https://")
    if kind == "filesystem" and ".." in str(spec.get("path", "")).split("/"):
        raise ConfigError(key + ".path", source, "must not contain '..'")
    return BackendConfig(
        name=name, type=kind, path=spec.get("path") or ("./data" if kind == "filesystem" else None),
        endpoint=endpoint, region=str(spec.get("region", "us-east-1")),
        force_path_style=_convert(spec.get("force_path_style", True), "bool",
                                  key + ".force_path_style", source),
        access_key_id=spec.get("access_key_id"), secret_access_key=spec.get("secret_access_key"),
        encryption=_parse_encryption(spec.get("encryption"), key + ".encryption", source))


_ENCRYPTION_KEYS = {"mode", "key", "key_id", "legacy_key", "legacy_key_id", "kms_key_id",
                    "bucket_key_enabled"}
_KEY_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def _parse_encryption(spec: Any, key: str, source: str) -> Mapping[str, Any]:
    """An C{encryption:} block: checked shape, values kept as written."""
    spec = dict(_mapping(spec, key, source))
    _check_keys(spec, _ENCRYPTION_KEYS, key + ".", source)
    mode = spec.setdefault("mode", "none")
    if mode not in ("none", "aes256-gcm-proxy", "sse-kms", "sse-s3"):
        raise ConfigError(key + ".mode", source,
                          "must be one of none, aes256-gcm-proxy, sse-kms, sse-s3")
    for field_name in ("key_id", "legacy_key_id"):
        value = spec.get(field_name)
        if value is not None and not _KEY_ID.match(str(value)):
            raise ConfigError(f"{key}.{field_name}", source, "must match [A-Za-z0-9_.-]{1,64}")
    for field_name in ("key", "legacy_key"):
        value = spec.get(field_name)
        if value not in (None, ""):
            try:
                raw = bytes.fromhex(str(value).strip())
            except ValueError:
                raise ConfigError(f"{key}.{field_name}", source, "invalid hex key") from None
            if len(raw) != 32:
                raise ConfigError(f"{key}.{field_name}", source,
                                  f"key must be 32 bytes (64 hex chars), got {len(raw)}")
    if bool(spec.get("legacy_key")) != bool(spec.get("legacy_key_id")):
        raise ConfigError(key + ".legacy_key", source,
                          "legacy_key and legacy_key_id go together")
    return spec


def from_mapping(doc: Mapping[str, Any], source: str, env: Mapping[str, str]) -> Config:
    """Build a L{Config} from a parsed YAML document and an environment."""
    doc = _mapping(doc, "<document>", source)
    _check_keys(doc, _SECTIONS, "", source)
    values: dict[str, Any] = {"source": source, "raw": doc}

    access = _mapping(doc.get("access"), "access", source)
    _check_keys(access, _ACCESS_KEYS, "access.", source)
    for k in ("access_key_id", "secret_access_key", "authentication"):
        if access.get(k) is not None:
            values[k] = str(access[k])
    mode = str(access.get("iam_mode", "gui"))
    if mode not in ("gui", "declarative"):
        raise ConfigError("access.iam_mode", source, "must be 'gui' or 'declarative'")
    values["iam_mode"] = mode

    storage = _mapping(doc.get("storage"), "storage", source)
    _check_keys(storage, _STORAGE_KEYS, "storage.", source)
    shorthands = [k for k in ("backend", "filesystem", "s3") if storage.get(k) is not None]
    if storage.get("s3") is None:
        for companion in ("region", "force_path_style", "access_key_id", "secret_access_key"):
            if companion in storage:
                raise ConfigError(f"storage.{companion}", source,
                                  "only valid together with the storage.s3 shorthand")
    if len(shorthands) > 1:
        raise ConfigError("storage." + shorthands[1], source,
                          "set only one of backend / filesystem / s3")
    if storage.get("filesystem") is not None:
        values["data_dir"] = str(storage["filesystem"])
    elif storage.get("s3") is not None:
        values["singleton_backend"] = _parse_backend(
            {"type": "s3", "endpoint": storage["s3"],
             **{k: storage[k] for k in ("region", "force_path_style", "access_key_id",
                                        "secret_access_key") if k in storage}},
            "storage.s3", source, name="default")
    elif storage.get("backend") is not None:
        single = _parse_backend(storage["backend"], "storage.backend", source, name="default")
        if single.type == "filesystem":
            if single.path:
                values["data_dir"] = single.path
        else:
            values["singleton_backend"] = single
    if storage.get("backend_encryption") is not None:
        values["backend_encryption"] = _parse_encryption(
            storage["backend_encryption"], "storage.backend_encryption", source)
    backends = storage.get("backends") or []
    if not isinstance(backends, list):
        raise ConfigError("storage.backends", source, "expected a list")
    named = tuple(_parse_backend(b, f"storage.backends[{i}]", source)
                  for i, b in enumerate(backends))
    names = [b.name for b in named]
    for n in names:
        if names.count(n) > 1:
            raise ConfigError("storage.backends", source, f"duplicate backend name {n!r}")
    values["named_backends"] = named
    if storage.get("default_backend") is not None:
        default = str(storage["default_backend"])
        if default not in names:
            raise ConfigError("storage.default_backend", source,
                              f"names backend {default!r}, which is not in storage.backends")
        values["default_backend"] = default
    buckets = _mapping(storage.get("buckets"), "storage.buckets", source)
    values["buckets"] = {str(n): _parse_bucket(str(n), s, source) for n, s in buckets.items()}
    for bname, policy in values["buckets"].items():
        if policy.backend is not None and policy.backend not in names and policy.backend != "default":
            raise ConfigError(f"storage.buckets.{bname}.backend", source,
                              f"bucket {bname!r} is routed to backend {policy.backend!r}, "
                              "which is not defined in storage.backends")

    advanced = _mapping(doc.get("advanced"), "advanced", source)
    _check_keys(advanced, set(_ADVANCED) | _IGNORED_ADVANCED, "advanced.", source)
    for key, (fname, conv) in _ADVANCED.items():
        if key not in advanced or advanced[key] is None:
            continue
        if key == "delta_extensions":
            exts = advanced[key]
            if not isinstance(exts, list) or not all(isinstance(e, str) and e for e in exts):
                raise ConfigError("advanced.delta_extensions", source, "expected a list of extensions")
            values[fname] = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in exts)
        else:
            values[fname] = _convert(advanced[key], conv, "advanced." + key, source)

    for var, (fname, conv) in _ENV.items():
        if env.get(var) not in (None, ""):
            values[fname] = _convert(env[var], conv, var, "environment")
    if env.get("DGP_LOG_FORMAT") not in (None, "", "text", "json"):
        raise ConfigError("DGP_LOG_FORMAT", "environment", "must be 'text' or 'json'")
    return _validated(Config(**values))


def _validated(cfg: Config) -> Config:
    cfg.listen_host_port  # raises on a bad address
    if cfg.log_format not in ("text", "json"):
        raise ConfigError("log_format", cfg.source, "must be 'text' or 'json'")
    if cfg.authentication is not None and not cfg.open_access:
        raise ConfigError("access.authentication", cfg.source,
                          f"unrecognised value {cfg.authentication!r}; only 'none' is accepted")
    if bool(cfg.access_key_id) != bool(cfg.secret_access_key):
        raise ConfigError("access.access_key_id", cfg.source,
                          "set both access_key_id and secret_access_key, or neither")
    if not 0.0 <= cfg.max_delta_ratio <= 1.0:
        raise ConfigError("max_delta_ratio", cfg.source, "must be between 0.0 and 1.0")
    for name, value in (("clock_skew_seconds", cfg.clock_skew_seconds),
                        ("codec_concurrency", cfg.codec_concurrency),
                        ("cache_mb", cfg.cache_mb),
                        ("DGP_S3_CONNECT_TIMEOUT_SECS", cfg.s3_connect_timeout_secs),
                        ("DGP_S3_READ_TIMEOUT_SECS", cfg.s3_read_timeout_secs)):
        if value < 1:
            raise ConfigError(name, cfg.source, "must be at least 1")
    if cfg.metadata_cache_mb < 0:
        raise ConfigError("metadata_cache_mb", cfg.source, "must be 0 (no cache) or more")
    return cfg


def find_config_file(explicit: Optional[str], env: Mapping[str, str]) -> Optional[str]:
    """SPEC §1 lookup: --config, $DGP_CONFIG, ./dgproxy.yaml, /etc/dgproxy/dgproxy.yaml."""
    if explicit:
        return explicit
    if env.get("DGP_CONFIG"):
        return env["DGP_CONFIG"]
    for candidate in CONFIG_SEARCH:
        if os.path.exists(candidate):
            return candidate
    return None


def load(path: Optional[str] = None, env: Optional[Mapping[str, str]] = None) -> Config:
    """Load the config file (if any) and apply the environment on top."""
    env = os.environ if env is None else env
    path = find_config_file(path, env)
    if path is None:
        return from_mapping({}, "<defaults>", env)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError("<file>", path, f"cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("<file>", path, "is not UTF-8 text") from None
    text = expand_env(text, env, path)
    try:
        doc = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, RecursionError) as e:
        raise ConfigError("<document>", path, f"does not parse: {e}") from None
    return from_mapping(doc or {}, path, env)
