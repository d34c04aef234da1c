"""The one S3 error type every layer raises, and its XML rendering.

A handler raises; it never formats. The HTTP edge catches L{S3Error} and
calls L{render_error} once.
"""

import re
from xml.sax.saxutils import escape


class S3Error(Exception):
    """An S3 protocol error: an AWS error code, an HTTP status and a message."""

    def __init__(self, code: str, status: int, message: str, **extra: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.status = status
        self.message = message
        self.extra = extra

    def __repr__(self) -> str:
        return f"S3Error({self.code!r}, {self.status}, {self.message!r})"


def _factory(code: str, status: int, default: str):
    def make(message: str = default, **extra: str) -> S3Error:
        return S3Error(code, status, message, **extra)

    make.__name__ = code
    make.__doc__ = f"{status} {code}"
    return make


AccessDenied = _factory("AccessDenied", 403, "Access Denied")
RequestTimeTooSkewed = _factory(
    "RequestTimeTooSkewed", 403,
    "The difference between the request time and the server's time is too large.")
SignatureDoesNotMatch = _factory(
    "SignatureDoesNotMatch", 403,
    "The request signature we calculated does not match the signature you provided.")
NoSuchBucket = _factory("NoSuchBucket", 404, "The specified bucket does not exist")
NoSuchKey = _factory("NoSuchKey", 404, "The specified key does not exist.")
NoSuchUpload = _factory("NoSuchUpload", 404, "The specified upload does not exist.")
BucketNotEmpty = _factory("BucketNotEmpty", 409, "The bucket you tried to delete is not empty")
BucketAlreadyOwnedByYou = _factory(
    "BucketAlreadyOwnedByYou", 409,
    "Your previous request to create the named bucket succeeded and you already own it.")
InvalidBucketName = _factory("InvalidBucketName", 400, "The specified bucket is not valid.")
KeyTooLongError = _factory("KeyTooLongError", 400, "Your key is too long")
EntityTooLarge = _factory(
    "EntityTooLarge", 400, "Your proposed upload exceeds the maximum allowed object size.")
IncompleteBody = _factory(
    "IncompleteBody", 400,
    "You did not provide the number of bytes specified by the Content-Length HTTP header.")
MalformedXML = _factory(
    "MalformedXML", 400,
    "The XML you provided was not well-formed or did not validate against our published schema.")
InvalidArgument = _factory("InvalidArgument", 400, "Invalid Argument")
InvalidRequest = _factory("InvalidRequest", 400, "Invalid Request")
InvalidDigest = _factory("InvalidDigest", 400, "The Content-MD5 you specified is not valid.")
BadDigest = _factory(
    "BadDigest", 400, "The Content-MD5 you specified did not match what we received.")
XAmzContentSHA256Mismatch = _factory(
    "XAmzContentSHA256Mismatch", 400,
    "The provided 'x-amz-content-sha256' header does not match what was computed.")
InvalidRange = _factory("InvalidRange", 416, "The requested range is not satisfiable")
InvalidPartNumber = _factory("InvalidPartNumber", 416, "The requested partnumber is not satisfiable")
PreconditionFailed = _factory(
    "PreconditionFailed", 412, "At least one of the pre-conditions you specified did not hold")
MethodNotAllowed = _factory(
    "MethodNotAllowed", 405, "The specified method is not allowed against this resource.")
MissingContentLength = _factory(
    "MissingContentLength", 411, "You must provide the Content-Length HTTP header.")
NotImplemented_ = _factory("NotImplemented", 501, "A header you provided implies functionality that is not implemented.")
SlowDown = _factory("SlowDown", 503, "Please reduce your request rate.")
ServiceUnavailable = _factory("ServiceUnavailable", 503, "Service is unable to handle request.")
QuotaExceeded = _factory("QuotaExceeded", 403, "The bucket quota has been exceeded.")
InternalError = _factory(
    "InternalError", 500, "We encountered an internal error. Please try again.")


# Upstream answers that mean the service refused dgproxy's own credentials,
# clock, account, signing or KMS key (any "KMS.*" code): nothing the client
# could change, so not passed on.
_BACKEND_REFUSALS = frozenset({
    "AccessDenied", "AccountProblem", "AllAccessDisabled", "AuthorizationHeaderMalformed",
    "ExpiredToken", "InvalidAccessKeyId", "InvalidSecurity", "InvalidToken",
    "RequestTimeTooSkewed", "SignatureDoesNotMatch", "TokenRefreshRequired",
    "XAmzContentSHA256Mismatch"})
_UPSTREAM_CODE = re.compile(r"[A-Za-z][A-Za-z0-9.]{0,63}")
_UNPRINTABLE = re.compile(r"[^\t\x20-\x7e\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def from_upstream(status: int, code: str, message: str) -> S3Error:
    """What the client is told when the S3 backend answered with an error.

    A 503 (throttling) keeps its code so the client backs off as it would
    against the service itself. Other 4xx answers are about the request (a
    key the service will not take, a body too large, …) and keep their status,
    code and message, so the client fails fast instead of retrying a 500;
    except those that refuse dgproxy's own credentials or KMS key, which, like
    upstream 5xx answers, are dgproxy's problem: 500 InternalError (and a log
    line).
    """
    known = bool(_UPSTREAM_CODE.fullmatch(code)) and not code.startswith("HTTP")
    text = _UNPRINTABLE.sub("", message)[:512]
    if status == 503:
        return S3Error(code if known else "SlowDown", 503,
                       text or "Please reduce your request rate.")
    if (400 <= status < 500 and status not in (401, 403, 407) and known
            and code not in _BACKEND_REFUSALS and not code.startswith("KMS.")):
        return S3Error(code, status, text or code)
    return InternalError()


def _text(value) -> str:
    return escape(str(value), {"\r": "&#13;"})


def render_error(error: S3Error, resource: str, request_id: str) -> bytes:
    """The S3 XML body for C{error}."""
    parts = [
        '<?xml version="1.0" encoding="UTF-8"?>\n<Error>',
        f"<Code>{_text(error.code)}</Code>",
        f"<Message>{_text(error.message)}</Message>",
    ]
    for name, value in error.extra.items():
        parts.append(f"<{name}>{_text(value)}</{name}>")
    parts.append(f"<Resource>{_text(resource)}</Resource>")
    parts.append(f"<RequestId>{_text(request_id)}</RequestId></Error>")
    return "".join(parts).encode("utf-8")
