"""The multipart family of S3 operations, over L{dgproxy.engine.multipart}."""

from __future__ import annotations

from typing import Optional

from twisted.internet import defer, reactor

from dgproxy.auth.payload import wrap_body
from dgproxy.engine import multipart as mp
from dgproxy.s3 import conditions, errors, xmlio
from dgproxy.s3.call import Response, S3Call
from dgproxy.s3.names import check_key
from dgproxy.streams import CHUNK

XML = [("Content-Type", "application/xml")]
KEEPALIVE_SECONDS = 10.0


class KeepAliveSource:
    """A 200 response that sends whitespace while a long Complete runs, then
    its result, or an S3 error document as S3 itself does."""

    def __init__(self, work: defer.Deferred, render, interval: float = KEEPALIVE_SECONDS):
        self._result: Optional[bytes] = None
        self._interval = interval
        self._render = render
        self._done = False
        self._waiter: Optional[defer.Deferred] = None
        work.addBoth(self._finished)
        self._sent_head = False

    def _finished(self, result):
        try:
            self._result = self._render(result)
        except Exception as e:  # rendering must never leave the client hanging
            self._result = errors.render_error(errors.InternalError(), "", "")
            raise e
        finally:
            w, self._waiter = self._waiter, None
            if w is not None and not w.called:
                w.callback(None)

    async def _read(self) -> bytes:
        if self._done:
            return b""
        if not self._sent_head:
            self._sent_head = True
            return xmlio.XML_HEAD.encode()
        if self._result is None:
            self._waiter = defer.Deferred()
            timer = reactor.callLater(self._interval, lambda: (
                self._waiter.callback(None) if self._waiter and not self._waiter.called else None))
            await self._waiter
            if timer.active():
                timer.cancel()
            if self._result is None:
                return b" "
        self._done = True
        return self._result

    def read(self, size: int = CHUNK):
        return defer.ensureDeferred(self._read())

    def close(self) -> None:
        self._done = True


def _map(e: Exception) -> Exception:
    if isinstance(e, mp.NoSuchUpload):
        return errors.NoSuchUpload(UploadId=str(e))
    if isinstance(e, mp.InvalidPart):
        return errors.S3Error("InvalidPart", 400, "One or more of the specified parts could not "
                              "be found or its entity tag did not match.")
    if isinstance(e, mp.InvalidPartOrder):
        return errors.S3Error("InvalidPartOrder", 400,
                              "The list of parts was not in ascending order.")
    if isinstance(e, mp.EntityTooSmall):
        return errors.S3Error("EntityTooSmall", 400,
                              "Your proposed upload is smaller than the minimum allowed size",
                              ProposedSize=str(e.size), MinSizeAllowed=str(mp.MIN_PART_SIZE),
                              PartNumber=str(e.part_number))
    if isinstance(e, mp.TooManyUploads):
        return errors.SlowDown("Too many multipart uploads are open; try again later.")
    return e


class MultipartOperations:
    def __init__(self, ops, multipart: mp.Multipart):
        self.ops = ops
        self.mp = multipart

    async def _run(self, coro):
        try:
            return await coro
        except (mp.NoSuchUpload, mp.InvalidPart, mp.InvalidPartOrder, mp.EntityTooSmall,
                mp.TooManyUploads) as e:
            raise _map(e) from None

    def _upload_id(self, call: S3Call) -> str:
        return call.query.get("uploadId", "")

    async def create_multipart_upload(self, call: S3Call) -> Response:
        check_key(call.key, ingest=True)
        await self.ops._require_bucket(call.bucket)
        upload = await self._run(self.mp.create(call.bucket, call.key, call.header("content-type"),
                                                self.ops._user_metadata(call)))
        body = (xmlio.el("Bucket", call.bucket) + xmlio.el("Key", call.key) +
                xmlio.el("UploadId", upload.upload_id))
        return Response(200, list(XML), xmlio.document("InitiateMultipartUploadResult", body))

    def _part_number(self, call: S3Call) -> int:
        try:
            n = int(call.query.get("partNumber", ""))
        except ValueError:
            n = 0
        if not 1 <= n <= mp.MAX_PARTS:
            raise errors.InvalidArgument("Part number must be an integer between 1 and 10000, "
                                         "inclusive")
        return n

    async def upload_part(self, call: S3Call) -> Response:
        number = self._part_number(call)
        if call.header("x-amz-copy-source"):
            return await self.upload_part_copy(call, number)
        self.ops._content_length(call)
        expected = self.ops._content_md5(call)
        await self.ops._require_bucket(call.bucket)
        await self._run(self.mp.get(call.bucket, call.key, self._upload_id(call)))
        body = wrap_body(call.request.accept_body(), call.request.header_map(), call.auth)
        part = await self._run(self.ops._guard(self.mp.upload_part(
            call.bucket, call.key, self._upload_id(call), number, body, expected)))
        return Response(200, [("ETag", part.etag)])

    async def upload_part_copy(self, call: S3Call, number: int) -> Response:
        from dgproxy.s3.operations import _parse_copy_source
        src_bucket, src_key = _parse_copy_source(call.header("x-amz-copy-source") or "")
        check_key(src_key, ingest=False)
        await self._run(self.mp.get(call.bucket, call.key, self._upload_id(call)))
        version = await self.ops.store.head(src_bucket, src_key)
        if version is None:
            raise errors.NoSuchKey(Key=src_key)
        conditions.check_read(call.header, version.etag, version.last_modified,
                              prefix="x-amz-copy-source-")
        offset, length = 0, version.size
        rng = call.header("x-amz-copy-source-range")
        if rng:
            span = conditions.parse_range(rng, version.size)
            if span is None:
                raise errors.InvalidArgument("The x-amz-copy-source-range value must be of the "
                                             "form bytes=first-last.")
            offset, length = span[0], span[1] - span[0] + 1
        source = await self.ops.store.open(src_bucket, version, offset, length)
        if source is None:
            raise errors.NoSuchKey(Key=src_key)
        part = await self._run(self.mp.upload_part(call.bucket, call.key, self._upload_id(call),
                                                   number, source))
        body = xmlio.el("LastModified", xmlio.iso8601(part.modified)) + xmlio.el("ETag", part.etag)
        return Response(200, list(XML), xmlio.document("CopyPartResult", body))

    async def complete_multipart_upload(self, call: S3Call) -> Response:
        check_key(call.key, ingest=True)
        upload_id = self._upload_id(call)
        requested = xmlio.parse_complete(await self.ops._small_body(call))
        await self.ops._require_bucket(call.bucket)
        done = await self.mp.completed(call.bucket, call.key, upload_id)
        if done is not None:  # a retry of a Complete that already succeeded
            return Response(200, list(XML), self._result(call, done["etag"]))
        # Bad part lists and failed conditions are answered now; only the
        # assembly runs behind the keep-alive 200 (where S3, too, reports
        # late errors in the body).
        await self.ops.check_write_conditions(call)
        await self._run(self.mp.validate(call.bucket, call.key, upload_id, requested))
        work = defer.ensureDeferred(self._run(self.ops._guard(
            self.mp.complete(call.bucket, call.key, upload_id, requested))))
        resource = "/" + call.bucket + "/" + call.key

        def render(result) -> bytes:
            if isinstance(result, Exception) or hasattr(result, "value"):
                failure = result
                err = getattr(failure, "value", failure)
                if not isinstance(err, errors.S3Error):
                    from twisted.logger import Logger
                    Logger(namespace="dgproxy.multipart").failure(
                        "CompleteMultipartUpload failed", failure)
                    err = errors.InternalError()
                return errors.render_error(err, resource, call.request.request_id).split(b"\n", 1)[1]
            return self._result(call, result).split(b"\n", 1)[1]

        return Response(200, list(XML), KeepAliveSource(work, render))

    def _result(self, call: S3Call, etag: str) -> bytes:
        body = (xmlio.el("Location", f"/{call.bucket}/{call.key}") +
                xmlio.el("Bucket", call.bucket) + xmlio.el("Key", call.key) + xmlio.el("ETag", etag))
        return xmlio.document("CompleteMultipartUploadResult", body)

    async def abort_multipart_upload(self, call: S3Call) -> Response:
        await self.ops._require_bucket(call.bucket)
        await self._run(self.mp.abort(call.bucket, call.key, self._upload_id(call)))
        return Response(204)

    async def list_parts(self, call: S3Call) -> Response:
        upload_id = self._upload_id(call)
        await self.ops._require_bucket(call.bucket)
        await self._run(self.mp.get(call.bucket, call.key, upload_id))
        parts = await self.mp.parts(call.bucket, upload_id)
        marker = _int(call.query.get("part-number-marker"), 0)
        max_parts = max(0, min(_int(call.query.get("max-parts"), 1000), 1000))
        after = [p for p in parts if p.number > marker]
        page, truncated = after[:max_parts], len(after) > max_parts
        body = [xmlio.el("Bucket", call.bucket), xmlio.el("Key", call.key),
                xmlio.el("UploadId", upload_id), xmlio.el("PartNumberMarker", marker),
                xmlio.el("NextPartNumberMarker", page[-1].number if page else marker),
                xmlio.el("MaxParts", max_parts),
                xmlio.el("IsTruncated", "true" if truncated else "false"),
                "<StorageClass>STANDARD</StorageClass>"]
        for p in page:
            body.append("<Part>" + xmlio.el("PartNumber", p.number) +
                        xmlio.el("LastModified", xmlio.iso8601(p.modified)) +
                        xmlio.el("ETag", p.etag) + xmlio.el("Size", p.size) + "</Part>")
        return Response(200, list(XML), xmlio.document("ListPartsResult", "".join(body)))

    async def list_multipart_uploads(self, call: S3Call) -> Response:
        await self.ops._require_bucket(call.bucket)
        q = call.query
        prefix = q.get("prefix", "")
        key_marker = q.get("key-marker", "")
        id_marker = q.get("upload-id-marker", "")
        max_uploads = max(0, min(_int(q.get("max-uploads"), 1000), 1000))
        uploads = _after_marker(await self.mp.list_uploads(call.bucket, prefix),
                                key_marker, id_marker)
        page, truncated = uploads[:max_uploads], len(uploads) > max_uploads
        body = [xmlio.el("Bucket", call.bucket), xmlio.el("KeyMarker", key_marker),
                xmlio.el("UploadIdMarker", id_marker), xmlio.el("Prefix", prefix),
                xmlio.el("MaxUploads", max_uploads),
                xmlio.el("IsTruncated", "true" if truncated else "false")]
        if truncated and page:
            body += [xmlio.el("NextKeyMarker", page[-1].key),
                     xmlio.el("NextUploadIdMarker", page[-1].upload_id)]
        for u in page:
            body.append("<Upload>" + xmlio.el("Key", u.key) + xmlio.el("UploadId", u.upload_id) +
                        "<Initiator><ID>dgproxy</ID><DisplayName>dgproxy</DisplayName></Initiator>" +
                        xmlio.OWNER + "<StorageClass>STANDARD</StorageClass>" +
                        xmlio.el("Initiated", xmlio.iso8601(u.initiated)) + "</Upload>")
        return Response(200, list(XML),
                        xmlio.document("ListMultipartUploadsResult", "".join(body)))


def _after_marker(uploads: list, key_marker: str, id_marker: str) -> list:
    """S3 paging: uploads of keys after C{key_marker}; with C{id_marker}, also
    the marker key's uploads that come after that upload in the listing."""
    if not key_marker:
        return uploads
    marker = key_marker.encode("utf-8")
    if id_marker:
        for i, u in enumerate(uploads):
            if u.key == key_marker and u.upload_id == id_marker:
                return uploads[i + 1:]
    return [u for u in uploads if u.key.encode("utf-8") > marker]


def _int(value: Optional[str], default: int) -> int:
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        raise errors.InvalidArgument(f"Invalid integer argument {value!r}") from None
