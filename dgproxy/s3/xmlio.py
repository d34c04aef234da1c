"""S3 XML documents: rendering responses and parsing client bodies safely."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Iterable, Optional
from urllib.parse import quote
from xml.sax.saxutils import escape

from defusedxml import ElementTree as SafeET

from dgproxy.s3 import errors

S3_NS = "http://s3.amazonaws.com/doc/2006-03-01/"
XML_HEAD = '<?xml version="1.0" encoding="UTF-8"?>\n'
MAX_XML_BODY = 2 * 1024 * 1024
OWNER = "<Owner><ID>dgproxy</ID><DisplayName>dgproxy</DisplayName></Owner>"


def iso8601(when: datetime) -> str:
    """S3's timestamp form, in UTC to the millisecond (formatted by hand: a
    listing formats one per key, and strftime costs three times as much)."""
    w = when if when.tzinfo is timezone.utc else when.astimezone(timezone.utc)
    return (f"{w.year:04d}-{w.month:02d}-{w.day:02d}T{w.hour:02d}:{w.minute:02d}:"
            f"{w.second:02d}.{w.microsecond // 1000:03d}Z")


_MARKUP = ("&", "<", ">", "\r")


def xml_text(value) -> str:
    """Escaped text; CR too, or a parser would hand the client LF instead."""
    text = str(value)
    if not any(c in text for c in _MARKUP):  # nearly every key and ETag
        return text
    return escape(text, {"\r": "&#13;"})


def el(name: str, value) -> str:
    return f"<{name}>{xml_text(value)}</{name}>"


def document(root: str, body: str) -> bytes:
    return (f'{XML_HEAD}<{root} xmlns="{S3_NS}">{body}</{root}>').encode("utf-8")


def encode_name(value: str, url: bool) -> str:
    return quote(value, safe="/") if url else value


def list_buckets(buckets: Iterable[tuple[str, datetime]]) -> bytes:
    items = "".join(
        f"<Bucket>{el('Name', n)}{el('CreationDate', iso8601(c))}</Bucket>" for n, c in buckets)
    return document("ListAllMyBucketsResult", f"{OWNER}<Buckets>{items}</Buckets>")


def contents(key: str, last_modified: datetime, etag: str, size: int, url: bool,
             owner: bool = False) -> str:
    """One listed object; with C{owner} (ListObjects v1, or v2's fetch-owner) its Owner."""
    return (f"<Contents><Key>{xml_text(encode_name(key, url))}</Key>"
            f"<LastModified>{iso8601(last_modified)}</LastModified>"
            f"<ETag>{xml_text(etag)}</ETag><Size>{int(size)}</Size>"
            f"<StorageClass>STANDARD</StorageClass>{OWNER if owner else ''}</Contents>")


def common_prefixes(prefixes: Iterable[str], url: bool) -> str:
    return "".join(f"<CommonPrefixes>{el('Prefix', encode_name(p, url))}</CommonPrefixes>"
                   for p in prefixes)


def parse(body: bytes):
    """Parse a client XML body; anything malformed or hostile is MalformedXML."""
    if not body.strip():
        raise errors.MalformedXML()
    try:
        return SafeET.fromstring(body)
    except Exception:
        raise errors.MalformedXML() from None


def local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def child_text(node, name: str) -> Optional[str]:
    for c in node:
        if local(c.tag) == name:
            return c.text or ""
    return None


def parse_delete(body: bytes) -> tuple[bool, list[str]]:
    """A DeleteObjects body: (quiet, keys); at most 1000 keys."""
    root = parse(body)
    if local(root.tag) != "Delete":
        raise errors.MalformedXML()
    quiet = (child_text(root, "Quiet") or "").strip().lower() == "true"
    keys = []
    for obj in root:
        if local(obj.tag) != "Object":
            continue
        key = child_text(obj, "Key")
        if key is None:
            raise errors.MalformedXML()
        keys.append(key)
    if not keys or len(keys) > 1000:
        raise errors.MalformedXML()
    return quiet, keys


def parse_create_bucket(body: bytes) -> Optional[str]:
    """The LocationConstraint of a CreateBucketConfiguration, if any."""
    if not body.strip():
        return None
    root = parse(body)
    if local(root.tag) != "CreateBucketConfiguration":
        raise errors.MalformedXML()
    return child_text(root, "LocationConstraint")


def parse_complete(body: bytes) -> list[tuple[int, str]]:
    """A CompleteMultipartUpload body: [(part number, etag)] in document order."""
    root = parse(body)
    if local(root.tag) != "CompleteMultipartUpload":
        raise errors.MalformedXML()
    parts = []
    for node in root:
        if local(node.tag) != "Part":
            continue
        number, etag = child_text(node, "PartNumber"), child_text(node, "ETag")
        if number is None or etag is None:
            raise errors.MalformedXML()
        try:
            n = int(number.strip())
        except ValueError:
            raise errors.MalformedXML() from None
        parts.append((n, etag))
    if not parts or len(parts) > 10000:
        raise errors.MalformedXML()
    return parts
