"""Per-object metadata in the Rust proxy's format (fact sheet storage §2).

On the filesystem it is one xattr, C{user.dg.metadata}, holding compact JSON;
the field order and optional-field rules follow the Rust serializer so both
proxies read each other's data directories.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Mapping, Optional

XATTR_NAME = "user.dg.metadata"
REFERENCE_NAME = "reference.bin"
DELTA_SUFFIX = ".delta"
INTERNAL_REFERENCE_NAME = "__reference__"
EMPTY_MD5 = "d41d8cd98f00b204e9800998ecf8427e"

PASSTHROUGH, DELTA, REFERENCE = "passthrough", "delta", "reference"


class MetadataError(ValueError):
    """Stored metadata that cannot be understood."""


def format_timestamp(when: datetime) -> str:
    """RFC 3339 in UTC with a Z suffix, as chrono writes it."""
    when = when.astimezone(timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


_TS = re.compile(r"^([0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2})(?:\.([0-9]{1,9}))?"
                 r"(Z|[+-][0-9]{2}:[0-9]{2})?$")


def parse_timestamp(text: str) -> datetime:
    m = _TS.match(text.strip())
    if not m:
        raise MetadataError(f"bad timestamp {text!r}")
    base, frac, zone = m.groups()
    micro = int((frac or "0")[:6].ljust(6, "0"))
    try:  # fields by position: the pattern fixed them (strptime is slow)
        when = datetime(int(base[0:4]), int(base[5:7]), int(base[8:10]), int(base[11:13]),
                        int(base[14:16]), int(base[17:19]), micro)
    except ValueError:
        raise MetadataError(f"bad timestamp {text!r}") from None
    if zone in (None, "Z"):
        return when.replace(tzinfo=timezone.utc)
    sign = 1 if zone[0] == "+" else -1
    offset = timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6])) * sign
    try:
        return (when - offset).replace(tzinfo=timezone.utc)
    except OverflowError:
        raise MetadataError(f"timestamp out of range {text!r}") from None


def _json_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MetadataError(f"{name} is not an integer")
    return value


@dataclass(frozen=True)
class ObjectMetadata:
    """What dgproxy knows about one stored object (the Rust C{FileMetadata})."""

    tool: str
    original_name: str
    file_sha256: str
    file_size: int
    md5: str
    created_at: datetime
    note: str = PASSTHROUGH
    content_type: Optional[str] = None
    user_metadata: Mapping[str, str] = field(default_factory=dict)
    multipart_etag: Optional[str] = None
    source_name: Optional[str] = None
    ref_path: Optional[str] = None
    ref_sha256: Optional[str] = None
    delta_size: Optional[int] = None
    delta_cmd: Optional[str] = None

    @property
    def etag(self) -> str:
        """The quoted ETag a client sees."""
        if self.multipart_etag:
            tag = self.multipart_etag.strip('"')
            return f'"{tag}"'
        return f'"{self.md5}"'

    def with_changes(self, **changes) -> "ObjectMetadata":
        return replace(self, **changes)

    def to_json(self) -> bytes:
        doc: dict = {
            "tool": self.tool,
            "original_name": self.original_name,
            "file_sha256": self.file_sha256,
            "file_size": self.file_size,
            "md5": self.md5,
        }
        if self.multipart_etag:
            doc["multipart_etag"] = self.multipart_etag
        doc["created_at"] = format_timestamp(self.created_at)
        if self.content_type:
            doc["content_type"] = self.content_type
        if self.user_metadata:
            doc["user_metadata"] = dict(self.user_metadata)
        doc["note"] = self.note
        if self.note == REFERENCE:
            doc["source_name"] = self.source_name or ""
        elif self.note == DELTA:
            doc["ref_path"] = self.ref_path or REFERENCE_NAME
            doc["ref_sha256"] = self.ref_sha256 or ""
            doc["delta_size"] = self.delta_size or 0
            doc["delta_cmd"] = self.delta_cmd or ""
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes) -> "ObjectMetadata":
        try:
            doc = json.loads(raw)
        except RecursionError:
            raise MetadataError("metadata is nested too deeply") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise MetadataError(f"metadata is not JSON: {e}") from None
        if not isinstance(doc, dict):
            raise MetadataError("metadata is not a JSON object")
        try:
            note = doc["note"]
            if note == "direct":
                note = PASSTHROUGH
            if note not in (PASSTHROUGH, DELTA, REFERENCE):
                raise MetadataError(f"unknown storage note {note!r}")
            user = doc.get("user_metadata") or {}
            if not isinstance(user, dict):
                raise MetadataError("user_metadata is not an object")
            meta = cls(
                tool=str(doc["tool"]),
                original_name=str(doc["original_name"]),
                file_sha256=str(doc["file_sha256"]),
                file_size=_json_int(doc["file_size"], "file_size"),
                md5=str(doc["md5"]),
                created_at=parse_timestamp(str(doc["created_at"])),
                note=note,
                content_type=doc.get("content_type") or None,
                user_metadata={str(k): str(v) for k, v in user.items()},
                multipart_etag=doc.get("multipart_etag") or None,
                source_name=doc.get("source_name"),
                ref_path=doc.get("ref_path") or doc.get("ref_key"),
                ref_sha256=doc.get("ref_sha256"),
                delta_size=(None if doc.get("delta_size") is None
                            else _json_int(doc["delta_size"], "delta_size")),
                delta_cmd=doc.get("delta_cmd"),
            )
        except KeyError as e:
            raise MetadataError(f"metadata lacks field {e.args[0]!r}") from None
        except (TypeError, ValueError, OverflowError) as e:
            raise MetadataError(f"metadata field has a bad value: {e}") from None
        if meta.note == DELTA and (meta.ref_sha256 is None or meta.delta_size is None):
            raise MetadataError("delta metadata lacks ref_sha256 or delta_size")
        if meta.file_size < 0:
            raise MetadataError("negative file_size")
        return meta


# --- S3 user-metadata headers (fact sheet storage §2.3, §10.4) ------------------

META_PREFIX = "x-amz-meta-"
USER_PREFIX = "user-"


_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")
_ENCODED_WORD = re.compile(r"=\?utf-8\?b\?([A-Za-z0-9+/]*={0,2})\?=", re.IGNORECASE)


def header_value(value: str) -> str:
    """C{value} as an S3 metadata header can carry it. Printable ASCII goes
    as it is; anything else (a key's non-ASCII or control characters, which
    end up in C{dg-original-name}) as an RFC 2047 encoded word: AWS refuses
    or rewrites other bytes in C{x-amz-meta-*} values and returns its own
    non-ASCII metadata in this form, Go servers refuse control characters,
    and Twisted turns CR and LF into spaces."""
    if _PRINTABLE_ASCII.fullmatch(value):
        return value
    raw = value.encode("utf-8", "surrogatepass")
    return "=?UTF-8?B?" + base64.b64encode(raw).decode("ascii") + "?="


def header_text(value: str) -> str:
    """The value L{header_value} encoded (or AWS did): an RFC 2047 B-encoded
    UTF-8 word decoded, anything else as it is."""
    m = _ENCODED_WORD.fullmatch(value)
    if m is None:
        return value
    try:
        return base64.b64decode(m.group(1), validate=True).decode("utf-8", "surrogatepass")
    except (binascii.Error, UnicodeDecodeError):
        return value


def to_s3_headers(meta: ObjectMetadata, stored_key: str) -> dict[str, str]:
    """The C{x-amz-meta-*} headers for C{meta}: the union of what the Rust
    proxy and the Python C{deltaglider} tool read, so both can read it."""
    h = {
        "dg-tool": meta.tool,
        "dg-original-name": meta.original_name,
        "dg-file-sha256": meta.file_sha256,
        "dg-file-size": str(meta.file_size),
        "dg-md5": meta.md5,
        "dg-created-at": format_timestamp(meta.created_at),
        "dg-note": meta.note,
    }
    if meta.note == PASSTHROUGH:
        h["dg-compression"] = "none"
    elif meta.note == REFERENCE:
        h["dg-source-name"] = meta.source_name or ""
    elif meta.note == DELTA:
        ds = stored_key.rpartition("/")[0]
        h["dg-ref-path"] = REFERENCE_NAME
        h["dg-ref-key"] = f"{ds}/{REFERENCE_NAME}" if ds else REFERENCE_NAME
        h["dg-ref-sha256"] = meta.ref_sha256 or ""
        h["dg-delta-size"] = str(meta.delta_size or 0)
        h["dg-delta-cmd"] = meta.delta_cmd or ""
    if meta.multipart_etag:
        h["dg-multipart-etag"] = meta.multipart_etag
    for unknown in ("dg-md5", "dg-file-sha256"):  # a streamed upload's hashes come later
        if not h[unknown]:
            del h[unknown]
    if meta.content_type:
        h["content-type"] = meta.content_type
    for k, v in meta.user_metadata.items():
        h[USER_PREFIX + k.lower()] = v
    return {META_PREFIX + k: header_value(v) for k, v in h.items()}


def _alias(bare: Mapping[str, str], *names: str) -> Optional[str]:
    for name in names:
        for variant in (f"dg-{name}", f"dg_{name.replace('-', '_')}", name.replace("-", "_"), name):
            value = bare.get(variant)
            if value:
                return value
    return None


def from_s3_headers(headers: Mapping[str, str], size: int,
                    last_modified: datetime) -> Optional[ObjectMetadata]:
    """Our metadata from C{x-amz-meta-*} headers (lowercase names), written by
    dgproxy, the Rust proxy or the Python tool; None when it is not ours."""
    bare = {k[len(META_PREFIX):]: header_text(v)
            for k, v in headers.items() if k.startswith(META_PREFIX)}
    tool = _alias(bare, "tool")
    name = _alias(bare, "original-name", "source-name")
    sha = _alias(bare, "file-sha256") or ""
    if not tool or not name:
        return None
    note_raw = (_alias(bare, "note") or "").lower()
    ref = _alias(bare, "ref-path", "ref-key")
    if note_raw == REFERENCE:
        note = REFERENCE
    elif ref or note_raw == DELTA or note_raw.startswith("zero-diff"):
        note = DELTA
    else:
        note = PASSTHROUGH
    try:
        created = parse_timestamp(_alias(bare, "created-at") or "")
    except MetadataError:
        created = last_modified
    try:
        file_size = int(_alias(bare, "file-size") or (size if note != DELTA else 0))
        delta_size = _alias(bare, "delta-size")
        delta_size = int(delta_size) if delta_size else (size if note == DELTA else None)
    except ValueError:
        return None
    user = {k[len(USER_PREFIX):]: v for k, v in bare.items() if k.startswith(USER_PREFIX)}
    return ObjectMetadata(
        tool=tool, original_name=name, file_sha256=sha, file_size=file_size,
        md5=bare.get("dg-md5", ""), created_at=created, note=note,
        content_type=bare.get("content-type") or None, user_metadata=user,
        multipart_etag=bare.get("dg-multipart-etag") or None,
        source_name=_alias(bare, "source-name") if note == REFERENCE else None,
        ref_path=REFERENCE_NAME if note == DELTA else None,
        ref_sha256=_alias(bare, "ref-sha256") if note == DELTA else None,
        delta_size=delta_size if note == DELTA else None,
        delta_cmd=_alias(bare, "delta-cmd") if note == DELTA else None)
