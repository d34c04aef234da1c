"""The S3 operations: each takes an L{S3Call} and returns a L{Response}.

Handlers raise L{S3Error}; they never format errors. Bodies are streamed:
PUT reads the request body chunk by chunk into the store, GET hands the
store's source to the front to pump out.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from typing import Optional
from urllib.parse import unquote

from dgproxy.auth.payload import wrap_body
from dgproxy.engine import multipart as mp
from dgproxy.engine.store import BodyTooLarge, ChecksumMismatch, ObjectStore, ObjectVersion
from dgproxy.s3 import conditions, errors, listing, xmlio
from dgproxy.s3.call import Response, S3Call
from dgproxy.s3.names import check_bucket_name, check_key
from dgproxy.storage.interface import (
    BucketMissing, BucketNotEmptyError, ByteRange, KeyConflict, NameTooLong)
from dgproxy.streams import read_all
from dgproxy.wire import format_http_date

MAX_SINGLE_PUT = 5 * 1024**3
BUCKET_CACHE_SECONDS = 10.0
MAX_USER_METADATA = 2048
RESPONSE_OVERRIDES = {
    "response-content-type": "Content-Type",
    "response-content-language": "Content-Language",
    "response-expires": "Expires",
    "response-cache-control": "Cache-Control",
    "response-content-disposition": "Content-Disposition",
    "response-content-encoding": "Content-Encoding",
}
XML = [("Content-Type", "application/xml")]
# The standard headers S3 keeps with an object and sends back on GET and HEAD.
# dgproxy keeps them among the object's metadata under these internal names
# (hidden from x-amz-meta-*, like every dg- key).
KEPT_HEADERS = {f"dg-h-{name.lower()}": name for name in (
    "Cache-Control", "Content-Disposition", "Content-Encoding", "Content-Language", "Expires")}


class Operations:
    """Bucket and object operations over an L{ObjectStore}."""

    def __init__(self, store: ObjectStore, max_object_size: int = MAX_SINGLE_PUT):
        self.store = store
        self.max_object_size = min(max_object_size, MAX_SINGLE_PUT)
        self.on_bucket_deleted = lambda bucket: None
        self._known_buckets: dict[str, float] = {}

    # -- helpers -----------------------------------------------------------
    async def _bucket_exists(self, bucket: str) -> bool:
        """Backed by a short cache of positive answers: on an S3 backend each
        check is a request, and a bucket deleted meanwhile still fails the
        write itself with NoSuchBucket."""
        now = time.monotonic()
        if self._known_buckets.get(bucket, 0) > now:
            return True
        exists = await self.store.backend.bucket_exists(bucket)
        if exists:
            if len(self._known_buckets) > 10000:
                self._known_buckets.clear()
            self._known_buckets[bucket] = now + BUCKET_CACHE_SECONDS
        return exists

    async def _require_bucket(self, bucket: str) -> None:
        if not await self._bucket_exists(bucket):
            raise errors.NoSuchBucket(BucketName=bucket)

    async def _current(self, call: S3Call) -> ObjectVersion:
        version = await self.store.head(call.bucket, call.key)
        if version is None:
            await self._require_bucket(call.bucket)
            raise errors.NoSuchKey(Key=call.key)
        return version

    async def _small_body(self, call: S3Call, limit: int = xmlio.MAX_XML_BODY) -> bytes:
        source = wrap_body(call.request.accept_body(), call.request.header_map(), call.auth)
        try:
            return await read_all(source, limit)
        except ValueError:
            raise errors.MalformedXML("The XML you provided was too large.") from None

    @staticmethod
    def _object_headers(version: ObjectVersion) -> list[tuple[str, str]]:
        meta = version.metadata
        headers = [
            ("ETag", version.etag),
            ("Last-Modified", format_http_date(version.last_modified)),
            ("Accept-Ranges", "bytes"),
            ("Content-Type", meta.content_type or "application/octet-stream"),
        ]
        for k, v in sorted(meta.user_metadata.items()):
            if not k.startswith("dg-"):
                headers.append((f"x-amz-meta-{k}", v))
            elif k in KEPT_HEADERS:
                headers.append((KEPT_HEADERS[k], v))
        return headers

    # -- service and buckets ------------------------------------------------------
    async def list_buckets(self, call: S3Call) -> Response:
        buckets = await self.store.backend.list_buckets()
        return Response(200, list(XML), xmlio.list_buckets((b.name, b.created) for b in buckets))

    async def create_bucket(self, call: S3Call) -> Response:
        check_bucket_name(call.bucket)
        xmlio.parse_create_bucket(await self._small_body(call))
        if not await self.store.backend.create_bucket(call.bucket):
            raise errors.BucketAlreadyOwnedByYou(BucketName=call.bucket)
        return Response(200, [("Location", "/" + call.bucket)])

    async def head_bucket(self, call: S3Call) -> Response:
        await self._require_bucket(call.bucket)
        return Response(200, [("x-amz-bucket-region", "us-east-1")])

    async def delete_bucket(self, call: S3Call) -> Response:
        try:
            self._known_buckets.pop(call.bucket, None)
            await self.store.backend.delete_bucket(call.bucket)
            self._known_buckets.pop(call.bucket, None)
            self.on_bucket_deleted(call.bucket)
        except BucketMissing:
            raise errors.NoSuchBucket(BucketName=call.bucket) from None
        except BucketNotEmptyError:
            raise errors.BucketNotEmpty(BucketName=call.bucket) from None
        return Response(204)

    async def get_bucket_location(self, call: S3Call) -> Response:
        await self._require_bucket(call.bucket)
        return Response(200, list(XML), xmlio.document("LocationConstraint", ""))

    async def get_bucket_versioning(self, call: S3Call) -> Response:
        await self._require_bucket(call.bucket)
        return Response(200, list(XML), xmlio.document("VersioningConfiguration", ""))

    async def get_acl(self, call: S3Call) -> Response:
        if call.target.key is not None:
            await self._current(call)
        else:
            await self._require_bucket(call.bucket)
        grant = ('<AccessControlList><Grant><Grantee xmlns:xsi="http://www.w3.org/2001/'
                 'XMLSchema-instance" xsi:type="CanonicalUser"><ID>dgproxy</ID><DisplayName>'
                 'dgproxy</DisplayName></Grantee><Permission>FULL_CONTROL</Permission></Grant>'
                 '</AccessControlList>')
        return Response(200, list(XML),
                        xmlio.document("AccessControlPolicy", xmlio.OWNER + grant))

    # -- listing -------------------------------------------------------------------
    async def list_objects(self, call: S3Call) -> Response:
        q = call.query
        v2 = q.get("list-type") == "2"
        prefix = q.get("prefix", "")
        delimiter = q.get("delimiter") or None
        encoding = q.get("encoding-type")
        if encoding not in (None, "", "url"):
            raise errors.InvalidArgument("Invalid Encoding Method specified in Request")
        url = encoding == "url"
        max_keys = listing.parse_max_keys(q.get("max-keys"))
        if v2:
            token = q.get("continuation-token")
            start_after = q.get("start-after") or None
            marker = listing.decode_token(token) if token else start_after
        else:
            marker = q.get("marker") or None
        try:
            versions, prefixes = await self.store.list(call.bucket, prefix, delimiter,
                                                       after=marker, limit=max_keys)
        except BucketMissing:
            raise errors.NoSuchBucket(BucketName=call.bucket) from None
        page = listing.paginate([(v.key, v) for v in versions], prefixes, prefix,
                                delimiter, marker, max_keys)
        parts = [xmlio.el("Name", call.bucket),
                 xmlio.el("Prefix", xmlio.encode_name(prefix, url))]
        if v2:
            if q.get("continuation-token"):
                parts.append(xmlio.el("ContinuationToken", q["continuation-token"]))
            if q.get("start-after"):
                parts.append(xmlio.el("StartAfter", xmlio.encode_name(q["start-after"], url)))
            parts.append(xmlio.el("KeyCount", len(page.objects) + len(page.prefixes)))
            if page.truncated and page.last is not None:
                parts.append(xmlio.el("NextContinuationToken", listing.encode_token(page.last)))
        else:
            parts.append(xmlio.el("Marker", xmlio.encode_name(marker or "", url)))
            if page.truncated and page.last is not None:
                parts.append(xmlio.el("NextMarker", xmlio.encode_name(page.last, url)))
        parts.append(xmlio.el("MaxKeys", max_keys))
        if delimiter:
            parts.append(xmlio.el("Delimiter", xmlio.encode_name(delimiter, url)))
        if url:
            parts.append(xmlio.el("EncodingType", "url"))
        parts.append(xmlio.el("IsTruncated", "true" if page.truncated else "false"))
        owner = not v2 or q.get("fetch-owner") == "true"  # as S3 answers
        for key, v in page.objects:
            parts.append(xmlio.contents(key, v.last_modified, v.etag, v.size, url, owner))
        parts.append(xmlio.common_prefixes(page.prefixes, url))
        return Response(200, list(XML), xmlio.document("ListBucketResult", "".join(parts)))

    # -- objects -------------------------------------------------------------------
    def _content_length(self, call: S3Call) -> Optional[int]:
        decoded = call.header("x-amz-decoded-content-length")
        raw = decoded if decoded is not None else call.header("content-length")
        if raw is None:
            if call.request.requestHeaders.hasHeader(b"transfer-encoding"):
                return None
            raise errors.MissingContentLength()
        try:
            length = int(raw)
        except ValueError:
            raise errors.InvalidArgument("Content-Length is not a number.") from None
        if length < 0:
            raise errors.InvalidArgument("Content-Length is negative.")
        if length > self.max_object_size:
            raise errors.EntityTooLarge(ProposedSize=str(length),
                                        MaxSizeAllowed=str(self.max_object_size))
        return length

    @staticmethod
    def _content_md5(call: S3Call) -> Optional[str]:
        value = call.header("content-md5")
        if value is None:
            return None
        try:
            raw = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise errors.InvalidDigest() from None
        if len(raw) != 16:
            raise errors.InvalidDigest()
        return raw.hex()

    @staticmethod
    def _user_metadata(call: S3Call) -> dict[str, str]:
        """The client's C{x-amz-meta-*}, and the standard headers S3 keeps
        with an object (L{KEPT_HEADERS}), from a request that creates one."""
        meta = {}
        total = 0
        for name, values in call.request.header_map().items():
            if name.startswith("x-amz-meta-") and not name.startswith("x-amz-meta-dg-"):
                # (dg- names are dgproxy's own, hidden on the way out: a client
                # cannot set them, as the Rust proxy hides them too.)
                k = name[len("x-amz-meta-"):]
                v = ",".join(values)
                total += len(k) + len(v)
                meta[k] = v
        for k, name in KEPT_HEADERS.items():
            value = call.header(name)
            if name == "Content-Encoding" and value is not None:
                # aws-chunked frames the upload (auth/payload.py undoes it); S3 drops it.
                value = ",".join(c.strip() for c in value.split(",")
                                 if c.strip() and c.strip().lower() != "aws-chunked")
            if value:
                meta[k] = value
                total += len(name) + len(value)  # they share the budget: all of it fits an xattr
        if total > MAX_USER_METADATA:
            raise errors.S3Error("MetadataTooLarge", 400,
                                 "Your metadata headers exceed the maximum allowed metadata size.")
        return meta

    async def put_object(self, call: S3Call) -> Response:
        check_key(call.key, ingest=True)
        length = self._content_length(call)
        expected_md5 = self._content_md5(call)
        user_meta = self._user_metadata(call)
        await self.check_write_conditions(call)
        await self._require_bucket(call.bucket)
        body = wrap_body(call.request.accept_body(), call.request.header_map(), call.auth)
        meta = await self._store(call, body, content_type=call.header("content-type"),
                                 user_metadata=user_meta, expected_md5=expected_md5,
                                 size_hint=length, expected_sha256=_signed_sha256(call))
        return Response(200, [("ETag", meta.etag)])

    async def check_write_conditions(self, call: S3Call) -> None:
        """C{If-None-Match}/C{If-Match} of a write, against the key's current
        object. (Checked before the write, not atomically with it.)"""
        if call.header("if-none-match") is not None or call.header("if-match") is not None:
            current = await self.store.head(call.bucket, call.key)
            conditions.check_write(call.header, current.etag if current else None, call.key)

    async def _store(self, call: S3Call, body, **kwargs):
        return await self._guard(self.store.put(call.bucket, call.key, body, **kwargs))

    @staticmethod
    async def _guard(coro):
        """Run a store write, turning storage outcomes into S3 errors."""
        try:
            return await coro
        except BucketMissing as e:
            raise errors.NoSuchBucket(BucketName=str(e)) from None
        except NameTooLong:
            raise errors.KeyTooLongError(
                "A '/'-separated part of the key is too long for this storage backend "
                "(255 bytes including the '.delta' suffix dgproxy may add).") from None
        except KeyConflict as e:
            raise errors.InvalidArgument(
                f"The key conflicts with an existing object or prefix: {e}") from None
        except ChecksumMismatch:
            raise errors.BadDigest() from None
        except BodyTooLarge:
            raise errors.EntityTooLarge() from None

    async def head_object(self, call: S3Call) -> Response:
        return await self.get_object(call)

    async def get_object(self, call: S3Call) -> Response:
        check_key(call.key, ingest=False)
        source = None
        part = call.query.get("partNumber")
        if part is not None and call.header("range") is not None:
            raise errors.InvalidRequest("Cannot specify both Range header and partNumber query "
                                        "parameter")
        if call.method == "GET" and part is None:
            # The range goes down as it is: on an S3 backend one ranged GET
            # brings the bytes and the metadata together.
            got = await self.store.get(call.bucket, call.key, ByteRange.parse(call.header("range")))
            if got is None:
                await self._require_bucket(call.bucket)
                raise errors.NoSuchKey(Key=call.key)
            version, source = got
        else:
            version = await self._current(call)
        try:
            conditions.check_read(call.header, version.etag, version.last_modified)
            headers = self._object_headers(version)
            for param, header in RESPONSE_OVERRIDES.items():
                if param in call.query:
                    headers = [(h, v) for h, v in headers if h.lower() != header.lower()]
                    headers.append((header, call.query[param]))
            size = version.size
            if part is None:
                span = conditions.parse_range(call.header("range"), size)
            else:
                span, count = _part_span(part, version)
                if count is not None:
                    headers.append(("x-amz-mp-parts-count", str(count)))
        except conditions.NotModified:
            if source is not None:
                source.close()
            return Response(304, [("ETag", version.etag),
                                  ("Last-Modified", format_http_date(version.last_modified))])
        except BaseException:
            if source is not None:
                source.close()
            raise
        if span is None:
            offset, length, status = 0, size, 200
        else:
            offset, length, status = span[0], span[1] - span[0] + 1, 206
            headers.append(("Content-Range", f"bytes {span[0]}-{span[1]}/{size}"))
        if call.method == "HEAD":
            return Response(status, headers, None, length)
        if source is not None:
            return Response(status, headers, source, length)
        source = await self.store.open(call.bucket, version, offset, length)
        if source is None:  # deleted between head and open
            raise errors.NoSuchKey(Key=call.key)
        return Response(status, headers, source, length)

    async def delete_object(self, call: S3Call) -> Response:
        check_key(call.key, ingest=False)
        await self._require_bucket(call.bucket)
        await self.store.delete(call.bucket, call.key)
        return Response(204)

    async def delete_objects(self, call: S3Call) -> Response:
        await self._require_bucket(call.bucket)
        body = await self._small_body(call)
        expected = self._content_md5(call)
        if expected is not None:
            if hashlib.md5(body).hexdigest() != expected:
                raise errors.BadDigest()
        quiet, keys = xmlio.parse_delete(body)
        parts = []
        for key in keys:
            try:
                check_key(key, ingest=False)
                await self.store.delete(call.bucket, key)
            except errors.S3Error as e:
                parts.append("<Error>" + xmlio.el("Key", key) + xmlio.el("Code", e.code) +
                             xmlio.el("Message", e.message) + "</Error>")
                continue
            if not quiet:
                parts.append("<Deleted>" + xmlio.el("Key", key) + "</Deleted>")
        return Response(200, list(XML), xmlio.document("DeleteResult", "".join(parts)))

    async def copy_object(self, call: S3Call) -> Response:
        check_key(call.key, ingest=True)
        src_bucket, src_key = _parse_copy_source(call.header("x-amz-copy-source") or "")
        check_key(src_key, ingest=False)
        source_version = await self.store.head(src_bucket, src_key)
        if source_version is None:
            if not await self.store.backend.bucket_exists(src_bucket):
                raise errors.NoSuchBucket(BucketName=src_bucket)
            raise errors.NoSuchKey(Key=src_key)
        conditions.check_read(call.header, source_version.etag, source_version.last_modified,
                              prefix="x-amz-copy-source-")
        directive = (call.header("x-amz-metadata-directive") or "COPY").upper()
        if directive not in ("COPY", "REPLACE"):
            raise errors.InvalidArgument("Unknown metadata directive.")
        if directive == "REPLACE":
            content_type = call.header("content-type")
            user_meta = self._user_metadata(call)
        else:
            if (src_bucket, src_key) == (call.bucket, call.key):
                raise errors.InvalidRequest(
                    "This copy request is illegal because it is trying to copy an object to "
                    "itself without changing the object's metadata, storage class, website "
                    "redirect location or encryption attributes.")
            content_type = source_version.metadata.content_type
            # A copy is stored whole: it has no parts of its own.
            user_meta = {k: v for k, v in source_version.metadata.user_metadata.items()
                         if k != mp.PARTS_KEY}
        if not await self.store.backend.bucket_exists(call.bucket):
            raise errors.NoSuchBucket(BucketName=call.bucket)
        await self.check_write_conditions(call)
        source = await self.store.open(src_bucket, source_version)
        if source is None:
            raise errors.NoSuchKey(Key=src_key)
        meta = await self._store(call, source, content_type=content_type, user_metadata=user_meta,
                                 size_hint=source_version.size)
        body = ("<CopyObjectResult>" + xmlio.el("LastModified", xmlio.iso8601(meta.created_at)) +
                xmlio.el("ETag", meta.etag) + "</CopyObjectResult>")
        return Response(200, list(XML), (xmlio.XML_HEAD + body).encode("utf-8"))


def _signed_sha256(call: S3Call) -> Optional[str]:
    """The body's SHA-256 as the client declared it (checked as the body streams)."""
    value = (call.auth.payload_hash if call.auth is not None and not call.auth.presigned
             else call.header("x-amz-content-sha256")) or ""
    value = value.strip().lower()
    return value if len(value) == 64 and all(c in "0123456789abcdef" for c in value) else None


def _parse_copy_source(value: str) -> tuple[str, str]:
    value = value.split("?versionId=", 1)[0]
    decoded = unquote(value).lstrip("/")
    bucket, slash, key = decoded.partition("/")
    if not bucket or not slash or not key:
        raise errors.InvalidArgument("Copy Source must mention the source bucket and key: "
                                     "sourcebucket/sourcekey")
    return bucket, key


def _part_span(number: str,
               version: ObjectVersion) -> tuple[Optional[tuple[int, int]], Optional[int]]:
    """(span, parts count) of GET or HEAD ?partNumber=N: part N of an object
    completed from parts, whose sizes it keeps; any other object is its own
    single part 1 (and gets no parts count, so a client reads it whole)."""
    try:
        n = int(number)
    except ValueError:
        n = 0
    if not 1 <= n <= mp.MAX_PARTS:
        raise errors.InvalidArgument("Part number must be an integer between 1 and 10000, "
                                     "inclusive")
    spans = mp.part_spans(version.metadata.user_metadata.get(mp.PARTS_KEY), version.size)
    if spans is None:
        spans, count = [(0, version.size - 1)], None
    else:
        count = len(spans)
    if n > len(spans):
        raise errors.InvalidPartNumber()
    first, last = spans[n - 1]
    return ((first, last) if last >= first else None), count
