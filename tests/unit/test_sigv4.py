"""SigV4 verification, with botocore as the oracle for what clients send."""

from __future__ import annotations

import datetime as dt
from unittest import mock
from urllib.parse import urlsplit

import boto3
from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.utils import percent_encode
from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from dgproxy.auth import sigv4
from dgproxy.auth.sigv4 import AuthFailure, SignedRequest, is_anonymous, verify

AK, SK = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
T0 = dt.datetime(2026, 3, 14, 15, 9, 26, tzinfo=dt.timezone.utc)
SKEW = 300
ENDPOINT = "http://s3.local:8080"
SECRETS = {AK: SK, "other": "other-secret"}

KEYS = [
    "plain.txt", "with space/and more", "unicodé/ключ/鍵.bin", "a+b+c", "100%/sure",
    "!*'();:@&=$,?#[]", "tilde~under_score-dash.dot", "dir//double/./dot/../x",
    "trailing/", "emoji-\U0001F600", "tab\there", "quote\"s<and>{braces}|^`",
]


class Captured(Exception):
    """Raised by the before-send hook so no request leaves the process."""

    def __init__(self, request):
        super().__init__("captured")
        self.request = request


def _fixed_time(when=T0):
    return mock.patch("botocore.auth.get_current_datetime", return_value=when)


def _client(endpoint=ENDPOINT, **config):
    session = boto3.session.Session(aws_access_key_id=AK, aws_secret_access_key=SK,
                                    region_name="eu-west-3")
    client = session.client("s3", endpoint_url=endpoint,
                            config=Config(s3={"addressing_style": "path"}, **config))

    def capture(request, **_):
        raise Captured(request)

    client.meta.events.register("before-send.s3", capture)
    return client


def capture(client, operation, **params):
    """The prepared request botocore would send for C{operation}."""
    with _fixed_time():
        try:
            getattr(client, operation)(**params)
        except Captured as c:
            return c.request
    raise AssertionError("nothing captured")


def _host(url: str) -> str:
    parts = urlsplit(url)
    default = {"http": 80, "https": 443}[parts.scheme]
    if parts.port in (None, default):
        return parts.hostname
    return f"{parts.hostname}:{parts.port}"


def to_signed(method: str, url: str, headers) -> SignedRequest:
    """A SignedRequest as the HTTP layer would build it from the wire."""
    parts = urlsplit(url)
    out: dict[str, list[str]] = {}
    for name, value in headers.items():
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        out.setdefault(name.lower(), []).append(value)
    out.setdefault("host", [_host(url)])
    return SignedRequest(method, parts.path.encode("ascii"),
                         parts.query.encode("ascii"), out)


def from_prepared(prepared) -> SignedRequest:
    return to_signed(prepared.method, prepared.url, prepared.headers)


def sign(signer_cls, method, path, params=None, headers=None, body=b"",
         when=T0, secret=SK, region="us-east-1", **kw):
    """Sign by hand with a botocore signer; returns the SignedRequest."""
    url = ENDPOINT + path
    req = AWSRequest(method=method, url=url, params=params or {},
                     headers=dict(headers or {}), data=body)
    signer = signer_cls(Credentials(AK, secret), "s3", region, **kw)
    with _fixed_time(when):
        signer.add_auth(req)
    prepared = req.prepare()
    return from_prepared(prepared)


class UnsignedSigV4(SigV4Auth):
    """A generic signer that, like some S3 clients, sends no
    x-amz-content-sha256 and signs UNSIGNED-PAYLOAD."""

    def payload(self, request):
        return "UNSIGNED-PAYLOAD"


def lookup(akid):
    return SECRETS.get(akid)


def presign(client, operation, params, expires=3600, when=T0):
    with _fixed_time(when):
        url = client.generate_presigned_url(operation, Params=params, ExpiresIn=expires)
    return url


class Helpers:
    def assertVerifies(self, req, now=T0, **kw):
        result = verify(req, lookup, now, SKEW)
        self.assertEqual(result.access_key_id, AK)
        return result

    def assertRefused(self, req, reason, code, status, now=T0, lookup_fn=lookup):
        with self.assertRaises(AuthFailure) as cm:
            verify(req, lookup_fn, now, SKEW)
        self.assertEqual(cm.exception.reason, reason)
        self.assertEqual(cm.exception.error.code, code)
        self.assertEqual(cm.exception.error.status, status)
        return cm.exception


def _replace_header(req: SignedRequest, name: str, value: str) -> SignedRequest:
    headers = dict(req.headers)
    headers[name] = [value]
    return SignedRequest(req.method, req.raw_path, req.raw_query, headers)


def _flip(sig: str) -> str:
    return sig[:-1] + ("0" if sig[-1] != "0" else "1")


class BotocoreClientHeaderAuthTests(Helpers, unittest.TestCase):
    """What a real boto3 client sends verifies, for many operations and keys."""

    def setUp(self):
        self.client = _client()

    def test_operations(self):
        cases = [("list_buckets", {}),
                 ("create_bucket", {"Bucket": "bkt"}),
                 ("head_bucket", {"Bucket": "bkt"}),
                 ("list_objects_v2", {"Bucket": "bkt", "Prefix": "a b+c/ü", "Delimiter": "/",
                                      "ContinuationToken": "tok/en==+", "MaxKeys": 7}),
                 ("list_objects", {"Bucket": "bkt", "Marker": "m n", "Prefix": "p%q"}),
                 ("list_multipart_uploads", {"Bucket": "bkt"}),
                 ("delete_objects", {"Bucket": "bkt", "Delete": {"Objects": [{"Key": "a b"}]}}),
                 ("get_bucket_location", {"Bucket": "bkt"}),
                 ("get_bucket_versioning", {"Bucket": "bkt"})]
        for key in KEYS:
            cases += [
                ("get_object", {"Bucket": "bkt", "Key": key, "Range": "bytes=0-9",
                                "ResponseContentDisposition": 'attachment; filename="x y.txt"'}),
                ("head_object", {"Bucket": "bkt", "Key": key}),
                ("put_object", {"Bucket": "bkt", "Key": key, "Body": b"hello world",
                                "Metadata": {"note": "a   spaced  value"},
                                "ContentType": "text/plain"}),
                ("delete_object", {"Bucket": "bkt", "Key": key}),
                ("copy_object", {"Bucket": "bkt", "Key": key,
                                 "CopySource": {"Bucket": "src", "Key": key}}),
                ("create_multipart_upload", {"Bucket": "bkt", "Key": key}),
                ("upload_part", {"Bucket": "bkt", "Key": key, "UploadId": "up/load+id=",
                                 "PartNumber": 3, "Body": b"part"}),
                ("list_parts", {"Bucket": "bkt", "Key": key, "UploadId": "u 1"}),
                ("abort_multipart_upload", {"Bucket": "bkt", "Key": key, "UploadId": "u"}),
            ]
        for operation, params in cases:
            with self.subTest(operation=operation, params=params):
                req = from_prepared(capture(self.client, operation, **params))
                result = self.assertVerifies(req)
                self.assertFalse(result.presigned)
                self.assertIsNone(result.chunk_signing)

    def test_put_over_http_signs_the_body_hash(self):
        req = from_prepared(capture(self.client, "put_object", Bucket="b", Key="k",
                                    Body=b"hello world"))
        result = self.assertVerifies(req)
        self.assertEqual(result.payload_hash,
                         "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9")

    def test_put_over_https_streams_unsigned_trailer(self):
        client = _client("https://s3.example.com")
        req = from_prepared(capture(client, "put_object", Bucket="b", Key="k",
                                    Body=b"hello world"))
        result = self.assertVerifies(req)
        self.assertEqual(result.payload_hash, "STREAMING-UNSIGNED-PAYLOAD-TRAILER")
        self.assertIsNone(result.chunk_signing)

    def test_any_region(self):
        for region in ["us-east-1", "eu-central-2", "auto", "garage"]:
            req = sign(S3SigV4Auth, "GET", "/b/k", region=region)
            self.assertVerifies(req)


class HeaderAuthTests(Helpers, unittest.TestCase):

    def test_methods_with_generic_and_s3_signers(self):
        for method in ["GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS"]:
            for cls in (UnsignedSigV4, S3SigV4Auth):
                with self.subTest(method=method, signer=cls.__name__):
                    req = sign(cls, method, "/bucket/some/key.txt",
                               params={"a": "1", "b": "x y"},
                               headers={"X-Amz-Meta-Thing": "v"})
                    self.assertVerifies(req)

    def test_s3_keeps_dot_segments_and_double_slashes(self):
        for path in ["/b/a/../c", "/b//x", "/b/./y", "/b/%2E%2E/z"]:
            req = sign(S3SigV4Auth, "GET", path)
            self.assertVerifies(req)

    def test_path_signed_unencoded(self):
        """curl-style signers sign the path exactly as sent."""
        req = sign(S3SigV4Auth, "GET", "/b/it's!(ok)*+")
        self.assertEqual(req.raw_path, b"/b/it's!(ok)*+")
        self.assertVerifies(req)

    def test_lowercase_percent_escapes_are_canonicalised(self):
        req = sign(S3SigV4Auth, "GET", "/b/k%C3%A9y")
        lower = SignedRequest(req.method, b"/b/k%c3%a9y", req.raw_query, req.headers)
        self.assertVerifies(lower)

    def test_bare_query_names(self):
        req = sign(S3SigV4Auth, "POST", "/b/k?uploads")
        self.assertEqual(req.raw_query, b"uploads")
        self.assertVerifies(req)
        req = sign(S3SigV4Auth, "GET", "/b?acl&versioning")
        self.assertVerifies(req)

    def test_plus_in_query_means_space(self):
        # botocore urlencodes params ("a b" -> "a+b") but signs "a%20b".
        req = sign(S3SigV4Auth, "GET", "/b", params={"prefix": "a b", "x": "c+d"})
        self.assertIn(b"prefix=a+b", req.raw_query)
        self.assertIn(b"x=c%2Bd", req.raw_query)
        self.assertVerifies(req)

    def test_repeated_query_names_sorted_by_value(self):
        req = sign(S3SigV4Auth, "GET", "/b", params=[("k", "2"), ("k", "1"), ("a", "z")])
        self.assertVerifies(req)

    def test_date_header_instead_of_x_amz_date(self):
        req = sign(UnsignedSigV4, "GET", "/b/k", headers={"Date": "placeholder"})
        self.assertNotIn("x-amz-date", req.headers)
        self.assertEqual(req.headers["date"][0], "Sat, 14 Mar 2026 15:09:26 -0000")
        self.assertVerifies(req)

    def test_multi_valued_and_spaced_headers(self):
        url = ENDPOINT + "/b/k"
        req = AWSRequest(method="GET", url=url, headers={"X-Amz-Meta-A": "  x   y  z  "})
        with _fixed_time():
            S3SigV4Auth(Credentials(AK, SK), "s3", "us-east-1").add_auth(req)
        signed = from_prepared(req.prepare())
        self.assertVerifies(signed)
        # the same value collapsed differently on the wire still matches
        self.assertVerifies(_replace_header(signed, "x-amz-meta-a", "x y\t z"))

    def test_unsigned_extra_headers_tolerated(self):
        req = sign(S3SigV4Auth, "GET", "/b/k")
        self.assertVerifies(_replace_header(req, "user-agent", "anything"))
        self.assertVerifies(_replace_header(req, "x-forwarded-for", "1.2.3.4"))

    def test_streaming_signed_payload_gives_chunk_signing(self):
        req = sign(SigV4Auth, "PUT", "/b/k", headers={
            "X-Amz-Content-SHA256": "STREAMING-AWS4-HMAC-SHA256-PAYLOAD",
            "Content-Encoding": "aws-chunked", "X-Amz-Decoded-Content-Length": "5"})
        result = self.assertVerifies(req)
        self.assertEqual(result.payload_hash, "STREAMING-AWS4-HMAC-SHA256-PAYLOAD")
        cs = result.chunk_signing
        self.assertEqual(cs.amz_date, "20260314T150926Z")
        self.assertEqual(cs.scope, "20260314/us-east-1/s3/aws4_request")
        self.assertEqual(cs.seed_signature,
                         req.headers["authorization"][0].rsplit("Signature=", 1)[1])
        self.assertEqual(cs.signing_key, sigv4.signing_key(SK, "20260314", "us-east-1"))

    def test_missing_content_sha256_is_unsigned(self):
        req = sign(UnsignedSigV4, "GET", "/b/k")
        self.assertNotIn("x-amz-content-sha256", req.headers)
        self.assertEqual(self.assertVerifies(req).payload_hash, "UNSIGNED-PAYLOAD")

    # refusals
    def test_tampered_signed_header(self):
        req = sign(S3SigV4Auth, "PUT", "/b/k", headers={"X-Amz-Meta-A": "1"}, body=b"x")
        self.assertRefused(_replace_header(req, "x-amz-meta-a", "2"),
                           "invalid_signature", "AccessDenied", 403)
        self.assertRefused(_replace_header(req, "host", "evil.local:8080"),
                           "invalid_signature", "AccessDenied", 403)
        self.assertRefused(_replace_header(req, "x-amz-content-sha256", "UNSIGNED-PAYLOAD"),
                           "invalid_signature", "AccessDenied", 403)

    def test_tampered_path_query_method(self):
        req = sign(S3SigV4Auth, "GET", "/b/k", params={"versionId": "1"})
        for bad in [SignedRequest("GET", b"/b/k2", req.raw_query, req.headers),
                    SignedRequest("GET", b"/b/K", req.raw_query, req.headers),
                    SignedRequest("GET", b"/b/k", b"versionId=2", req.headers),
                    SignedRequest("GET", b"/b/k", req.raw_query + b"&acl", req.headers),
                    SignedRequest("GET", b"/b/k", b"", req.headers),
                    SignedRequest("DELETE", req.raw_path, req.raw_query, req.headers)]:
            with self.subTest(bad=bad):
                self.assertRefused(bad, "invalid_signature", "AccessDenied", 403)

    def test_tampered_signature(self):
        req = sign(S3SigV4Auth, "GET", "/b/k")
        auth = req.headers["authorization"][0]
        sig = auth.rsplit("=", 1)[1]
        for bad_sig in [_flip(sig), sig.upper(), sig[:-1], "", "zz" * 32, "é" * 64]:
            with self.subTest(sig=bad_sig):
                bad = _replace_header(req, "authorization", auth.replace(sig, bad_sig))
                self.assertRefused(bad, "invalid_signature", "AccessDenied", 403)

    def test_wrong_secret_and_unknown_key_look_the_same(self):
        wrong = self.assertRefused(sign(S3SigV4Auth, "GET", "/b/k", secret="nope"),
                                   "invalid_signature", "AccessDenied", 403)
        unknown = self.assertRefused(sign(S3SigV4Auth, "GET", "/b/k"),
                                     "invalid_access_key", "AccessDenied", 403,
                                     lookup_fn=lambda akid: None)
        self.assertEqual(wrong.error.message, unknown.error.message)

    def test_lookup_may_refuse_disabled_user(self):
        def disabled(akid):
            raise AuthFailure("user_disabled", sigv4.AccessDenied())
        self.assertRefused(sign(S3SigV4Auth, "GET", "/b/k"),
                           "user_disabled", "AccessDenied", 403, lookup_fn=disabled)

    def test_clock_skew(self):
        req = sign(S3SigV4Auth, "GET", "/b/k")
        d = dt.timedelta(seconds=SKEW)
        self.assertVerifies(req, now=T0 + d)
        self.assertVerifies(req, now=T0 - d)
        self.assertVerifies(req, now=(T0 + d).replace(tzinfo=None))  # naive means UTC
        for now in [T0 + d + dt.timedelta(seconds=1), T0 - d - dt.timedelta(seconds=1),
                    dt.datetime(2099, 1, 1, tzinfo=dt.timezone.utc)]:
            self.assertRefused(req, "clock_skew", "RequestTimeTooSkewed", 403, now=now)

    def test_skew_is_checked_before_the_key(self):
        """A skewed request does not reveal whether its key exists."""
        req = sign(S3SigV4Auth, "GET", "/b/k")
        self.assertRefused(req, "clock_skew", "RequestTimeTooSkewed", 403,
                           now=T0 + dt.timedelta(hours=1), lookup_fn=lambda a: None)

    def test_missing_auth(self):
        req = SignedRequest("GET", b"/b/k", b"", {"host": ["s3.local"]})
        self.assertTrue(is_anonymous(req))
        self.assertRefused(req, "missing_header", "AccessDenied", 403)

    def test_malformed_authorization(self):
        good = sign(S3SigV4Auth, "GET", "/b/k")
        auth = good.headers["authorization"][0]
        bad_values = [
            "Basic dXNlcjpwYXNz",
            "AWS AKID:signature",
            "AWS4-HMAC-SHA256",
            auth.replace("Credential=", "Cred="),
            auth.replace(", Signature=", ", Sig="),
            auth + ", Signature=abc",
            auth.replace("/s3/", "/ec2/"),
            auth.replace("/aws4_request", "/aws5_request"),
            auth.replace("/20260314/", "/2026031/"),
            auth.replace(f"Credential={AK}/", "Credential="),
            auth.replace("SignedHeaders=host;", "SignedHeaders="),
            auth.replace("SignedHeaders=", "SignedHeaders=;"),
        ]
        for value in bad_values:
            with self.subTest(value=value):
                err = self.assertRefused(_replace_header(good, "authorization", value),
                                         "missing_header", "InvalidArgument", 400)
                self.assertTrue(err.error.message)

    def test_bad_dates(self):
        good = sign(S3SigV4Auth, "GET", "/b/k")
        self.assertRefused(_replace_header(good, "x-amz-date", "2026-03-14T15:09:26Z"),
                           "missing_header", "InvalidArgument", 400)
        self.assertRefused(_replace_header(good, "x-amz-date", "20260399T150926Z"),
                           "missing_header", "InvalidArgument", 400)
        # scope date and request date disagree
        self.assertRefused(_replace_header(good, "x-amz-date", "20260315T000000Z"),
                           "missing_header", "InvalidArgument", 400,
                           now=dt.datetime(2026, 3, 15, tzinfo=dt.timezone.utc))
        headers = {k: v for k, v in good.headers.items() if k != "x-amz-date"}
        self.assertRefused(SignedRequest("GET", good.raw_path, b"", headers),
                           "missing_header", "AccessDenied", 403)

    def test_bad_content_sha256(self):
        good = sign(S3SigV4Auth, "PUT", "/b/k", body=b"x")
        for value in ["nothex", "STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD", "ab" * 31]:
            self.assertRefused(_replace_header(good, "x-amz-content-sha256", value),
                               "missing_header", "InvalidArgument", 400)

    def test_both_mechanisms(self):
        req = sign(S3SigV4Auth, "GET", "/b/k")
        both = SignedRequest("GET", req.raw_path, b"X-Amz-Algorithm=AWS4-HMAC-SHA256",
                             req.headers)
        self.assertRefused(both, "missing_header", "InvalidArgument", 400)


class PresignedTests(Helpers, unittest.TestCase):

    def setUp(self):
        self.client = _client()

    def _req(self, url, method="GET", headers=None):
        return to_signed(method, url, headers or {})

    def test_client_presigned_urls(self):
        for key in KEYS:
            for operation, method, extra in [
                    ("get_object", "GET", {"ResponseContentDisposition": 'inline; f="a b"',
                                           "VersionId": "v+1/="}),
                    ("put_object", "PUT", {}),
                    ("head_object", "HEAD", {}),
                    ("delete_object", "DELETE", {}),
                    ("upload_part", "PUT", {"UploadId": "u/p+", "PartNumber": 2})]:
                with self.subTest(key=key, operation=operation):
                    url = presign(self.client, operation, {"Bucket": "bkt", "Key": key, **extra})
                    result = self.assertVerifies(self._req(url, method))
                    self.assertTrue(result.presigned)
                    self.assertEqual(result.payload_hash, "UNSIGNED-PAYLOAD")
                    self.assertIsNone(result.chunk_signing)

    def test_presigned_put_ignores_body_headers(self):
        url = presign(self.client, "put_object", {"Bucket": "b", "Key": "k"})
        req = self._req(url, "PUT", {"Content-Length": "5", "X-Amz-Content-SHA256": "ab" * 32,
                                     "Content-Type": "text/plain"})
        self.assertEqual(self.assertVerifies(req).payload_hash, "UNSIGNED-PAYLOAD")

    def test_query_auth_signer_with_signed_headers(self):
        req = sign(S3SigV4QueryAuth, "PUT", "/b/k%20y", params={"partNumber": "1"},
                   headers={"X-Amz-Meta-Z": "q"}, expires=60)
        self.assertIn(b"X-Amz-SignedHeaders=host%3Bx-amz-meta-z", req.raw_query)
        self.assertVerifies(req)
        self.assertRefused(_replace_header(req, "x-amz-meta-z", "r"),
                           "invalid_signature", "AccessDenied", 403)

    def test_expiry(self):
        url = presign(self.client, "get_object", {"Bucket": "b", "Key": "k"}, expires=600)
        req = self._req(url)
        self.assertVerifies(req, now=T0 + dt.timedelta(seconds=600))
        self.assertRefused(req, "expired_presigned", "AccessDenied", 403,
                           now=T0 + dt.timedelta(seconds=601))
        # past-dated but not expired: no skew rule for presigned
        self.assertVerifies(req, now=T0 + dt.timedelta(seconds=599))

    def test_seven_days_ok_eight_days_refused(self):
        week = presign(self.client, "get_object", {"Bucket": "b", "Key": "k"}, expires=604800)
        self.assertVerifies(self._req(week), now=T0 + dt.timedelta(days=6))
        eight = presign(self.client, "get_object", {"Bucket": "b", "Key": "k"},
                        expires=8 * 86400)
        err = self.assertRefused(self._req(eight), "invalid_presigned", "InvalidArgument", 400)
        self.assertIn("604800", err.error.message)

    def test_future_dated(self):
        url = presign(self.client, "get_object", {"Bucket": "b", "Key": "k"},
                      when=T0 + dt.timedelta(seconds=SKEW + 1))
        self.assertRefused(self._req(url), "clock_skew", "RequestTimeTooSkewed", 403)
        url = presign(self.client, "get_object", {"Bucket": "b", "Key": "k"},
                      when=T0 + dt.timedelta(seconds=SKEW))
        self.assertVerifies(self._req(url))

    def test_tampering(self):
        url = presign(self.client, "get_object", {"Bucket": "b", "Key": "k"})
        req = self._req(url)
        q = req.raw_query
        sig = q.rsplit(b"X-Amz-Signature=", 1)[1]
        for bad in [SignedRequest("GET", b"/b/other", q, req.headers),
                    SignedRequest("PUT", req.raw_path, q, req.headers),
                    SignedRequest("GET", req.raw_path, q + b"&extra=1", req.headers),
                    SignedRequest("GET", req.raw_path,
                                  q.replace(sig, _flip(sig.decode()).encode()), req.headers),
                    SignedRequest("GET", req.raw_path, q.replace(b"X-Amz-Expires=3600",
                                                                 b"X-Amz-Expires=3601"),
                                  req.headers),
                    _replace_header(req, "host", "elsewhere")]:
            with self.subTest(bad=bad):
                self.assertRefused(bad, "invalid_signature", "AccessDenied", 403)

    def test_wrong_key(self):
        url = presign(self.client, "get_object", {"Bucket": "b", "Key": "k"})
        self.assertRefused(self._req(url), "invalid_access_key", "AccessDenied", 403,
                           lookup_fn=lambda a: None)
        self.assertRefused(self._req(url), "invalid_signature", "AccessDenied", 403,
                           lookup_fn=lambda a: "wrong")

    def test_malformed_parameters(self):
        url = presign(self.client, "get_object", {"Bucket": "b", "Key": "k"})
        req = self._req(url)
        q = req.raw_query.decode()
        cred = [p for p in q.split("&") if p.startswith("X-Amz-Credential=")][0]
        cases = [
            (q.replace("X-Amz-Expires=3600", "X-Amz-Expires=abc"), "InvalidArgument"),
            (q.replace("X-Amz-Expires=3600", "X-Amz-Expires=-5"), "InvalidArgument"),
            (q.replace("X-Amz-Expires=3600&", ""), "InvalidArgument"),
            (q.replace("X-Amz-Date=20260314T150926Z", "X-Amz-Date=yesterday"),
             "InvalidArgument"),
            (q.replace("%2Fs3%2F", "%2Fsqs%2F"), "InvalidArgument"),
            (q.replace("X-Amz-Algorithm=AWS4-HMAC-SHA256", "X-Amz-Algorithm=AWS4-HMAC-SHA1"),
             "InvalidArgument"),
            (q.replace("X-Amz-SignedHeaders=host", "X-Amz-SignedHeaders=x-amz-date"),
             "InvalidArgument"),
            (q + "&X-Amz-Date=20260314T150926Z", "InvalidArgument"),
            (q.replace(cred, "X-Amz-Credential=nokeyhere"), "AccessDenied"),
            (q.replace(cred + "&", ""), "AccessDenied"),
            (q.split("&X-Amz-Signature=")[0], "AccessDenied"),
        ]
        for query, code in cases:
            with self.subTest(query=query):
                bad = SignedRequest("GET", req.raw_path, query.encode(), req.headers)
                self.assertRefused(bad, "invalid_presigned", code,
                                   400 if code == "InvalidArgument" else 403)

    def test_algorithm_detected_by_decoded_name_only(self):
        req = SignedRequest("GET", b"/b/k", b"x=X-Amz-Algorithm%3D1", {"host": ["h"]})
        self.assertTrue(is_anonymous(req))
        req = SignedRequest("GET", b"/b/k", b"X-Amz-%41lgorithm=x", {"host": ["h"]})
        self.assertFalse(is_anonymous(req))


_key_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)
_query_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
_params = st.dictionaries(
    _query_text.filter(lambda k: not k.lower().startswith("x-amz-")), _query_text, max_size=5)


class PropertyTests(Helpers, unittest.TestCase):

    @settings(max_examples=200, deadline=None)
    @given(key=_key_text, params=_params, method=st.sampled_from(["GET", "PUT", "DELETE"]))
    def test_header_auth(self, key, params, method):
        path = "/bkt/" + percent_encode(key, safe="/~")
        req = sign(S3SigV4Auth, method, path, params=params, body=b"data")
        self.assertVerifies(req)

    @settings(max_examples=200, deadline=None)
    @given(key=_key_text, params=_params)
    def test_presigned(self, key, params):
        path = "/bkt/" + percent_encode(key, safe="/~")
        req = sign(S3SigV4QueryAuth, "GET", path, params=params, expires=900)
        self.assertTrue(req.raw_query)
        self.assertVerifies(req)

    @settings(max_examples=100, deadline=None)
    @given(key=_key_text, other=_key_text, params=_params)
    def test_other_key_refused(self, key, other, params):
        path = "/bkt/" + percent_encode(key, safe="/~")
        req = sign(S3SigV4Auth, "GET", path, params=params)
        moved = SignedRequest("GET", ("/bkt/" + percent_encode(other, safe="/~")).encode(),
                              req.raw_query, req.headers)
        if other == key:
            self.assertVerifies(moved)
        else:
            self.assertRefused(moved, "invalid_signature", "AccessDenied", 403)

    @settings(max_examples=100, deadline=None)
    @given(params=_params, extra=st.tuples(
        _query_text.filter(lambda k: k and not k.lower().startswith("x-amz-")), _query_text))
    def test_added_query_param_refused(self, params, extra):
        req = sign(S3SigV4Auth, "GET", "/bkt/k", params=params)
        name, value = extra
        more = (percent_encode(name) + "=" + percent_encode(value)).encode()
        bad = SignedRequest("GET", req.raw_path,
                            (req.raw_query + b"&" if req.raw_query else b"") + more,
                            req.headers)
        self.assertRefused(bad, "invalid_signature", "AccessDenied", 403)


AWS_DOC_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
AWS_DOC_NOW = dt.datetime(2013, 5, 24, 0, 1, tzinfo=dt.timezone.utc)


class AwsDocumentationVectorTests(unittest.TestCase):
    """The worked examples of the S3 SigV4 documentation, as an oracle
    independent of botocore."""

    def _lookup(self, akid):
        return AWS_DOC_SECRET if akid == "AKIAIOSFODNN7EXAMPLE" else None

    def test_get_object_header_auth(self):
        req = SignedRequest("GET", b"/test.txt", b"", {
            "host": ["examplebucket.s3.amazonaws.com"], "range": ["bytes=0-9"],
            "x-amz-content-sha256": [sigv4.EMPTY_SHA256], "x-amz-date": ["20130524T000000Z"],
            "authorization": [
                "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/"
                "aws4_request,SignedHeaders=host;range;x-amz-content-sha256;x-amz-date,"
                "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"]})
        self.assertEqual(verify(req, self._lookup, AWS_DOC_NOW, SKEW).access_key_id,
                         "AKIAIOSFODNN7EXAMPLE")

    def test_presigned_get(self):
        query = (b"X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE"
                 b"%2F20130524%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20130524T000000Z"
                 b"&X-Amz-Expires=86400&X-Amz-SignedHeaders=host&X-Amz-Signature="
                 b"aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404")
        req = SignedRequest("GET", b"/test.txt", query,
                            {"host": ["examplebucket.s3.amazonaws.com"]})
        self.assertTrue(verify(req, self._lookup, AWS_DOC_NOW, SKEW).presigned)
        with self.assertRaises(AuthFailure) as cm:
            verify(req, self._lookup, AWS_DOC_NOW + dt.timedelta(days=1), SKEW)
        self.assertEqual(cm.exception.reason, "expired_presigned")
