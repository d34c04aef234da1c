"""Which bucket and key a request addresses, and whether they are acceptable."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Optional, Sequence
from urllib.parse import unquote_to_bytes

from dgproxy.s3 import errors
from dgproxy.storage.metadata import DELTA_SUFFIX, REFERENCE_NAME

MAX_KEY_BYTES = 1024
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_TEMP_NAME = re.compile(r"^(?:\.dgtmp\.[0-9a-f]{16}|\.tmp[A-Za-z0-9]{6})$")
_RESERVED_BUCKET_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_RESERVED_BUCKET_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")


@dataclass(frozen=True)
class Target:
    """The bucket and key of a request (either may be absent)."""

    bucket: Optional[str]
    key: Optional[str]


def _decode(raw: bytes, what: str) -> str:
    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise errors.InvalidArgument(f"The {what} is not valid UTF-8.") from None


def parse_target(raw_path: bytes, host: Optional[str],
                 virtual_host_domains: Sequence[str]) -> Target:
    """Path-style C{/bucket/key}, or virtual-host style C{bucket.domain/key}."""
    if not raw_path.startswith(b"/"):
        raise errors.InvalidRequest("The request path must start with '/'.")
    bucket_from_host = None
    if host:
        hostname = host.rsplit(":", 1)[0] if not host.startswith("[") else host
        hostname = hostname.lower().rstrip(".")
        for domain in virtual_host_domains:
            suffix = "." + domain.lower()
            if hostname.endswith(suffix) and len(hostname) > len(suffix):
                bucket_from_host = hostname[: -len(suffix)]
                break
    path = raw_path[1:]
    if bucket_from_host is not None:
        return Target(bucket_from_host, _decode(path, "key") if path else None)
    if not path:
        return Target(None, None)
    bucket_raw, slash, key_raw = path.partition(b"/")
    bucket = _decode(bucket_raw, "bucket name")
    key = _decode(key_raw, "key") if slash and key_raw else None
    return Target(bucket, key)


def check_bucket_name(name: str) -> None:
    """S3's bucket naming rules (InvalidBucketName)."""
    if (not _BUCKET_RE.match(name) or ".." in name or ".-" in name or "-." in name
            or name.startswith(_RESERVED_BUCKET_PREFIXES)
            or name.endswith(_RESERVED_BUCKET_SUFFIXES)):
        raise errors.InvalidBucketName(BucketName=name)
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        return
    raise errors.InvalidBucketName(BucketName=name)


def check_key(key: str, *, ingest: bool) -> None:
    """Keys dgproxy can store safely; C{ingest} adds the rules for writes."""
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise errors.KeyTooLongError()
    if "\0" in key or "\\" in key:
        raise errors.InvalidArgument("Object keys may not contain NUL or backslash characters.")
    parts = key.split("/")
    if any(p == ".." for p in parts) or parts[-1] == ".":
        raise errors.InvalidArgument("Object keys may not contain '..' segments.")
    if key.startswith("/"):
        raise errors.InvalidArgument("Object keys may not start with '/'.")
    if parts[0] == ".dg":
        raise errors.InvalidArgument("The prefix '.dg/' is reserved for internal use.")
    name = parts[-1]
    if name == REFERENCE_NAME:
        raise errors.InvalidArgument("The filename 'reference.bin' is reserved for internal use.")
    if name.endswith(DELTA_SUFFIX):
        raise errors.InvalidArgument("Filenames ending in '.delta' are reserved for internal use.")
    if not name:
        raise errors.InvalidArgument("Object keys ending in '/' are not supported.")
    if _TEMP_NAME.match(name):
        raise errors.InvalidArgument("This filename is reserved for dgproxy's temporary files.")
    if ingest and any(p in ("", ".") for p in parts):
        raise errors.InvalidArgument("Object keys may not contain empty or '.' segments.")
