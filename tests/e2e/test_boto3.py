"""End-to-end: a real dgproxy process driven by boto3 (and raw HTTP where a
real client does something boto3 cannot: presigned URLs, virtual-host style).

One server for the whole module (trial has no setUpClass), started on first
use and stopped at interpreter exit; every test works in its own bucket.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.client
import os
import time
from datetime import datetime, timedelta, timezone
from typing import Optional
from urllib.parse import quote, unquote, urlsplit

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from twisted.trial import unittest

from tests.e2e.harness import (
    ACCESS_KEY, SECRET_KEY, LiveProxyCase, SharedProxy, md5_etag)

shared_proxy = SharedProxy().get


# Keys a user may well have; each must survive PUT, GET, HEAD, LIST, COPY, DELETE.
SPECIAL_KEYS = [
    "with space.txt",
    "dir with space/file name.txt",
    "ünïcødé/файл-日本語.txt",
    "plus+sign.txt",
    "percent%20literal%.txt",
    "equals=sign.txt",
    "amp&ersand.txt",
    "query?mark#hash.txt",
    "tilde~and(parens)!'*.txt",
    "semi;colon,comma:@$.txt",
]


class S3Case(LiveProxyCase, unittest.TestCase):
    """Shared plumbing: the server, a fresh bucket per test, error checks."""

    def setUp(self):
        self.proxy = shared_proxy()
        self.s3 = self.proxy.client()
        self.s3v4 = self.proxy.client(signature_version="s3v4")  # for presigning



    def expect_error(self, status: int, code: str, fn, *args, **kwargs) -> ClientError:
        e = self.assertRaises(ClientError, fn, *args, **kwargs)
        self.assertEqual(e.response["ResponseMetadata"]["HTTPStatusCode"], status, e.response)
        self.assertEqual(e.response["Error"]["Code"], code, e.response)
        return e

    def keys(self, bucket: str, **kwargs) -> list[str]:
        out = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, **kwargs):
            out += [o["Key"] for o in page.get("Contents", [])]
        return out

    # raw HTTP --------------------------------------------------------------
    def http(self, method: str, url_or_path: str, body: Optional[bytes] = None,
             headers: Optional[dict] = None):
        """(status, lowercase headers, body) of one request to the proxy."""
        u = urlsplit(url_or_path)
        path = u.path + ("?" + u.query if u.query else "")
        conn = http.client.HTTPConnection("127.0.0.1", self.proxy.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            data = r.read()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, data
        finally:
            conn.close()

    def signed(self, method: str, host: str, path: str, body: bytes = b"",
               headers: Optional[dict] = None, secret: str = SECRET_KEY):
        """A SigV4-signed request (botocore's signer) sent with C{Host: host}."""
        req = AWSRequest(method=method, url=f"http://{host}{path}", data=body,
                         headers=dict(headers or {}))
        req.headers["Host"] = host
        req.context["payload_signing_enabled"] = True
        S3SigV4Auth(Credentials(ACCESS_KEY, secret), "s3", "us-east-1").add_auth(req)
        return self.http(method, path, body if body else None, dict(req.headers.items()))


class BucketTests(S3Case):

    def test_bucket_lifecycle(self):
        name = self.new_bucket(create=False)
        created = self.s3.create_bucket(Bucket=name)
        self.assertEqual(created["ResponseMetadata"]["HTTPStatusCode"], 200)
        self.assertEqual(self.s3.head_bucket(Bucket=name)["ResponseMetadata"]["HTTPStatusCode"],
                         200)
        self.assertIn(name, [b["Name"] for b in self.s3.list_buckets()["Buckets"]])
        self.expect_error(409, "BucketAlreadyOwnedByYou", self.s3.create_bucket, Bucket=name)

        self.s3.put_object(Bucket=name, Key="dir/obj", Body=b"x")
        self.expect_error(409, "BucketNotEmpty", self.s3.delete_bucket, Bucket=name)
        self.assertEqual(self.s3.get_object(Bucket=name, Key="dir/obj")["Body"].read(), b"x")

        self.s3.delete_object(Bucket=name, Key="dir/obj")
        deleted = self.s3.delete_bucket(Bucket=name)
        self.assertEqual(deleted["ResponseMetadata"]["HTTPStatusCode"], 204)
        self.expect_error(404, "404", self.s3.head_bucket, Bucket=name)
        self.assertNotIn(name, [b["Name"] for b in self.s3.list_buckets()["Buckets"]])
        self.expect_error(404, "NoSuchBucket", self.s3.delete_bucket, Bucket=name)

    def test_missing_bucket(self):
        name = self.new_bucket(create=False)
        self.expect_error(404, "NoSuchBucket", self.s3.list_objects_v2, Bucket=name)
        self.expect_error(404, "NoSuchBucket", self.s3.list_objects, Bucket=name)
        self.expect_error(404, "NoSuchBucket", self.s3.get_object, Bucket=name, Key="k")
        self.expect_error(404, "NoSuchBucket", self.s3.put_object, Bucket=name, Key="k",
                          Body=b"data")
        self.expect_error(404, "NoSuchBucket", self.s3.delete_object, Bucket=name, Key="k")
        self.expect_error(404, "404", self.s3.head_object, Bucket=name, Key="k")
        self.assertNotIn(name, [b["Name"] for b in self.s3.list_buckets()["Buckets"]])

    def test_invalid_bucket_name(self):
        for bad in ("Upper_Case", "ab", "-leading-dash", "192.168.1.1"):
            self.expect_error(400, "InvalidBucketName", self.s3.create_bucket, Bucket=bad)
        names = [b["Name"] for b in self.s3.list_buckets()["Buckets"]]
        self.assertFalse({"Upper_Case", "ab", "-leading-dash", "192.168.1.1"} & set(names))

    def test_bucket_stubs(self):
        name = self.new_bucket()
        loc = self.s3.get_bucket_location(Bucket=name)
        self.assertIn(loc.get("LocationConstraint"), (None, ""))
        self.assertEqual(self.s3.get_bucket_versioning(Bucket=name)
                         ["ResponseMetadata"]["HTTPStatusCode"], 200)
        acl = self.s3.get_bucket_acl(Bucket=name)
        self.assertEqual([g["Permission"] for g in acl["Grants"]], ["FULL_CONTROL"])


class ObjectTests(S3Case):

    def test_round_trip_sizes(self):
        bucket = self.new_bucket()
        bodies = {
            "empty": b"",
            "one": b"\x00",
            "small.txt": b"hello, dgproxy\n",
            "kib/random.dat": os.urandom(4096 + 7),
            "mib/random.bin": os.urandom(3 * 1024 * 1024 + 11),
        }
        for key, body in bodies.items():
            put = self.s3.put_object(Bucket=bucket, Key=key, Body=body)
            self.assertEqual(put["ETag"], md5_etag(body), key)
        for key, body in bodies.items():
            got = self.s3.get_object(Bucket=bucket, Key=key)
            self.assertEqual(got["Body"].read(), body, key)
            self.assertEqual(got["ContentLength"], len(body), key)
            self.assertEqual(got["ETag"], md5_etag(body), key)
            self.assertEqual(got["ContentType"], "application/octet-stream", key)
            head = self.s3.head_object(Bucket=bucket, Key=key)
            self.assertEqual(head["ContentLength"], len(body), key)
            self.assertEqual(head["ETag"], md5_etag(body), key)
            self.assertEqual(head["AcceptRanges"], "bytes")
            self.assertIsInstance(head["LastModified"], datetime)
        listed = self.s3.list_objects_v2(Bucket=bucket)["Contents"]
        self.assertEqual({o["Key"]: (o["Size"], o["ETag"]) for o in listed},
                         {k: (len(b), md5_etag(b)) for k, b in bodies.items()})
        # Overwrite: the new bytes win, everywhere.
        self.s3.put_object(Bucket=bucket, Key="small.txt", Body=b"v2")
        self.assertEqual(self.s3.get_object(Bucket=bucket, Key="small.txt")["Body"].read(), b"v2")
        self.assertEqual(self.s3.head_object(Bucket=bucket, Key="small.txt")["ETag"],
                         md5_etag(b"v2"))
        self.expect_error(404, "NoSuchKey", self.s3.get_object, Bucket=bucket, Key="absent")
        self.expect_error(404, "404", self.s3.head_object, Bucket=bucket, Key="absent")
        self.assertEqual(self.proxy.temp_files(), [])
        # Every object file the GETs opened has been closed again.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            held = [p for p in self.proxy.open_fds() if p.startswith(self.proxy.data_dir)]
            if not held:
                break
            time.sleep(0.1)
        self.assertEqual(held, [])

    def test_head_content_length(self):
        """HEAD says how long the object (or the requested range) is."""
        bucket = self.new_bucket()
        for key, body in (("empty", b""), ("small", b"hello world"),
                          ("big.bin", os.urandom(300000))):
            self.s3.put_object(Bucket=bucket, Key=key, Body=body)
            head = self.s3.head_object(Bucket=bucket, Key=key)
            self.assertEqual(head.get("ContentLength"), len(body), key)
            self.assertEqual(head["ResponseMetadata"]["HTTPHeaders"].get("content-length"),
                             str(len(body)), key)
        head = self.s3.head_object(Bucket=bucket, Key="small", Range="bytes=2-5")
        self.assertEqual(head["ResponseMetadata"]["HTTPStatusCode"], 206)
        self.assertEqual(head.get("ContentLength"), 4)

    def test_metadata_and_content_type(self):
        bucket = self.new_bucket()
        self.s3.put_object(Bucket=bucket, Key="doc.json", Body=b"{}",
                           ContentType="application/json; charset=utf-8",
                           Metadata={"Color": "Blue", "build-id": "1234", "empty": ""})
        expected = {"color": "Blue", "build-id": "1234", "empty": ""}
        head = self.s3.head_object(Bucket=bucket, Key="doc.json")
        self.assertEqual(head["ContentType"], "application/json; charset=utf-8")
        self.assertEqual(head["Metadata"], expected)
        got = self.s3.get_object(Bucket=bucket, Key="doc.json")
        self.assertEqual(got["ContentType"], "application/json; charset=utf-8")
        self.assertEqual(got["Metadata"], expected)
        # Wire names of metadata headers are lowercase.
        names = [k for k in got["ResponseMetadata"]["HTTPHeaders"] if "meta" in k.lower()]
        self.assertTrue(names)
        # An overwrite without metadata drops the old metadata.
        self.s3.put_object(Bucket=bucket, Key="doc.json", Body=b"[]")
        head = self.s3.head_object(Bucket=bucket, Key="doc.json")
        self.assertEqual(head["Metadata"], {})
        self.assertEqual(head["ContentType"], "application/octet-stream")

    def test_standard_headers_are_kept_with_the_object(self):
        """Cache-Control, Content-Disposition, Content-Encoding, Content-Language
        and Expires come back on GET and HEAD, as S3 keeps them; CopyObject
        keeps them (COPY) or takes the request's (REPLACE); none of them shows
        up as metadata."""
        bucket = self.new_bucket()
        kept = dict(CacheControl="max-age=3600, public",
                    ContentDisposition='attachment; filename="notes 2024.txt"',
                    ContentEncoding="gzip", ContentLanguage="fr-CA",
                    Expires=datetime(2031, 5, 6, 7, 8, 9, tzinfo=timezone.utc))
        body = gzip.compress(b"bonjour " * 100)
        self.s3.put_object(Bucket=bucket, Key="notes.txt", Body=body, Metadata={"k": "v"}, **kept)

        def check(got, expected):
            for name, value in expected.items():
                self.assertEqual(got.get(name), value, name)
            self.assertEqual(got["Metadata"], {"k": "v"})

        check(self.s3.head_object(Bucket=bucket, Key="notes.txt"), kept)
        got = self.s3.get_object(Bucket=bucket, Key="notes.txt")
        check(got, kept)
        self.assertEqual(got["Body"].read(), body)  # stored as sent, not decoded
        # A query override still wins for its request.
        self.assertEqual(self.s3.get_object(Bucket=bucket, Key="notes.txt",
                                            ResponseCacheControl="no-store")["CacheControl"],
                         "no-store")
        self.s3.copy_object(Bucket=bucket, Key="copy.txt",
                            CopySource={"Bucket": bucket, "Key": "notes.txt"})
        check(self.s3.head_object(Bucket=bucket, Key="copy.txt"), kept)
        self.s3.copy_object(Bucket=bucket, Key="plain.txt", MetadataDirective="REPLACE",
                            CopySource={"Bucket": bucket, "Key": "notes.txt"},
                            Metadata={"k": "v"}, CacheControl="no-cache")
        head = self.s3.head_object(Bucket=bucket, Key="plain.txt")
        check(head, {"CacheControl": "no-cache"})
        for name in ("ContentDisposition", "ContentEncoding", "ContentLanguage", "Expires"):
            self.assertNotIn(name, head)
        # An overwrite without them drops them.
        self.s3.put_object(Bucket=bucket, Key="notes.txt", Body=b"plain", Metadata={"k": "v"})
        head = self.s3.head_object(Bucket=bucket, Key="notes.txt")
        self.assertNotIn("CacheControl", head)
        self.assertNotIn("ContentEncoding", head)

    def test_metadata_wire_case(self):
        """The x-amz-meta-* names on the wire are lowercase, as S3 sends them."""
        bucket = self.new_bucket()
        self.s3.put_object(Bucket=bucket, Key="k", Body=b"v", Metadata={"MixedCase": "V"})
        status, headers, _ = self.signed("HEAD", f"127.0.0.1:{self.proxy.port}",
                                         f"/{bucket}/k")
        self.assertEqual(status, 200)
        self.assertEqual(headers.get("x-amz-meta-mixedcase"), "V")
        conn = http.client.HTTPConnection("127.0.0.1", self.proxy.port, timeout=10)
        try:
            req = AWSRequest(method="GET", url=f"http://127.0.0.1:{self.proxy.port}/{bucket}/k")
            S3SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "s3", "us-east-1").add_auth(req)
            conn.request("GET", f"/{bucket}/k", headers=dict(req.headers.items()))
            r = conn.getresponse()
            r.read()
            raw_names = [k for k, _ in r.getheaders()]
        finally:
            conn.close()
        self.assertIn("x-amz-meta-mixedcase", raw_names)

    def test_response_overrides(self):
        bucket = self.new_bucket()
        self.s3.put_object(Bucket=bucket, Key="report.csv", Body=b"a,b\n1,2\n",
                           ContentType="text/csv")
        got = self.s3.get_object(
            Bucket=bucket, Key="report.csv", ResponseContentType="application/x-download",
            ResponseContentDisposition='attachment; filename="report 2024.csv"',
            ResponseCacheControl="no-store", ResponseContentLanguage="de")
        self.assertEqual(got["Body"].read(), b"a,b\n1,2\n")
        self.assertEqual(got["ContentType"], "application/x-download")
        self.assertEqual(got["ContentDisposition"], 'attachment; filename="report 2024.csv"')
        self.assertEqual(got["CacheControl"], "no-store")
        self.assertEqual(got["ContentLanguage"], "de")
        # Overrides are per request: the stored Content-Type is unchanged.
        self.assertEqual(self.s3.head_object(Bucket=bucket, Key="report.csv")["ContentType"],
                         "text/csv")

    def test_range(self):
        bucket = self.new_bucket()
        body = os.urandom(1000)
        self.s3.put_object(Bucket=bucket, Key="r", Body=body)
        cases = [
            ("bytes=0-9", 0, 9),
            ("bytes=100-199", 100, 199),
            ("bytes=-10", 990, 999),
            ("bytes=990-", 990, 999),
            ("bytes=0-", 0, 999),
            ("bytes=995-5000", 995, 999),   # end past the end is clamped
            ("bytes=-5000", 0, 999),        # suffix longer than the object
            ("bytes=999-999", 999, 999),
        ]
        for header, first, last in cases:
            got = self.s3.get_object(Bucket=bucket, Key="r", Range=header)
            self.assertEqual(got["ResponseMetadata"]["HTTPStatusCode"], 206, header)
            self.assertEqual(got["ContentRange"], f"bytes {first}-{last}/1000", header)
            self.assertEqual(got["ContentLength"], last - first + 1, header)
            self.assertEqual(got["Body"].read(), body[first:last + 1], header)
            self.assertEqual(got["ETag"], md5_etag(body), header)
        head = self.s3.head_object(Bucket=bucket, Key="r", Range="bytes=10-19")
        self.assertEqual(head["ResponseMetadata"]["HTTPStatusCode"], 206)
        self.assertEqual(head["ContentLength"], 10)
        self.assertEqual(head["ContentRange"], "bytes 10-19/1000")
        for header in ("bytes=1000-", "bytes=5000-6000", "bytes=1000-1000"):
            e = self.expect_error(416, "InvalidRange", self.s3.get_object, Bucket=bucket,
                                  Key="r", Range=header)
            self.assertIn("range", e.response["Error"]["Message"].lower())

    def test_range_on_empty_object(self):
        bucket = self.new_bucket()
        self.s3.put_object(Bucket=bucket, Key="empty", Body=b"")
        for header in ("bytes=0-", "bytes=0-0", "bytes=-1"):
            self.expect_error(416, "InvalidRange", self.s3.get_object, Bucket=bucket,
                              Key="empty", Range=header)
        self.assertEqual(self.s3.get_object(Bucket=bucket, Key="empty")["Body"].read(), b"")

    def test_conditional_get_head(self):
        bucket = self.new_bucket()
        body = b"conditional body"
        etag = self.s3.put_object(Bucket=bucket, Key="c", Body=body)["ETag"]
        self.assertEqual(etag, md5_etag(body))
        past = datetime.now(timezone.utc) - timedelta(days=1)
        future = datetime.now(timezone.utc) + timedelta(days=1)
        ok = dict(Bucket=bucket, Key="c")

        # Conditions that hold: the object comes back.
        for cond in ({"IfMatch": etag}, {"IfMatch": etag.strip('"')}, {"IfMatch": "*"},
                     {"IfNoneMatch": '"0123456789abcdef0123456789abcdef"'},
                     {"IfModifiedSince": past}, {"IfUnmodifiedSince": future}):
            self.assertEqual(self.s3.get_object(**ok, **cond)["Body"].read(), body, cond)
            self.assertEqual(self.s3.head_object(**ok, **cond)["ETag"], etag, cond)

        wrong = '"0123456789abcdef0123456789abcdef"'
        self.expect_error(412, "PreconditionFailed", self.s3.get_object, **ok, IfMatch=wrong)
        self.expect_error(412, "412", self.s3.head_object, **ok, IfMatch=wrong)
        self.expect_error(412, "PreconditionFailed", self.s3.get_object, **ok,
                          IfUnmodifiedSince=past)
        self.expect_error(412, "412", self.s3.head_object, **ok, IfUnmodifiedSince=past)

        e = self.expect_error(304, "304", self.s3.get_object, **ok, IfNoneMatch=etag)
        self.assertEqual(e.response["ResponseMetadata"]["HTTPHeaders"].get("etag"), etag)
        self.expect_error(304, "304", self.s3.head_object, **ok, IfNoneMatch=etag)
        self.expect_error(304, "304", self.s3.get_object, **ok, IfNoneMatch="*")
        self.expect_error(304, "304", self.s3.get_object, **ok, IfModifiedSince=future)
        self.expect_error(304, "304", self.s3.head_object, **ok, IfModifiedSince=future)

        # Dates equal to Last-Modified: not modified since, and unmodified since.
        stamp = self.s3.head_object(**ok)["LastModified"]
        self.expect_error(304, "304", self.s3.get_object, **ok, IfModifiedSince=stamp)
        self.assertEqual(self.s3.get_object(**ok, IfUnmodifiedSince=stamp)["Body"].read(), body)

        # RFC 9110 precedence, as S3 applies it: If-Match true + If-Unmodified-Since
        # false -> 200; If-None-Match false + If-Modified-Since false -> 200.
        got = self.s3.get_object(**ok, IfMatch=etag, IfUnmodifiedSince=past)
        self.assertEqual(got["Body"].read(), body)
        got = self.s3.get_object(**ok, IfNoneMatch=wrong, IfModifiedSince=future)
        self.assertEqual(got["Body"].read(), body)

    def test_conditional_put(self):
        bucket = self.new_bucket()
        first = self.s3.put_object(Bucket=bucket, Key="p", Body=b"first", IfNoneMatch="*")
        self.assertEqual(first["ETag"], md5_etag(b"first"))
        self.expect_error(412, "PreconditionFailed", self.s3.put_object, Bucket=bucket,
                          Key="p", Body=b"second", IfNoneMatch="*")
        self.assertEqual(self.s3.get_object(Bucket=bucket, Key="p")["Body"].read(), b"first")
        self.expect_error(412, "PreconditionFailed", self.s3.put_object, Bucket=bucket,
                          Key="p", Body=b"third", IfMatch=md5_etag(b"something else"))
        self.assertEqual(self.s3.get_object(Bucket=bucket, Key="p")["Body"].read(), b"first")
        self.s3.put_object(Bucket=bucket, Key="p", Body=b"fourth", IfMatch=first["ETag"])
        self.assertEqual(self.s3.get_object(Bucket=bucket, Key="p")["Body"].read(), b"fourth")
        # If-Match on a key with no object: 404, as AWS answers.
        self.expect_error(404, "NoSuchKey", self.s3.put_object, Bucket=bucket, Key="gone",
                          Body=b"x", IfMatch=first["ETag"])
        self.assertEqual(self.keys(bucket), ["p"])
        self.assertEqual(self.proxy.temp_files(), [])

    def test_content_md5(self):
        bucket = self.new_bucket()
        body = b"payload with a digest"
        good = base64.b64encode(hashlib.md5(body).digest()).decode()
        bad = base64.b64encode(hashlib.md5(b"something else").digest()).decode()
        self.s3.put_object(Bucket=bucket, Key="good", Body=body, ContentMD5=good)
        self.assertEqual(self.s3.get_object(Bucket=bucket, Key="good")["Body"].read(), body)

        self.expect_error(400, "BadDigest", self.s3.put_object, Bucket=bucket, Key="new",
                          Body=body, ContentMD5=bad)
        self.expect_error(404, "NoSuchKey", self.s3.get_object, Bucket=bucket, Key="new")
        # A failed overwrite leaves the old object alone.
        self.expect_error(400, "BadDigest", self.s3.put_object, Bucket=bucket, Key="good",
                          Body=b"replacement", ContentMD5=bad)
        self.assertEqual(self.s3.get_object(Bucket=bucket, Key="good")["Body"].read(), body)
        self.assertEqual(self.keys(bucket), ["good"])
        self.assertEqual(self.proxy.temp_files(), [])

    def test_copy_object(self):
        bucket = self.new_bucket()
        other = self.new_bucket()
        body = os.urandom(10000)
        self.s3.put_object(Bucket=bucket, Key="src/a.bin", Body=body, ContentType="image/png",
                           Metadata={"origin": "camera", "n": "1"})

        # COPY (the default): bytes, Content-Type and metadata come along.
        res = self.s3.copy_object(Bucket=other, Key="dst/copy.bin",
                                  CopySource={"Bucket": bucket, "Key": "src/a.bin"})
        self.assertEqual(res["CopyObjectResult"]["ETag"], md5_etag(body))
        self.assertIsInstance(res["CopyObjectResult"]["LastModified"], datetime)
        got = self.s3.get_object(Bucket=other, Key="dst/copy.bin")
        self.assertEqual(got["Body"].read(), body)
        self.assertEqual(got["ContentType"], "image/png")
        self.assertEqual(got["Metadata"], {"origin": "camera", "n": "1"})
        # COPY ignores metadata sent with the request.
        self.s3.copy_object(Bucket=bucket, Key="copy2", MetadataDirective="COPY",
                            Metadata={"ignored": "yes"},
                            CopySource={"Bucket": bucket, "Key": "src/a.bin"})
        self.assertEqual(self.s3.head_object(Bucket=bucket, Key="copy2")["Metadata"],
                         {"origin": "camera", "n": "1"})

        # REPLACE: the request's metadata and Content-Type win.
        self.s3.copy_object(Bucket=bucket, Key="replaced", MetadataDirective="REPLACE",
                            ContentType="text/plain", Metadata={"fresh": "true"},
                            CopySource={"Bucket": bucket, "Key": "src/a.bin"})
        head = self.s3.head_object(Bucket=bucket, Key="replaced")
        self.assertEqual(head["Metadata"], {"fresh": "true"})
        self.assertEqual(head["ContentType"], "text/plain")
        self.assertEqual(head["ETag"], md5_etag(body))

        # Onto itself: refused without REPLACE, allowed with it.
        self.expect_error(400, "InvalidRequest", self.s3.copy_object, Bucket=bucket,
                          Key="src/a.bin", CopySource={"Bucket": bucket, "Key": "src/a.bin"})
        self.assertEqual(self.s3.head_object(Bucket=bucket, Key="src/a.bin")["Metadata"],
                         {"origin": "camera", "n": "1"})
        self.s3.copy_object(Bucket=bucket, Key="src/a.bin", MetadataDirective="REPLACE",
                            Metadata={"v": "2"},
                            CopySource={"Bucket": bucket, "Key": "src/a.bin"})
        got = self.s3.get_object(Bucket=bucket, Key="src/a.bin")
        self.assertEqual(got["Body"].read(), body)
        self.assertEqual(got["Metadata"], {"v": "2"})

        # Missing sources.
        self.expect_error(404, "NoSuchKey", self.s3.copy_object, Bucket=bucket, Key="x",
                          CopySource={"Bucket": bucket, "Key": "nope"})
        self.expect_error(404, "NoSuchBucket", self.s3.copy_object, Bucket=bucket, Key="x",
                          CopySource={"Bucket": self.new_bucket(create=False), "Key": "nope"})
        # Copy-source conditionals.
        self.expect_error(412, "PreconditionFailed", self.s3.copy_object, Bucket=bucket,
                          Key="x", CopySourceIfMatch=md5_etag(b"other"),
                          CopySource={"Bucket": bucket, "Key": "replaced"})
        self.s3.copy_object(Bucket=bucket, Key="x", CopySourceIfMatch=md5_etag(body),
                            CopySource={"Bucket": bucket, "Key": "replaced"})
        self.assertEqual(self.s3.get_object(Bucket=bucket, Key="x")["Body"].read(), body)
        # Conditions on the destination, as for a PUT: create-only copies.
        self.expect_error(412, "PreconditionFailed", self.s3.copy_object, Bucket=bucket,
                          Key="x", IfNoneMatch="*",
                          CopySource={"Bucket": bucket, "Key": "src/a.bin"})
        self.s3.copy_object(Bucket=bucket, Key="fresh", IfNoneMatch="*",
                            CopySource={"Bucket": bucket, "Key": "src/a.bin"})

    def test_copy_special_keys(self):
        bucket = self.new_bucket()
        for i, key in enumerate(SPECIAL_KEYS):
            self.s3.put_object(Bucket=bucket, Key=key, Body=key.encode())
            dst = f"copies/{i}/{key}"
            self.s3.copy_object(Bucket=bucket, Key=dst, CopySource={"Bucket": bucket, "Key": key})
            self.assertEqual(self.s3.get_object(Bucket=bucket, Key=dst)["Body"].read(),
                             key.encode(), key)

    def test_delete_object(self):
        bucket = self.new_bucket()
        self.s3.put_object(Bucket=bucket, Key="d/k", Body=b"x")
        self.s3.put_object(Bucket=bucket, Key="d/keep", Body=b"y")
        for _ in range(2):  # the second delete is a no-op, still 204
            res = self.s3.delete_object(Bucket=bucket, Key="d/k")
            self.assertEqual(res["ResponseMetadata"]["HTTPStatusCode"], 204)
        res = self.s3.delete_object(Bucket=bucket, Key="never/existed")
        self.assertEqual(res["ResponseMetadata"]["HTTPStatusCode"], 204)
        self.expect_error(404, "NoSuchKey", self.s3.get_object, Bucket=bucket, Key="d/k")
        self.assertEqual(self.keys(bucket), ["d/keep"])

    def test_delete_objects(self):
        bucket = self.new_bucket()
        keys = [f"batch/{i:02d}" for i in range(10)] + ["with space", "ünï+%=&"]
        for k in keys:
            self.s3.put_object(Bucket=bucket, Key=k, Body=k.encode())

        loud = self.s3.delete_objects(Bucket=bucket, Delete={
            "Objects": [{"Key": k} for k in keys[:4] + ["missing", "with space"]]})
        self.assertEqual(sorted(d["Key"] for d in loud["Deleted"]),
                         sorted(keys[:4] + ["missing", "with space"]))
        self.assertEqual(loud.get("Errors", []), [])

        quiet = self.s3.delete_objects(Bucket=bucket, Delete={
            "Quiet": True, "Objects": [{"Key": k} for k in keys[4:8] + ["ünï+%=&"]]})
        self.assertEqual(quiet.get("Deleted", []), [])
        self.assertEqual(quiet.get("Errors", []), [])

        self.assertEqual(self.keys(bucket), keys[8:10])
        self.expect_error(404, "NoSuchBucket", self.s3.delete_objects,
                          Bucket=self.new_bucket(create=False),
                          Delete={"Objects": [{"Key": "a"}]})

    def test_special_keys(self):
        bucket = self.new_bucket()
        for key in SPECIAL_KEYS:
            body = ("body of " + key).encode()
            self.s3.put_object(Bucket=bucket, Key=key, Body=body, Metadata={"k": "v"})
            self.assertEqual(self.s3.get_object(Bucket=bucket, Key=key)["Body"].read(), body, key)
            self.assertEqual(self.s3.head_object(Bucket=bucket, Key=key)["ETag"],
                             md5_etag(body), key)
        self.assertEqual(self.keys(bucket),
                         sorted(SPECIAL_KEYS, key=lambda k: k.encode("utf-8")))
        # The plain ListObjects (V1) path returns them intact too.
        v1 = self.s3.list_objects(Bucket=bucket)
        self.assertEqual(sorted(o["Key"] for o in v1["Contents"]), sorted(SPECIAL_KEYS))
        # Prefixes with the same characters select exactly.
        for key in SPECIAL_KEYS:
            self.assertEqual(self.keys(bucket, Prefix=key), [key], key)
        # '+' is not a space and '%20' is not a space.
        self.expect_error(404, "NoSuchKey", self.s3.get_object, Bucket=bucket,
                          Key="plus sign.txt")
        self.expect_error(404, "NoSuchKey", self.s3.get_object, Bucket=bucket,
                          Key="percent literal%.txt")
        for key in SPECIAL_KEYS:
            self.s3.delete_object(Bucket=bucket, Key=key)
        self.assertEqual(self.keys(bucket), [])

    def test_reserved_names(self):
        bucket = self.new_bucket()
        self.s3.put_object(Bucket=bucket, Key="x/real.bin", Body=b"x")
        for key in ("x/reference.bin", "reference.bin", "a.delta", "dir/file.zip.delta"):
            e = self.expect_error(400, "InvalidArgument", self.s3.put_object, Bucket=bucket,
                                  Key=key, Body=b"data")
            self.assertTrue(e.response["Error"]["Message"], key)
            self.expect_error(400, "InvalidArgument", self.s3.copy_object, Bucket=bucket,
                              Key=key, CopySource={"Bucket": bucket, "Key": "x/real.bin"})
        self.assertEqual(self.keys(bucket), ["x/real.bin"])
        for key in ("../escape", "a/../../b"):
            self.expect_error(400, "InvalidArgument", self.s3.put_object, Bucket=bucket,
                              Key=key, Body=b"data")
        self.expect_error(400, "KeyTooLongError", self.s3.put_object, Bucket=bucket,
                          Key="k" * 1025, Body=b"data")
        self.assertEqual(self.keys(bucket), ["x/real.bin"])

    def test_internal_names_not_reachable(self):
        """With delta-stored objects beside them, the internal reference.bin and
        .delta blobs can be neither read nor deleted through S3."""
        bucket = self.new_bucket()
        base = os.urandom(64 * 1024)
        v1, v2 = base + b"version one", base + b"version two, slightly longer"
        self.s3.put_object(Bucket=bucket, Key="x/v1.zip", Body=v1)
        self.s3.put_object(Bucket=bucket, Key="x/v2.zip", Body=v2)
        self.assertEqual(self.keys(bucket), ["x/v1.zip", "x/v2.zip"])
        for key in ("x/reference.bin", "x/v2.zip.delta", "x/v1.zip.delta"):
            self.expect_error(400, "InvalidArgument", self.s3.get_object, Bucket=bucket, Key=key)
            self.expect_error(400, "400", self.s3.head_object, Bucket=bucket, Key=key)
            self.expect_error(400, "InvalidArgument", self.s3.delete_object, Bucket=bucket,
                              Key=key)
            self.expect_error(400, "InvalidArgument", self.s3.copy_object, Bucket=bucket,
                              Key="stolen", CopySource={"Bucket": bucket, "Key": key})
        res = self.s3.delete_objects(Bucket=bucket, Delete={"Objects": [
            {"Key": "x/reference.bin"}, {"Key": "x/v2.zip.delta"}]})
        self.assertEqual(res.get("Deleted", []), [])
        self.assertEqual(sorted(e["Key"] for e in res["Errors"]),
                         ["x/reference.bin", "x/v2.zip.delta"])
        # Both objects still read back whole, listed with their original sizes.
        self.assertEqual(self.s3.get_object(Bucket=bucket, Key="x/v1.zip")["Body"].read(), v1)
        self.assertEqual(self.s3.get_object(Bucket=bucket, Key="x/v2.zip")["Body"].read(), v2)
        listed = self.s3.list_objects_v2(Bucket=bucket, Prefix="x/")["Contents"]
        self.assertEqual({o["Key"]: o["Size"] for o in listed},
                         {"x/v1.zip": len(v1), "x/v2.zip": len(v2)})
        # Deleting one keeps the other readable.
        self.s3.delete_object(Bucket=bucket, Key="x/v1.zip")
        self.assertEqual(self.s3.get_object(Bucket=bucket, Key="x/v2.zip")["Body"].read(), v2)
        self.s3.delete_object(Bucket=bucket, Key="x/v2.zip")
        self.assertEqual(self.keys(bucket), [])
        self.s3.delete_bucket(Bucket=bucket)


class ListingTests(S3Case):

    def fill(self, bucket: str, keys) -> None:
        for k in keys:
            self.s3.put_object(Bucket=bucket, Key=k, Body=b"")

    def test_prefix_and_delimiter(self):
        bucket = self.new_bucket()
        self.fill(bucket, ["a/1", "a/2", "a/b/3", "a/b/c/4", "b/5", "c", "d/e/f", "a-x"])
        res = self.s3.list_objects_v2(Bucket=bucket, Prefix="a/")
        self.assertEqual([o["Key"] for o in res["Contents"]], ["a/1", "a/2", "a/b/3", "a/b/c/4"])
        self.assertEqual(res["KeyCount"], 4)
        self.assertFalse(res["IsTruncated"])

        res = self.s3.list_objects_v2(Bucket=bucket, Delimiter="/")
        self.assertEqual([o["Key"] for o in res["Contents"]], ["a-x", "c"])
        self.assertEqual([p["Prefix"] for p in res["CommonPrefixes"]], ["a/", "b/", "d/"])
        self.assertEqual(res["KeyCount"], 5)

        res = self.s3.list_objects_v2(Bucket=bucket, Prefix="a/", Delimiter="/")
        self.assertEqual([o["Key"] for o in res["Contents"]], ["a/1", "a/2"])
        self.assertEqual([p["Prefix"] for p in res["CommonPrefixes"]], ["a/b/"])

        res = self.s3.list_objects_v2(Bucket=bucket, Prefix="a")
        self.assertEqual([o["Key"] for o in res["Contents"]],
                         ["a-x", "a/1", "a/2", "a/b/3", "a/b/c/4"])
        res = self.s3.list_objects_v2(Bucket=bucket, Prefix="a", Delimiter="/")
        self.assertEqual([o["Key"] for o in res["Contents"]], ["a-x"])
        self.assertEqual([p["Prefix"] for p in res["CommonPrefixes"]], ["a/"])

        res = self.s3.list_objects_v2(Bucket=bucket, Prefix="a/b", Delimiter="/")
        self.assertEqual(res.get("Contents", []), [])
        self.assertEqual([p["Prefix"] for p in res["CommonPrefixes"]], ["a/b/"])
        res = self.s3.list_objects_v2(Bucket=bucket, Prefix="d/e/", Delimiter="/")
        self.assertEqual([o["Key"] for o in res["Contents"]], ["d/e/f"])
        self.assertEqual(self.keys(bucket, Prefix="d/e/f"), ["d/e/f"])
        self.assertEqual(self.keys(bucket, Prefix="c/"), [])

        res = self.s3.list_objects_v2(Bucket=bucket, Prefix="zzz")
        self.assertEqual(res.get("Contents", []), [])
        self.assertEqual(res["KeyCount"], 0)

        # A delimiter other than '/'.
        res = self.s3.list_objects_v2(Bucket=bucket, Delimiter="-")
        self.assertEqual([p["Prefix"] for p in res.get("CommonPrefixes", [])], ["a-"])
        self.assertNotIn("a-x", [o["Key"] for o in res["Contents"]])

    def test_pagination_v2(self):
        bucket = self.new_bucket()
        expected = sorted([f"p/{i:03d}" for i in range(21)] + ["p/sp ace", "p/ü+%&="],
                          key=lambda k: k.encode("utf-8")) + ["q/x", "r"]
        self.fill(bucket, expected)
        collected, pages, token = [], 0, None
        while True:
            kwargs = {"ContinuationToken": token} if token else {}
            res = self.s3.list_objects_v2(Bucket=bucket, MaxKeys=5, **kwargs)
            pages += 1
            self.assertEqual(res["MaxKeys"], 5)
            self.assertLessEqual(res["KeyCount"], 5)
            self.assertEqual(res["KeyCount"], len(res.get("Contents", [])))
            collected += [o["Key"] for o in res.get("Contents", [])]
            if not res["IsTruncated"]:
                self.assertNotIn("NextContinuationToken", res)
                break
            token = res["NextContinuationToken"]
            self.assertLess(pages, 20)
        self.assertEqual(collected, expected)
        self.assertEqual(pages, 5)

        # Pages with a delimiter count prefixes too, and never repeat one.
        entries = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Delimiter="/", PaginationConfig={"PageSize": 1}):
            entries += [o["Key"] for o in page.get("Contents", [])]
            entries += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
        self.assertEqual(entries, ["p/", "q/", "r"])

        self.assertEqual(self.keys(bucket, PaginationConfig={"PageSize": 7}), expected)
        res = self.s3.list_objects_v2(Bucket=bucket, MaxKeys=0)
        self.assertEqual(res.get("Contents", []), [])

    def test_start_after(self):
        bucket = self.new_bucket()
        keys = [f"k{i:02d}" for i in range(12)]
        self.fill(bucket, keys)
        res = self.s3.list_objects_v2(Bucket=bucket, StartAfter="k05")
        self.assertEqual([o["Key"] for o in res["Contents"]], keys[6:])
        self.assertEqual(res["StartAfter"], "k05")
        res = self.s3.list_objects_v2(Bucket=bucket, StartAfter="k05x")
        self.assertEqual([o["Key"] for o in res["Contents"]], keys[6:])
        res = self.s3.list_objects_v2(Bucket=bucket, StartAfter="k11")
        self.assertEqual(res.get("Contents", []), [])
        # StartAfter with paging: pages continue after it.
        self.assertEqual(self.keys(bucket, StartAfter="k03", PaginationConfig={"PageSize": 2}),
                         keys[4:])

    def test_encoding_type_url(self):
        bucket = self.new_bucket()
        keys = ["plain", "sp ace/x y", "ünï/日本", "a+b", "50%off", "q?&=", "tab\tkey"]
        self.fill(bucket, keys)
        # Explicit EncodingType: botocore hands back the keys as sent, encoded.
        res = self.s3.list_objects_v2(Bucket=bucket, EncodingType="url")
        self.assertEqual(res["EncodingType"], "url")
        raw = [o["Key"] for o in res["Contents"]]
        for k in raw:
            self.assertNotIn(" ", k)
            self.assertTrue(k.isascii(), k)
        self.assertEqual(sorted(unquote(k) for k in raw), sorted(keys))
        res = self.s3.list_objects_v2(Bucket=bucket, EncodingType="url", Delimiter="/",
                                      Prefix="")
        self.assertEqual(sorted(unquote(p["Prefix"]) for p in res["CommonPrefixes"]),
                         ["sp ace/", "ünï/"])
        # boto3's default (it asks for url encoding and decodes): exact keys back.
        self.assertEqual(sorted(self.keys(bucket)), sorted(keys))
        v1 = self.s3.list_objects(Bucket=bucket)
        self.assertEqual(sorted(o["Key"] for o in v1["Contents"]), sorted(keys))
        self.expect_error(400, "InvalidArgument", self.s3.list_objects_v2, Bucket=bucket,
                          EncodingType="base64")

    def test_list_objects_v1_marker(self):
        bucket = self.new_bucket()
        expected = sorted([f"m/{i:02d}" for i in range(11)] + ["m/sp ace", "m/ü+%&="],
                          key=lambda k: k.encode("utf-8")) + ["n"]
        self.fill(bucket, expected)
        collected, marker, pages = [], None, 0
        while True:
            kwargs = {"Marker": marker} if marker else {}
            res = self.s3.list_objects(Bucket=bucket, MaxKeys=4, **kwargs)
            pages += 1
            page_keys = [o["Key"] for o in res.get("Contents", [])]
            collected += page_keys
            self.assertEqual(res.get("Marker", ""), marker or "")
            if not res["IsTruncated"]:
                break
            marker = res.get("NextMarker") or page_keys[-1]
            self.assertLess(pages, 10)
        self.assertEqual(collected, expected)
        self.assertEqual(pages, 4)
        # v1 lists each object's Owner; v2 only when asked (FetchOwner).
        self.assertIn("Owner", self.s3.list_objects(Bucket=bucket)["Contents"][0])
        self.assertNotIn("Owner", self.s3.list_objects_v2(Bucket=bucket)["Contents"][0])
        self.assertEqual(self.s3.list_objects_v2(Bucket=bucket, FetchOwner=True)["Contents"][0]
                         ["Owner"], {"ID": "dgproxy", "DisplayName": "dgproxy"})

        # With a delimiter S3 must send NextMarker; paging by it never repeats a prefix.
        self.fill(bucket, ["o/1", "o/2", "p"])
        entries, marker = [], None
        for _ in range(10):
            kwargs = {"Marker": marker} if marker else {}
            res = self.s3.list_objects(Bucket=bucket, MaxKeys=1, Delimiter="/", **kwargs)
            entries += [o["Key"] for o in res.get("Contents", [])]
            entries += [p["Prefix"] for p in res.get("CommonPrefixes", [])]
            if not res["IsTruncated"]:
                break
            marker = res["NextMarker"]
        self.assertEqual(entries, ["m/", "n", "o/", "p"])

        res = self.s3.list_objects(Bucket=bucket, Marker="m/05", Prefix="m/")
        self.assertEqual([o["Key"] for o in res["Contents"]], expected[6:13])

    def test_listing_reports_original_size_etag(self):
        bucket = self.new_bucket()
        body = os.urandom(2048)
        self.s3.put_object(Bucket=bucket, Key="z/blob.bin", Body=body)
        (obj,) = self.s3.list_objects_v2(Bucket=bucket)["Contents"]
        self.assertEqual(obj["Key"], "z/blob.bin")
        self.assertEqual(obj["Size"], 2048)
        self.assertEqual(obj["ETag"], md5_etag(body))
        self.assertEqual(obj["StorageClass"], "STANDARD")
        head = self.s3.head_object(Bucket=bucket, Key="z/blob.bin")
        self.assertEqual(obj["LastModified"].replace(microsecond=0),
                         head["LastModified"].replace(microsecond=0))
        self.assertLess(abs((obj["LastModified"] - datetime.now(timezone.utc)).total_seconds()),
                        120)


class AuthTests(S3Case):

    def test_presigned_get(self):
        bucket = self.new_bucket()
        body = os.urandom(5000)
        key = "pre/signed get+me.bin"
        self.s3.put_object(Bucket=bucket, Key=key, Body=body)
        url = self.s3v4.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                             ExpiresIn=300)
        self.assertIn("X-Amz-Signature=", url)
        status, headers, data = self.http("GET", url)
        self.assertEqual(status, 200)
        self.assertEqual(data, body)
        self.assertEqual(headers["etag"], md5_etag(body))
        status, headers, data = self.http("HEAD", self.s3v4.generate_presigned_url(
            "head_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=300), )
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-length"], "5000")
        url = self.s3v4.generate_presigned_url(
            "get_object", ExpiresIn=300, Params={
                "Bucket": bucket, "Key": key, "ResponseContentDisposition": "attachment"})
        status, headers, data = self.http("GET", url, headers={"Range": "bytes=0-99"})
        self.assertEqual(status, 206)
        self.assertEqual(data, body[:100])
        self.assertEqual(headers["content-disposition"], "attachment")

    def test_presigned_put(self):
        bucket = self.new_bucket()
        body = os.urandom(70000)
        url = self.s3v4.generate_presigned_url("put_object",
                                             Params={"Bucket": bucket, "Key": "up/loaded.bin"},
                                             ExpiresIn=300)
        status, headers, data = self.http("PUT", url, body=body)
        self.assertEqual(status, 200, data)
        self.assertEqual(headers["etag"], md5_etag(body))
        got = self.s3.get_object(Bucket=bucket, Key="up/loaded.bin")
        self.assertEqual(got["Body"].read(), body)

        # Headers the URL signs must be sent as signed, and are stored.
        url = self.s3v4.generate_presigned_url(
            "put_object", ExpiresIn=300, Params={
                "Bucket": bucket, "Key": "typed.csv", "ContentType": "text/csv",
                "Metadata": {"who": "presigned"}})
        self.assertIn("content-type", unquote(url))
        status, _, _ = self.http("PUT", url, body=b"a,b\n",
                                 headers={"Content-Type": "text/plain",
                                          "x-amz-meta-who": "presigned"})
        self.assertEqual(status, 403)
        self.expect_error(404, "NoSuchKey", self.s3.get_object, Bucket=bucket, Key="typed.csv")
        status, _, data = self.http("PUT", url, body=b"a,b\n",
                                    headers={"Content-Type": "text/csv",
                                             "x-amz-meta-who": "presigned"})
        self.assertEqual(status, 200, data)
        got = self.s3.get_object(Bucket=bucket, Key="typed.csv")
        self.assertEqual(got["Body"].read(), b"a,b\n")
        self.assertEqual(got["ContentType"], "text/csv")
        self.assertEqual(got["Metadata"], {"who": "presigned"})

    def test_presigned_expired(self):
        bucket = self.new_bucket()
        self.s3.put_object(Bucket=bucket, Key="k", Body=b"secret")
        get_url = self.s3v4.generate_presigned_url("get_object",
                                                 Params={"Bucket": bucket, "Key": "k"},
                                                 ExpiresIn=1)
        put_url = self.s3v4.generate_presigned_url("put_object",
                                                 Params={"Bucket": bucket, "Key": "late"},
                                                 ExpiresIn=1)
        time.sleep(2.1)
        status, headers, data = self.http("GET", get_url)
        self.assertEqual(status, 403)
        self.assertIn(b"<Code>AccessDenied</Code>", data)
        self.assertNotIn(b"secret", data)
        status, _, data = self.http("PUT", put_url, body=b"too late")
        self.assertEqual(status, 403)
        self.assertIn(b"<Code>AccessDenied</Code>", data)
        self.assertEqual(self.keys(bucket), ["k"])

    def test_presigned_tampered(self):
        bucket = self.new_bucket()
        self.s3.put_object(Bucket=bucket, Key="public.txt", Body=b"public")
        self.s3.put_object(Bucket=bucket, Key="private.txt", Body=b"private")
        url = self.s3v4.generate_presigned_url("get_object",
                                             Params={"Bucket": bucket, "Key": "public.txt"},
                                             ExpiresIn=300)
        self.assertEqual(self.http("GET", url)[2], b"public")

        head, _, sig = url.rpartition("X-Amz-Signature=")
        flipped = sig[:-1] + ("0" if sig[-1] != "0" else "1")
        for bad in (head + "X-Amz-Signature=" + flipped,
                    url.replace("public.txt", "private.txt"),
                    url.replace("X-Amz-Expires=300", "X-Amz-Expires=600")):
            status, _, data = self.http("GET", bad)
            self.assertEqual(status, 403, bad)
            self.assertIn(b"<Code>AccessDenied</Code>", data)
            self.assertNotIn(b"<Code>private", data)

        put = self.s3v4.generate_presigned_url("put_object",
                                             Params={"Bucket": bucket, "Key": "public.txt"},
                                             ExpiresIn=300)
        status, _, _ = self.http("PUT", put.replace("public.txt", "private.txt"),
                                 body=b"overwritten")
        self.assertEqual(status, 403)
        self.assertEqual(self.s3.get_object(Bucket=bucket, Key="private.txt")["Body"].read(),
                         b"private")

    def test_wrong_secret(self):
        bucket = self.new_bucket()
        bad = self.proxy.client(secret_key="not-the-secret-" + "y" * 25)
        for call in (lambda: bad.list_buckets(),
                     lambda: bad.list_objects_v2(Bucket=bucket),
                     lambda: bad.put_object(Bucket=bucket, Key="k", Body=b"x"),
                     lambda: bad.create_bucket(Bucket=self.new_bucket(create=False))):
            self.expect_error(403, "AccessDenied", call)
        self.expect_error(403, "403", bad.head_object, Bucket=bucket, Key="k")
        self.assertEqual(self.keys(bucket), [])

    def test_unknown_access_key(self):
        bucket = self.new_bucket()
        stranger = self.proxy.client(access_key="AKIDUNKNOWN000000000")
        e = self.expect_error(403, "AccessDenied", stranger.list_objects_v2, Bucket=bucket)
        wrong_secret = self.proxy.client(secret_key="z" * 40)
        e2 = self.expect_error(403, "AccessDenied", wrong_secret.list_objects_v2, Bucket=bucket)
        # Same answer for both, so a caller cannot probe for valid keys.
        self.assertEqual(e.response["Error"]["Message"], e2.response["Error"]["Message"])
        self.expect_error(403, "AccessDenied", stranger.put_object, Bucket=bucket, Key="k",
                          Body=b"x")
        self.assertEqual(self.keys(bucket), [])

    def test_anonymous_request_denied(self):
        bucket = self.new_bucket()
        self.s3.put_object(Bucket=bucket, Key="k", Body=b"x")
        status, _, data = self.http("GET", f"/{bucket}/k")
        self.assertEqual(status, 403)
        self.assertIn(b"<Code>AccessDenied</Code>", data)
        status, _, _ = self.http("PUT", f"/{bucket}/k2", body=b"x")
        self.assertEqual(status, 403)
        self.assertEqual(self.keys(bucket), ["k"])


class ProtocolTests(S3Case):

    def test_unsupported_operations(self):
        bucket = self.new_bucket()
        self.s3.put_object(Bucket=bucket, Key="k", Body=b"x")
        cases = [
            (self.s3.get_bucket_tagging, {"Bucket": bucket}, "Tagging"),
            (self.s3.get_object_tagging, {"Bucket": bucket, "Key": "k"}, "Tagging"),
            (self.s3.get_bucket_policy, {"Bucket": bucket}, "Policy"),
            (self.s3.get_bucket_lifecycle_configuration, {"Bucket": bucket}, "Lifecycle"),
            (self.s3.get_bucket_cors, {"Bucket": bucket}, "Cors"),
        ]
        # Writes that ask for object lock are refused, not stored without it.
        until = datetime.now(timezone.utc) + timedelta(days=30)
        cases += [
            (self.s3.put_object, {"Bucket": bucket, "Key": "k", "Body": b"locked",
                                  "ObjectLockMode": "COMPLIANCE",
                                  "ObjectLockRetainUntilDate": until}, "ObjectLock"),
            (self.s3.put_object, {"Bucket": bucket, "Key": "k", "Body": b"held",
                                  "ObjectLockLegalHoldStatus": "ON"}, "ObjectLegalHold"),
            (self.s3.create_multipart_upload, {"Bucket": bucket, "Key": "mp",
                                               "ObjectLockMode": "GOVERNANCE",
                                               "ObjectLockRetainUntilDate": until}, "ObjectLock"),
            (self.s3.copy_object, {"Bucket": bucket, "Key": "c", "CopySource": f"{bucket}/k",
                                   "ObjectLockLegalHoldStatus": "ON"}, "ObjectLegalHold"),
            (self.s3.create_bucket, {"Bucket": self.new_bucket(create=False),
                                     "ObjectLockEnabledForBucket": True}, "ObjectLock"),
        ]
        for fn, kwargs, name in cases:
            e = self.expect_error(501, "NotImplemented", fn, **kwargs)
            self.assertIn(name, e.response["Error"]["Message"])
        # Nothing happened to the data.
        self.assertEqual(self.s3.get_object(Bucket=bucket, Key="k")["Body"].read(), b"x")
        self.assertEqual(self.keys(bucket), ["k"])
        self.assertEqual(self.s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []), [])

    def test_response_headers(self):
        bucket = self.new_bucket()
        self.s3.put_object(Bucket=bucket, Key="k", Body=b"x")
        responses = [
            self.s3.list_buckets(),
            self.s3.get_object(Bucket=bucket, Key="k"),
            self.s3.head_object(Bucket=bucket, Key="k"),
            self.s3.list_objects_v2(Bucket=bucket),
            self.expect_error(404, "NoSuchKey", self.s3.get_object, Bucket=bucket,
                              Key="nope").response,
            self.expect_error(404, "404", self.s3.head_object, Bucket=bucket,
                              Key="nope").response,
            self.expect_error(403, "AccessDenied",
                              self.proxy.client(secret_key="w" * 40).list_buckets).response,
        ]
        ids = set()
        for r in responses:
            headers = r["ResponseMetadata"]["HTTPHeaders"]
            self.assertNotIn("server", headers, headers)
            self.assertTrue(headers.get("x-amz-request-id"), headers)
            ids.add(headers["x-amz-request-id"])
        self.assertEqual(len(ids), len(responses))
        # The error body is S3 XML naming the code, resource and request id.
        status, headers, data = self.signed("GET", f"127.0.0.1:{self.proxy.port}",
                                            f"/{bucket}/missing-key")
        self.assertEqual(status, 404)
        self.assertNotIn("server", headers)
        self.assertEqual(headers["content-type"], "application/xml")
        self.assertIn(b"<Code>NoSuchKey</Code>", data)
        self.assertIn(f"<RequestId>{headers['x-amz-request-id']}</RequestId>".encode(), data)
        self.assertIn(b"<Resource>", data)
        # The unauthenticated health endpoint does not advertise a server either.
        status, headers, _ = self.http("GET", "/_/health")
        self.assertEqual(status, 200)
        self.assertNotIn("server", headers)

    def test_virtual_host_style(self):
        bucket = self.new_bucket()
        vhost = f"{bucket}.localhost:{self.proxy.port}"
        body = os.urandom(3000)
        status, headers, data = self.signed("PUT", vhost, "/dir/v-hosted.bin", body=body,
                                            headers={"Content-Type": "text/x-vhost",
                                                     "x-amz-meta-style": "virtual"})
        self.assertEqual(status, 200, data)
        self.assertEqual(headers["etag"], md5_etag(body))
        # Path-style sees the same object, with what the virtual-host PUT set.
        got = self.s3.get_object(Bucket=bucket, Key="dir/v-hosted.bin")
        self.assertEqual(got["Body"].read(), body)
        self.assertEqual(got["ContentType"], "text/x-vhost")
        self.assertEqual(got["Metadata"], {"style": "virtual"})

        status, headers, data = self.signed("GET", vhost, "/dir/v-hosted.bin")
        self.assertEqual(status, 200)
        self.assertEqual(data, body)
        status, _, data = self.signed("GET", vhost, "/?list-type=2&prefix=dir%2F")
        self.assertEqual(status, 200, data)
        self.assertIn(b"<Key>dir/v-hosted.bin</Key>", data)
        self.assertIn(f"<Name>{bucket}</Name>".encode(), data)
        status, _, _ = self.signed("HEAD", vhost, "/")
        self.assertEqual(status, 200)
        status, _, data = self.signed("GET", vhost, "/absent")
        self.assertEqual(status, 404)
        self.assertIn(b"<Code>NoSuchKey</Code>", data)
        # A host without the suffix is path style: "/dir/..." is bucket "dir".
        status, _, data = self.signed("GET", f"127.0.0.1:{self.proxy.port}",
                                      "/dir/v-hosted.bin")
        self.assertEqual(status, 404)
        self.assertIn(b"<Code>NoSuchBucket</Code>", data)
        # Unsigned, or signed for a different host, is refused.
        status, _, _ = self.http("GET", "/dir/v-hosted.bin", headers={"Host": vhost})
        self.assertEqual(status, 403)
        req = AWSRequest(method="GET", url=f"http://other.localhost:{self.proxy.port}/dir/"
                                          "v-hosted.bin")
        S3SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "s3", "us-east-1").add_auth(req)
        hdrs = dict(req.headers.items())
        hdrs["Host"] = vhost
        status, _, _ = self.http("GET", "/dir/v-hosted.bin", headers=hdrs)
        self.assertEqual(status, 403)
        # Delete through the virtual host.
        status, _, _ = self.signed("DELETE", vhost, "/dir/v-hosted.bin")
        self.assertEqual(status, 204)
        self.assertEqual(self.keys(bucket), [])

    def test_virtual_host_bucket_operations(self):
        bucket = self.new_bucket(create=False)
        vhost = f"{bucket}.localhost:{self.proxy.port}"
        status, _, data = self.signed("PUT", vhost, "/")
        self.assertEqual(status, 200, data)
        self.assertEqual(self.s3.head_bucket(Bucket=bucket)["ResponseMetadata"]
                         ["HTTPStatusCode"], 200)
        status, _, data = self.signed("DELETE", vhost, "/")
        self.assertEqual(status, 204, data)
        self.expect_error(404, "404", self.s3.head_bucket, Bucket=bucket)

    def test_quoted_key_in_path(self):
        """A raw request with percent-encoded characters names the decoded key."""
        bucket = self.new_bucket()
        self.s3.put_object(Bucket=bucket, Key="a b/c+d%e", Body=b"quoted")
        host = f"127.0.0.1:{self.proxy.port}"
        status, _, data = self.signed("GET", host, f"/{bucket}/" + quote("a b/c+d%e"))
        self.assertEqual(status, 200)
        self.assertEqual(data, b"quoted")
