"""The S3 front door: address, authenticate, route, answer.

Every S3 request passes through L{S3Front.handle}. It is the one place that
turns exceptions into S3 XML errors, so operations only raise.
"""

from __future__ import annotations

from twisted.logger import Logger
from zope.interface import implementer

from dgproxy.auth.authenticator import Authenticator, AuthFailure
from dgproxy.auth.sigv4 import SignedRequest
from dgproxy.engine.codec import CodecBusy
from dgproxy.engine.store import IntegrityError
from dgproxy.http.site import IRequestHandler
from dgproxy.s3 import errors
from dgproxy.s3.call import Response, S3Call, parse_query
from dgproxy.s3.names import parse_target
from dgproxy.s3.multipart_ops import MultipartOperations
from dgproxy.s3.operations import Operations
from dgproxy.storage.interface import (
    BackendUnavailable, BucketMissing, StorageError, UpstreamError)
from dgproxy.streams import ClientDisconnected

log = Logger(namespace="dgproxy.s3")

# Sub-resources S3 knows and dgproxy does not serve: answered 501 by name.
UNSUPPORTED = {
    "tagging": "Tagging", "policy": "BucketPolicy", "cors": "BucketCors",
    "lifecycle": "BucketLifecycle", "website": "BucketWebsite", "replication": "BucketReplication",
    "notification": "BucketNotification", "logging": "BucketLogging", "encryption": "BucketEncryption",
    "object-lock": "ObjectLock", "retention": "ObjectRetention", "legal-hold": "ObjectLegalHold",
    "versions": "ListObjectVersions", "torrent": "GetObjectTorrent", "restore": "RestoreObject",
    "select": "SelectObjectContent", "accelerate": "BucketAccelerate", "analytics": "BucketAnalytics",
    "inventory": "BucketInventory", "metrics": "BucketMetrics", "requestPayment": "BucketRequestPayment",
    "ownershipControls": "BucketOwnershipControls", "publicAccessBlock": "PublicAccessBlock",
    "intelligent-tiering": "BucketIntelligentTiering", "attributes": "GetObjectAttributes",
}

# Writes that ask for a guarantee dgproxy cannot give (objects that cannot be
# deleted or overwritten) are refused by name, never stored without it.
REFUSED_WRITE_HEADERS = {
    "x-amz-object-lock-mode": "ObjectLock", "x-amz-object-lock-retain-until-date": "ObjectLock",
    "x-amz-object-lock-legal-hold": "ObjectLegalHold",
    "x-amz-bucket-object-lock-enabled": "ObjectLock",
}


def not_implemented(operation: str) -> errors.S3Error:
    return errors.S3Error("NotImplemented", 501,
                          f"dgproxy does not implement the {operation} operation.")


@implementer(IRequestHandler)
class S3Front:
    def __init__(self, authenticator: Authenticator, operations: Operations,
                 multipart: MultipartOperations, virtual_host_domains=("localhost",),
                 metrics=None):
        self.authenticator = authenticator
        self.ops = operations
        self.mp = multipart
        self.write_gate = lambda bucket: False
        self.metrics = metrics
        self.virtual_host_domains = tuple(virtual_host_domains)

    async def handle(self, request) -> None:
        resource = request.raw_path.decode("latin-1")
        try:
            target = parse_target(request.raw_path, request.header("host"),
                                  self.virtual_host_domains)
            request.bucket = target.bucket or "-"
            request.operation = classify(request.method.decode("latin-1").upper(), target)
            signed = SignedRequest(
                method=request.method.decode("latin-1").upper(),
                raw_path=request.raw_path, raw_query=request.raw_query,
                headers=request.header_map())
            principal, auth = self.authenticator.authenticate(signed)
            request.principal = principal.name
            if self.metrics is not None and auth is not None:
                self.metrics.auth_ok()
            call = S3Call(request, target, parse_query(request.raw_query), auth)
            operation = self.route(call)
            if (target.bucket is not None and call.method in ("PUT", "POST", "DELETE")
                    and self.write_gate(target.bucket)):
                raise errors.SlowDown("A maintenance job is rewriting this bucket; writes are "
                                      "paused until it finishes.")
            request.operation = operation.__name__
            response = await operation(call)
        except AuthFailure as failure:
            if self.metrics is not None:
                self.metrics.auth_failed(failure.reason)
            log.info("Authentication failed ({reason}) for {ip} {request_id}",
                     reason=failure.reason, ip=request.client_ip(),
                     request_id=request.request_id)
            response = self.error_response(failure.error, resource, request.request_id)
        except errors.S3Error as e:
            response = self.error_response(e, resource, request.request_id)
        except ClientDisconnected:
            request.log_disconnect()
            return
        except CodecBusy as e:
            log.warn("Codec saturated on {request_id}: {error}", request_id=request.request_id,
                     error=str(e))
            response = self.error_response(errors.SlowDown(), resource, request.request_id)
        except IntegrityError as e:
            log.error("Integrity failure on {request_id}: {error}", request_id=request.request_id,
                      error=str(e))
            response = self.error_response(errors.InternalError(), resource, request.request_id)
        except BucketMissing as e:
            response = self.error_response(errors.NoSuchBucket(BucketName=str(e)), resource,
                                           request.request_id)
        except BackendUnavailable as e:
            response = self.error_response(
                errors.ServiceUnavailable(f"The storage backend '{e.backend}' is unavailable."),
                resource, request.request_id)
        except UpstreamError as e:
            log.error("Upstream error on {request_id}: {error}", request_id=request.request_id,
                      error=str(e))
            response = self.error_response(errors.from_upstream(e.status, e.code, e.message),
                                           resource, request.request_id)
        except StorageError as e:
            log.error("Storage error on {request_id}: {error}", request_id=request.request_id,
                      error=str(e))
            response = self.error_response(errors.InternalError(), resource, request.request_id)
        except Exception:
            log.failure("Internal error on {request_id}", request_id=request.request_id)
            response = self.error_response(errors.InternalError(), resource, request.request_id)
        await request.send(response.status, response.headers, response.body, response.length)

    @staticmethod
    def error_response(error: errors.S3Error, resource: str, request_id: str) -> Response:
        return Response(error.status, [("Content-Type", "application/xml")],
                        errors.render_error(error, resource, request_id))

    def route(self, call: S3Call):
        """The operation for a method, a target and the sub-resources present."""
        method, target, q = call.method, call.target, call.query
        ops = self.ops
        for param, name in UNSUPPORTED.items():
            if param in q:
                raise not_implemented(name)
        if method in ("PUT", "POST"):
            for header, name in REFUSED_WRITE_HEADERS.items():
                if call.header(header) is not None:
                    raise not_implemented(name)
        if target.bucket is None:
            if method == "GET":
                return ops.list_buckets
            if method == "HEAD":
                return head_root
            raise errors.MethodNotAllowed()
        if target.key is None:
            if "acl" in q:
                if method == "GET":
                    return ops.get_acl
                raise not_implemented("PutBucketAcl")
            if "location" in q and method == "GET":
                return ops.get_bucket_location
            if "versioning" in q:
                if method == "GET":
                    return ops.get_bucket_versioning
                raise not_implemented("PutBucketVersioning")
            if "delete" in q and method == "POST":
                return ops.delete_objects
            if "uploads" in q and method == "GET":
                return self.mp.list_multipart_uploads
            table = {"GET": ops.list_objects, "PUT": ops.create_bucket,
                     "HEAD": ops.head_bucket, "DELETE": ops.delete_bucket}
            if method in table:
                return table[method]
            if method == "POST":
                raise not_implemented("PostObject")
            raise errors.MethodNotAllowed()
        if "acl" in q:
            if method == "GET":
                return ops.get_acl
            raise not_implemented("PutObjectAcl")
        if "uploads" in q and method == "POST":
            return self.mp.create_multipart_upload
        if "uploadId" in q:
            table = {"PUT": self.mp.upload_part, "POST": self.mp.complete_multipart_upload,
                     "DELETE": self.mp.abort_multipart_upload, "GET": self.mp.list_parts}
            if method in table:
                return table[method]
            raise errors.MethodNotAllowed()
        if "partNumber" in q and method not in ("GET", "HEAD"):
            raise not_implemented("UploadPart without an uploadId")
        if method == "PUT":
            return ops.copy_object if call.header("x-amz-copy-source") else ops.put_object
        table = {"GET": ops.get_object, "HEAD": ops.head_object, "DELETE": ops.delete_object}
        if method in table:
            return table[method]
        raise errors.MethodNotAllowed()


def classify(method: str, target) -> str:
    """A coarse operation label, known before authentication (metrics)."""
    if target.bucket is None:
        return "list_buckets" if method == "GET" else "head_root"
    if target.key is None:
        return {"GET": "list_objects", "PUT": "create_bucket", "DELETE": "delete_bucket",
                "HEAD": "head_bucket"}.get(method, "post_bucket")
    return {"GET": "get_object", "PUT": "put_object", "DELETE": "delete_object",
            "HEAD": "head_object"}.get(method, "post_object")


async def head_root(call: S3Call) -> Response:
    """Some clients (Cyberduck) probe C{HEAD /}."""
    return Response(200)
