"""S3 backend: blobs in a real object store, through the signed client of
L{dgproxy.storage.s3client}.

Downloads stream from the upstream socket with backpressure. Uploads need
their metadata in the request headers: one of known size whose metadata is
known up front streams straight upstream; otherwise (the metadata needs the
body's hashes) a writer spools to a local file and PUTs it at commit. Memory
stays bounded either way, and nothing is visible upstream until the blob is
complete. Listings carry the original sizes and ETags of delta objects,
from one HEAD per delta cached by its upstream ETag.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from typing import Optional
from urllib.parse import quote, unquote_plus
from xml.sax.saxutils import escape as xml_escape

import treq
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from dgproxy.storage.interface import (
    AlreadyExists, BackendUnavailable, BucketInfo, BucketMissing, BucketNotEmptyError, ByteRange,
    IBackend, IObjectWriter, StoredObject, UpstreamError, open_span)
from dgproxy.storage.metacache import MetadataCache
from dgproxy.storage.metadata import (
    DELTA_SUFFIX, REFERENCE_NAME, ObjectMetadata, from_s3_headers, to_s3_headers)
from dgproxy.storage.s3client import ResponseSource, S3Client, location_constraint, parse_xml
from dgproxy.streams import BytesSource, PauseGate, SliceSource
from dgproxy.wire import parse_http_date

log = Logger(namespace="dgproxy.storage.s3")

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


LIST_HEAD_CONCURRENCY = 10
PARTS_IN_FLIGHT = 4  # parts of one upstream multipart upload sent or copied at once


def _http_date(value: Optional[str]) -> datetime:
    return parse_http_date(value) or datetime.now(timezone.utc)


def _iso(value: str) -> datetime:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(timezone.utc)
    except ValueError:
        return datetime.now(timezone.utc)


def _headers(response) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v[0].decode("latin-1")
            for k, v in response.headers.getAllRawHeaders()}


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+)")


def _served_whole(response, byte_range: ByteRange) -> Optional[int]:
    """The blob's size from a 206's C{Content-Range}, if the answer carries
    exactly the bytes C{byte_range} asks for; None otherwise."""
    values = response.headers.getRawHeaders(b"content-range") or [b""]
    m = _CONTENT_RANGE.fullmatch(values[0].decode("latin-1").strip())
    if not m:
        return None
    first, last, total = (int(g) for g in m.groups())
    if byte_range.resolve(total) != (first, last) or response.length != last - first + 1:
        return None
    return total


@implementer(IBodyProducer)
class _PushBody(PauseGate):
    """The body of a streaming upstream PUT, written to as the client's arrives."""

    def __init__(self, length: int):
        super().__init__()
        self.length = length
        self._consumer = None
        self._started = defer.Deferred()
        self._finished = defer.Deferred()

    def startProducing(self, consumer):
        self._consumer = consumer
        self._started.callback(None)
        return self._finished

    async def write(self, data: bytes) -> None:
        if not self._started.called:
            await self._started
        if self.stopped:
            raise BackendUnavailable("upload", "upstream stopped reading the body")
        self._consumer.write(data)
        if self.paused is not None:
            await self.paused

    def end(self) -> None:
        if not self._finished.called:
            self._finished.callback(None)


def _passed_on(d: defer.Deferred) -> defer.Deferred:
    """A new Deferred that fires with C{d}'s result (which it takes over).

    Awaiting C{d} itself goes wrong from code that runs inside one of C{d}'s
    own callbacks: it returns the value in hand at that point. A streaming
    upload on a new connection is such code: the Agent starts the body (and
    so resumes the writer, which may finish it) from the callback that has
    the connection, and awaiting the request's Deferred there returned the
    connection instead of the response."""
    out = defer.Deferred()
    d.addBoth(out.callback)
    return out


@implementer(IObjectWriter)
class _StreamingWriter:
    """Streams a blob straight into an upstream PUT whose headers were sent
    first (its size and metadata known up front, bar the hashes: readers take
    the MD5 from the upstream ETag). The latest chunk is held back until
    L{commit}: the body's checks (Content-MD5, signed SHA-256, checksums) end
    with its last byte, and until the service has every byte it stores
    nothing. Aborting cuts the connection, so no partial object is stored."""

    hashes_needed = False

    def __init__(self, backend: "S3Backend", bucket: str, key: str, body: _PushBody,
                 response: defer.Deferred):
        self._backend = backend
        self._bucket = bucket
        self._key = key
        self._body = body
        self._response = response
        self._done = False
        self._sent = 0
        self._held = b""
        self._answered = False
        self._gave_up = False

        def answered(result):
            self._answered = True
            return result

        response.addBoth(answered)

    def write(self, data: bytes) -> defer.Deferred:
        if self._gave_up:
            seconds = self._backend.client.read_timeout
            return defer.fail(BackendUnavailable(self._backend.name,
                                                 f"the upload stopped moving for {seconds} s"))
        if self._answered:
            return defer.fail(BackendUnavailable(self._backend.name,
                                                 "upstream answered before the body ended"))
        held, self._held = self._held, data
        self._sent += len(held)
        if not held:
            return defer.succeed(None)
        d = defer.ensureDeferred(self._body.write(held))
        if not d.called:  # the service is not taking bytes: it has the read timeout
            client = self._backend.client
            timer = client.reactor.callLater(client.read_timeout, self._give_up)

            def taken(result):
                if timer.active():
                    timer.cancel()
                return result

            d.addBoth(taken)
        return d

    async def commit(self, metadata: ObjectMetadata, exclusive: bool = False) -> str:
        """Fires with the upstream ETag (the service's MD5 of what it stored).
        The last chunk must be taken and the answer must come within the
        client's read timeout."""
        if exclusive:
            raise ValueError("a streaming upload cannot be exclusive")
        client = self._backend.client
        timer = client.reactor.callLater(client.read_timeout, self._give_up)
        try:
            if self._held:
                await self.write(b"")
            self._done = True
            if self._sent != self._body.length:
                self._response.cancel()
                raise BackendUnavailable(self._backend.name,
                                         "body length differs from the one sent")
            self._body.end()
            response = await _passed_on(self._response)
        except Exception:
            if not self._gave_up:
                raise
            raise BackendUnavailable(self._backend.name, f"no answer to an upload within "
                                     f"{client.read_timeout} s") from None
        finally:
            if timer.active():
                timer.cancel()
        if response.code not in (200, 201):
            raise await self._backend.client.error_of(response)
        await treq.content(response)
        etag = response.headers.getRawHeaders(b"etag", [b""])[0].decode("latin-1").strip('"')
        if metadata.md5 and len(etag) == 32 and etag != metadata.md5:
            await self._backend.discard(self._bucket, self._key)
            raise UpstreamError(500, "BadDigest", f"upstream stored {etag}, sent {metadata.md5}")
        return etag

    def _give_up(self) -> None:
        if self._gave_up:
            return
        self._gave_up = True
        log.error("S3 backend '{backend}' did not take or answer an upload within {seconds} s",
                  backend=self._backend.name, seconds=self._backend.client.read_timeout)
        self._body.stopProducing()
        self._response.cancel()

    def abort(self) -> None:
        if not self._done:
            self._done = True
            self._held = b""
            self._body.stopProducing()
            self._response.cancel()
            self._response.addErrback(lambda _: None)


@implementer(IObjectWriter)
class _SpoolingWriter:
    """Spools a blob locally; L{commit} PUTs it with its metadata."""

    hashes_needed = True

    def __init__(self, backend: "S3Backend", bucket: str, key: str, spool_file):
        self._backend = backend
        self._bucket = bucket
        self._key = key
        self._spool = spool_file
        from dgproxy.streams import FileSink
        self._sink = FileSink(spool_file.file)
        self._done = False

    def write(self, data: bytes):
        return self._sink.write(data)

    async def commit(self, metadata: ObjectMetadata, exclusive: bool = False) -> None:
        try:
            await self._sink.flush()
            await self._backend.put_file(self._bucket, self._key, self._spool.path, metadata,
                                         exclusive)
        finally:
            self._done = True
            self._spool.release()

    def abort(self) -> None:
        if not self._done:
            self._done = True
            self._sink.discard()
            self._spool.release()


@implementer(IBackend)
class S3Backend:
    """Blobs and their C{x-amz-meta-dg-*} metadata in an S3 service."""

    def __init__(self, client: S3Client, spool, name: Optional[str] = None,
                 native_sse: Optional[dict] = None, full_list_metadata: bool = False,
                 declared: tuple[str, ...] = (), metadata: Optional[MetadataCache] = None):
        """C{native_sse}: {mode: sse-kms|sse-s3, kms_key_id, bucket_key_enabled} to have
        the service encrypt; C{full_list_metadata}: LIST sizes and ETags are not the
        logical ones (proxy-side encryption), so every listed key needs metadata;
        C{declared}: the buckets the config puts here (real names), listed in
        place of ListBuckets when the keys may not list all buckets;
        C{metadata}: where listings keep what HEADs found (shared by backends)."""
        self.client = client
        self.spool = spool
        self.name = name or client.name
        self.native_sse = native_sse
        self.full_list_metadata = full_list_metadata
        self.declared = tuple(declared)
        self._list_meta = MetadataCache() if metadata is None else metadata
        self._said_scoped = False

    async def _fail(self, response, bucket: Optional[str] = None):
        err = await self.client.error_of(response)
        if err.code == "NoSuchBucket":
            raise BucketMissing(bucket or "")
        raise err

    # -- buckets -----------------------------------------------------------
    async def list_buckets(self):
        response = await self.client.request("GET", None)
        if response.code != 200:
            err = await self.client.error_of(response)
            if not self.client.keys_accepted(err):
                raise err
            return await self._declared_buckets()
        root = parse_xml(await treq.content(response))
        out = []
        for b in root.iter("Bucket"):
            out.append(BucketInfo(b.findtext("Name"),
                                  _iso(b.findtext("CreationDate") or "")))
        return sorted(out, key=lambda b: b.name)

    async def _declared_buckets(self) -> list[BucketInfo]:
        """For keys scoped to their buckets: the declared ones that exist
        (HEAD needs only s3:ListBucket on each). HEAD tells no creation
        date, so they show the epoch."""
        if not self._said_scoped:
            self._said_scoped = True
            log.info("Backend '{backend}': ListBuckets is denied to its credentials; "
                     "listing the buckets the config declares on it instead: {names}",
                     backend=self.name, names=", ".join(self.declared) or "none")
        found = []
        for name in self.declared:
            try:
                if await self.bucket_exists(name):
                    found.append(BucketInfo(name, _EPOCH))
            except UpstreamError as e:
                if e.status != 403:  # 403: not one these keys may use
                    raise
        return sorted(found, key=lambda b: b.name)

    async def bucket_exists(self, bucket: str) -> bool:
        response = await self.client.request("HEAD", bucket)
        await treq.content(response)
        if response.code == 200:
            return True
        if response.code == 404:
            return False
        raise UpstreamError(response.code, f"HTTP{response.code}", "HEAD bucket failed")

    async def create_bucket(self, bucket: str) -> bool:
        response = await self.client.request("PUT", bucket, idempotent=False,
                                             body=location_constraint(self.client.endpoint,
                                                                      self.client.region))
        if response.code == 200:
            await treq.content(response)
            return True
        err = await self.client.error_of(response)
        if err.code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            return False
        raise err

    async def delete_bucket(self, bucket: str) -> None:
        objects, _ = await self.list(bucket, "", None, with_metadata=False)
        if any(not _internal(o.key) for o in objects):
            raise BucketNotEmptyError(bucket)
        for o in objects:  # internal leftovers (references)
            await self.delete(bucket, o.key)
        response = await self.client.request("DELETE", bucket)
        if response.code not in (200, 204):
            err = await self.client.error_of(response)
            if err.code == "NoSuchBucket":
                raise BucketMissing(bucket)
            if err.code == "BucketNotEmpty":
                raise BucketNotEmptyError(bucket)
            raise err
        await treq.content(response)

    # -- objects -------------------------------------------------------------
    def _stored(self, key: str, response, size: Optional[int] = None) -> StoredObject:
        """The blob a HEAD or GET answer describes; C{size} where the answer's
        length is not the blob's (a HEAD's, a range's)."""
        h = _headers(response)
        if size is None:
            size = response.length
        modified = _http_date(h.get("last-modified"))
        etag = h.get("etag", "").strip('"')
        meta = from_s3_headers(h, size, modified)
        if meta is not None and not meta.md5:
            meta = meta.with_changes(md5=_fallback_md5(meta, etag))
        return StoredObject(key, size, modified, meta, etag=etag)

    async def open_with_stat(self, bucket: str, key: str,
                             byte_range: Optional[ByteRange] = None):
        """(StoredObject, source) from one GET, or None: the metadata comes
        with the body, saving the HEAD a read would otherwise start with. A
        range is sent as it is, and the blob's size read from the answer's
        C{Content-Range}."""
        headers = {} if byte_range is None else {"Range": byte_range.header()}
        response = await self.client.request("GET", bucket, key, headers=headers)
        if response.code == 404:
            await treq.content(response)
            return None
        if response.code == 206 and byte_range is not None:
            total = _served_whole(response, byte_range)
            if total is not None:
                return (self._stored(key, response, size=total),
                        ResponseSource(response, self.client))
        elif response.code == 200 and isinstance(response.length, int):
            stored = self._stored(key, response)
            source = ResponseSource(response, self.client)
            if byte_range is None:
                return stored, source
            # A service that ignores Range sends the whole blob: cut the range out.
            span = byte_range.resolve(response.length)
            if span is None:
                source.close()
                return stored, None
            return stored, SliceSource(source, span[0], span[1] - span[0] + 1)
        elif response.code not in (200, 206, 416):
            await self._fail(response, bucket)
        # A chunked answer (no size), an unsatisfiable range (the 416 carries
        # no metadata) or a 206 of other bytes than asked: HEAD, then GET.
        ResponseSource(response, self.client).close()
        stored = await self.stat(bucket, key)
        return None if stored is None else await open_span(self, bucket, key, stored, byte_range,
                                                           stored.size)

    async def stat(self, bucket: str, key: str) -> Optional[StoredObject]:
        response = await self.client.request("HEAD", bucket, key)
        await treq.content(response)
        if response.code == 404:
            return None
        if response.code != 200:
            raise UpstreamError(response.code, f"HTTP{response.code}", f"HEAD {key} failed")
        return self._stored(key, response,
                            size=int(response.headers.getRawHeaders(b"content-length", [b"0"])[0]))

    async def open_read(self, bucket: str, key: str, offset: int = 0,
                        length: Optional[int] = None, stored=None):
        headers = {}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            if length == 0:
                return BytesSource(b"")
            headers["Range"] = f"bytes={offset}-{end}"
        response = await self.client.request("GET", bucket, key, headers=headers)
        if response.code == 404:
            await treq.content(response)
            return None
        if response.code not in (200, 206):
            await self._fail(response, bucket)
        source = ResponseSource(response, self.client)
        if response.code == 200 and headers:
            # A service that ignores Range sends the whole blob: cut the range out.
            if length is None:
                length = response.length - offset if isinstance(response.length, int) else 2 ** 63
            return SliceSource(source, offset, length)
        return source

    async def open_write(self, bucket: str, key: str, size: Optional[int] = None,
                         hint: Optional[ObjectMetadata] = None):
        """A writer. With the size and the metadata known up front (C{hint},
        hashes not needed), the body streams straight upstream; otherwise it
        is spooled and PUT at commit, once its hashes are known."""
        if (size is None or hint is None or self.native_sse is not None
                or hint.multipart_etag is not None):
            # (An assembled upload is joined upstream by L{assemble}; one
            # that comes here is sent from the spool, in parts.)
            return _SpoolingWriter(self, bucket, key, self.spool.create("upload"))
        headers = self._object_headers(hint, key)
        body = _PushBody(size)
        response = self.client.stream_put(bucket, key, headers, body)
        return _StreamingWriter(self, bucket, key, body, response)


    def _object_headers(self, meta: ObjectMetadata, key: str) -> dict:
        """The headers that create an object: its metadata, and native SSE."""
        headers = {"Content-Type": "application/octet-stream", **to_s3_headers(meta, key)}
        if self.native_sse is not None:
            if self.native_sse["mode"] == "sse-kms":
                headers["x-amz-server-side-encryption"] = "aws:kms"
                headers["x-amz-server-side-encryption-aws-kms-key-id"] = self.native_sse["kms_key_id"]
                if self.native_sse.get("bucket_key_enabled", True):
                    headers["x-amz-server-side-encryption-bucket-key-enabled"] = "true"
            else:
                headers["x-amz-server-side-encryption"] = "AES256"
            headers["x-amz-meta-dg-encrypted-native"] = self.native_sse["mode"]
        return headers

    def can_assemble(self, bucket: str) -> bool:
        return True

    async def assemble(self, bucket: str, key: str, sources: list[str],
                       meta: ObjectMetadata) -> None:
        """Make C{key} the concatenation of the stored blobs C{sources}, inside
        the service: an upstream multipart upload whose parts are copied from
        them (UploadPartCopy), so no byte passes through dgproxy. They must be
        at least 5 MiB each but the last, as a client's parts are. On failure
        the upload is aborted and C{key} is untouched."""
        async def copy_part(upload_id: str, number: int) -> str:
            response = await self.client.request(
                "PUT", bucket, key, query={"partNumber": str(number), "uploadId": upload_id},
                headers={"x-amz-copy-source": quote(f"{bucket}/{sources[number - 1]}", safe="/~")})
            if response.code != 200:
                raise await self._refusal(response, bucket, key)
            # Like Complete, a copy can fail after its 200 has begun. (The
            # answer's name varies: SeaweedFS does not say CopyPartResult.)
            answer = parse_xml(await treq.content(response))
            etag = answer.findtext("ETag")
            if not etag:
                raise _error_in(answer, "UploadPartCopy")
            return etag

        await self._as_upload(bucket, key, self._object_headers(meta, key), len(sources),
                              copy_part)

    async def put_file(self, bucket: str, key: str, path: str, meta: ObjectMetadata,
                       exclusive: bool) -> None:
        headers = self._object_headers(meta, key)
        if meta.multipart_etag is not None and not exclusive:
            return await self._put_file_in_parts(bucket, key, path, headers)
        if exclusive:
            headers["If-None-Match"] = "*"
        response = await self.client.request("PUT", bucket, key, headers=headers,
                                             body_path=path, idempotent=True)
        if response.code in (200, 201):
            await treq.content(response)
            return
        raise await self._refusal(response, bucket, key)

    async def _refusal(self, response, bucket: str, key: str) -> Exception:
        err = await self.client.error_of(response)
        if err.status == 412:
            return AlreadyExists(key)
        if err.code == "NoSuchBucket":
            return BucketMissing(bucket)
        return err

    async def _put_file_in_parts(self, bucket: str, key: str, path: str, headers: dict) -> None:
        """Store an object a client uploaded in parts as an upstream multipart
        upload: its upstream ETag then ends in C{-N}, which tells a listing to
        look up its metadata (the client's ETag is the multipart one, not the
        MD5 a single PUT gets), and it may be larger than a PUT's 5 GiB.
        Each part is retried on its own."""
        size = os.path.getsize(path)
        part = upstream_part_size(size)

        offsets = range(0, max(size, 1), part)

        async def send_part(upload_id: str, number: int) -> str:
            offset = offsets[number - 1]
            response = await self.client.request(
                "PUT", bucket, key, query={"partNumber": str(number), "uploadId": upload_id},
                body_path=path, body_range=(offset, min(part, size - offset)))
            if response.code != 200:
                raise await self._refusal(response, bucket, key)
            await treq.content(response)
            return response.headers.getRawHeaders(b"etag", [b""])[0].decode("latin-1")

        await self._as_upload(bucket, key, headers, len(offsets), send_part)

    async def _as_upload(self, bucket: str, key: str, headers: dict, count: int,
                         put_part) -> None:
        """Create an upstream multipart upload with C{headers}, put its parts
        with C{put_part(upload_id, number)} (it returns the part's ETag),
        L{PARTS_IN_FLIGHT} at a time, and complete it; on any failure abort
        it, so C{key} is untouched."""
        upload_id = await self._create_upload(bucket, key, headers)
        try:
            etags = await in_flight(count, lambda n: put_part(upload_id, n), PARTS_IN_FLIGHT)
            await self._complete_upload(bucket, key, upload_id, etags)
        except BaseException:
            self._abandon(bucket, key, upload_id)
            raise

    async def _create_upload(self, bucket: str, key: str, headers: dict) -> str:
        """CreateMultipartUpload with the object's headers; its upload id."""
        response = await self.client.request("POST", bucket, key, query={"uploads": None},
                                             headers=headers, idempotent=False)
        if response.code != 200:
            raise await self._refusal(response, bucket, key)
        upload_id = parse_xml(await treq.content(response)).findtext("UploadId")
        if not upload_id:
            raise UpstreamError(500, "InternalError", "CreateMultipartUpload gave no UploadId")
        return upload_id

    async def _complete_upload(self, bucket: str, key: str, upload_id: str,
                               etags: list[str]) -> None:
        listing = "".join(f"<Part><PartNumber>{n}</PartNumber>"
                          f"<ETag>\"{xml_escape(e.strip(chr(34)))}\"</ETag></Part>"
                          for n, e in enumerate(etags, 1))
        response = await self.client.request(
            "POST", bucket, key, query={"uploadId": upload_id}, idempotent=False,
            body=f"<CompleteMultipartUpload>{listing}</CompleteMultipartUpload>".encode())
        if response.code != 200:
            raise await self._refusal(response, bucket, key)
        # A Complete can fail after its 200 has begun: the error is the body.
        answer = parse_xml(await treq.content(response))
        if answer.tag != "CompleteMultipartUploadResult":
            raise _error_in(answer, "CompleteMultipartUpload")

    def _abandon(self, bucket: str, key: str, upload_id: str) -> None:
        """Abort an upstream multipart upload, in the background: its parts
        cost storage until then (a bucket lifecycle rule catches what a
        failed abort leaves)."""
        d = defer.ensureDeferred(self.client.request(
            "DELETE", bucket, key, query={"uploadId": upload_id}))
        d.addCallback(treq.content)
        d.addErrback(lambda f: log.warn(
            "S3 backend '{backend}': could not abort upload {upload} of {key}: {error}",
            backend=self.name, upload=upload_id, key=key, error=f.getErrorMessage()))

    async def discard(self, bucket: str, key: str) -> None:
        """One DELETE; S3 answers 204 whether or not the key existed."""
        response = await self.client.request("DELETE", bucket, key)
        await treq.content(response)
        if response.code not in (200, 204, 404):
            raise UpstreamError(response.code, f"HTTP{response.code}", f"DELETE {key} failed")

    async def delete(self, bucket: str, key: str) -> bool:
        existed = await self.stat(bucket, key) is not None
        if not existed:
            return False
        response = await self.client.request("DELETE", bucket, key)
        await treq.content(response)
        if response.code not in (200, 204, 404):
            raise UpstreamError(response.code, f"HTTP{response.code}", f"DELETE {key} failed")
        return True

    async def list(self, bucket: str, prefix: str, delimiter: Optional[str],
                   with_metadata: bool = True, start_after: Optional[str] = None,
                   more=None):
        """Stored objects under C{prefix} and the common prefixes: all pages,
        or (with C{more}) pages until it answers 0, each next one sized to about
        twice what it still wants: the page after a full one usually only
        has to show that a client's page is complete.

        Delta blobs need their original size and ETag: those come from one
        HEAD each, cached by the upstream ETag, so a repeated listing costs
        no HEADs (SPEC §3 ⚑)."""
        objects: list[StoredObject] = []
        prefixes: list[str] = []
        token = None
        page = 1000
        while True:
            # URL-encoded keys: XML 1.0 cannot carry control characters (Go's
            # encoder puts U+FFFD in their place) and its parsers turn CR into LF.
            query = {"list-type": "2", "prefix": prefix, "max-keys": str(page),
                     "encoding-type": "url"}
            if delimiter:
                query["delimiter"] = delimiter
            if token:
                query["continuation-token"] = token
            elif start_after and start_after > prefix:
                query["start-after"] = start_after
            response = await self.client.request("GET", bucket, query=query)
            if response.code != 200:
                await self._fail(response, bucket)
            root = parse_xml(await treq.content(response))
            # Decoded only if the service says it encoded (one that ignores
            # the parameter sends keys as they are).
            decoded = (unquote_plus if root.findtext("EncodingType") == "url"
                       else str)
            for c in root.iter("Contents"):
                key = decoded(c.findtext("Key") or "")
                etag = (c.findtext("ETag") or "").strip('"')
                objects.append(StoredObject(key, int(c.findtext("Size") or 0),
                                            _iso(c.findtext("LastModified") or ""),
                                            None, etag=etag))
            for p in root.iter("CommonPrefixes"):
                value = decoded(p.findtext("Prefix") or "")
                if value.rstrip("/").rpartition("/")[2] != ".dg":
                    prefixes.append(value)
            if (root.findtext("IsTruncated") or "false") != "true":
                break
            token = root.findtext("NextContinuationToken")
            if not token:
                break
            if more is not None:
                wanted = more(objects, prefixes)
                if wanted <= 0:
                    break
                page = min(1000, max(32, 2 * wanted))
        if with_metadata:
            objects = await self._with_list_metadata(bucket, objects)
        return objects, prefixes

    async def _with_list_metadata(self, bucket: str, objects: list[StoredObject]):
        """Fill metadata where LIST alone cannot give the original size/ETag."""
        need = [i for i, o in enumerate(objects)
                if self.full_list_metadata or o.key.endswith(DELTA_SUFFIX)
                or "-" in (o.etag or "")]
        sem = defer.DeferredSemaphore(LIST_HEAD_CONCURRENCY)

        async def fill(i: int) -> None:
            o = objects[i]
            place = (self.name, bucket, o.key, o.etag or "")
            meta = self._list_meta.get(place)
            if meta is None:
                stored = await self.stat(bucket, o.key)
                if stored is None or stored.metadata is None:
                    return
                meta = stored.metadata
                self._list_meta.put(place, meta)
            objects[i] = StoredObject(o.key, o.size, o.modified, meta, etag=o.etag)

        await defer.gatherResults(
            [sem.run(lambda i=i: defer.ensureDeferred(fill(i))) for i in need],
            consumeErrors=True)
        return objects


def _error_in(answer: ET.Element, what: str) -> UpstreamError:
    """The error an S3 service sends as the body of a 200 when an operation
    fails after its answer began (Complete, UploadPartCopy)."""
    return UpstreamError(500, answer.findtext("Code") or "InternalError",
                         answer.findtext("Message") or f"{what} failed")


async def in_flight(count: int, run, width: int) -> list:
    """C{run(n)} for n in 1..C{count}, at most C{width} at once; their results
    in order. The first failure stops new runs and is raised once the running
    ones have ended (so nothing is still writing when the caller cleans up)."""
    results: list = [None] * count
    numbers = iter(range(1, count + 1))
    failures: list = []

    async def worker() -> None:
        for n in numbers:
            if failures:
                return
            try:
                results[n - 1] = await run(n)
            except BaseException as e:
                failures.append(e)
                return

    await defer.DeferredList([defer.ensureDeferred(worker()) for _ in range(min(width, count))])
    if failures:
        raise failures[0]
    return results


def upstream_part_size(size: int) -> int:
    """Part size for storing C{size} bytes as an upstream multipart upload:
    16 MiB, or more where 10,000 parts (S3's most) would not hold it."""
    mib = 1024 * 1024
    smallest = -(-size // 10_000)
    return max(16 * mib, -(-smallest // mib) * mib)


def _internal(key: str) -> bool:
    return key.rpartition("/")[2] == REFERENCE_NAME or key.startswith(".dg/")


def _fallback_md5(meta: ObjectMetadata, upstream_etag: str) -> str:
    """An ETag source for objects written without C{dg-md5} (the Python tool):
    the upstream ETag of a single-PUT original, else part of the SHA-256."""
    if meta.note != "delta" and len(upstream_etag) == 32 and "-" not in upstream_etag:
        return upstream_etag
    return meta.file_sha256[:32]
