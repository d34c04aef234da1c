"""Where the S3 backend sends a request, and what it signs, in both addressing styles.

Virtual-hosted style (``force_path_style: false``, what AWS recommends) needs
a DNS name per bucket, which this machine cannot resolve, so the e2e suites
run path style; this checks the URL and the signature's inputs directly.
"""

from __future__ import annotations

from datetime import datetime, timezone
from urllib.parse import unquote, urlsplit

from hypothesis import given, strategies as st
from twisted.internet import defer, task
from twisted.trial import unittest

from dgproxy.auth.sigv4 import AuthFailure, SignedRequest, verify
from dgproxy.s3 import errors
from dgproxy.storage.credentials import BackendCredentials
from dgproxy.storage.s3 import in_flight, upstream_part_size
from dgproxy.storage.s3client import S3Client, default_endpoint, location_constraint

AWS = "https://s3.eu-central-1.amazonaws.com"


def client(path_style: bool, endpoint: str = AWS) -> S3Client:
    return S3Client(task.Clock(), "archive", endpoint, "eu-central-1",
                    BackendCredentials.resolve("AKIDEXAMPLE", "secret"), path_style=path_style)


def verify_as_received(url: str, headers: dict):
    """Check the signature as the service at C{url} would: Host from the URL."""
    parts = urlsplit(url)
    received = {k.lower(): v for k, v in headers.items()}
    received["host"] = [parts.netloc]
    amz_date = received["x-amz-date"][0]
    now = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    request = SignedRequest("PUT", parts.path.encode(), parts.query.encode(), received)
    return verify(request, {"AKIDEXAMPLE": "secret"}.get, now, 900)


class AddressingTests(unittest.TestCase):
    def test_path_style(self):
        c = client(True, "http://127.0.0.1:8333/")
        self.assertEqual(c.url(None), "http://127.0.0.1:8333/")
        self.assertEqual(c.url("bkt"), "http://127.0.0.1:8333/bkt")
        self.assertEqual(c.url("bkt", "a b/c+d~e.tar"),
                         "http://127.0.0.1:8333/bkt/a%20b/c%2Bd~e.tar")

    def test_virtual_hosted_style(self):
        c = client(False)
        self.assertEqual(c.url(None), AWS + "/")
        self.assertEqual(c.url("acme-releases"), "https://acme-releases.s3.eu-central-1.amazonaws.com/")
        self.assertEqual(c.url("acme-releases", "dir/app 1.zip", {"uploadId": "x/y", "uploads": None}),
                         "https://acme-releases.s3.eu-central-1.amazonaws.com/dir/app%201.zip"
                         "?uploadId=x%2Fy&uploads")

    def test_dotted_buckets_go_in_the_path_over_https(self):
        """A dotted name as a host would not match *.s3.….amazonaws.com."""
        c = client(False)
        self.assertEqual(c.url("acme.releases", "a.zip"),
                         AWS + "/acme.releases/a.zip")
        plain = client(False, "http://minio.internal:9000")
        self.assertEqual(plain.url("acme.releases", "a.zip"),
                         "http://acme.releases.minio.internal:9000/a.zip")

    def test_buckets_made_on_aws_outside_us_east_1_name_their_region(self):
        body = location_constraint("https://s3.eu-central-1.amazonaws.com", "eu-central-1")
        self.assertIn(b"<LocationConstraint>eu-central-1</LocationConstraint>", body)
        self.assertIsNotNone(location_constraint("https://s3.cn-north-1.amazonaws.com.cn",
                                                 "cn-north-1"))
        self.assertIsNone(location_constraint("https://s3.us-east-1.amazonaws.com", "us-east-1"))
        self.assertIsNone(location_constraint("http://127.0.0.1:8333", "eu-central-1"))
        self.assertIsNone(location_constraint("https://ceph.internal", "default"))

    def test_default_endpoint_is_the_regions(self):
        self.assertEqual(default_endpoint("eu-central-1"), "https://s3.eu-central-1.amazonaws.com")
        self.assertEqual(default_endpoint("us-east-1"), "https://s3.us-east-1.amazonaws.com")
        self.assertEqual(default_endpoint("cn-north-1"), "https://s3.cn-north-1.amazonaws.com.cn")

    def test_signature_holds_for_the_virtual_host_only(self):
        """dgproxy's own SigV4 verifier accepts the upstream request as the
        service receives it (Host: the bucket's name), and not with the
        bucket in the path instead: the host is part of what is signed."""
        c = client(False)
        url = c.url("acme-releases", "dir/app 1.zip", {"partNumber": "2", "uploadId": "u"})
        headers = c._signed_headers("PUT", url, {"Content-Length": "5"})
        self.assertEqual(verify_as_received(url, headers).access_key_id, "AKIDEXAMPLE")
        moved = AWS + "/acme-releases" + urlsplit(url).path + "?" + urlsplit(url).query
        with self.assertRaises(AuthFailure):
            verify_as_received(moved, headers)

    def test_bodies_are_declared_unsigned(self):
        """An upload's body is streamed, so its hash cannot be signed: the
        request must say UNSIGNED-PAYLOAD, over HTTP as over HTTPS. (botocore
        left to itself signs the hash of an empty body, which AWS, MinIO and
        Ceph refuse for every upload.)"""
        for endpoint in (AWS, "http://127.0.0.1:8333"):
            c = client(True, endpoint)
            url = c.url("bkt", "rel/app.tar")
            headers = c._signed_headers("PUT", url, {"Content-Type": "application/x-tar"})
            self.assertEqual(headers["X-Amz-Content-SHA256"], ["UNSIGNED-PAYLOAD"], endpoint)
            self.assertEqual(verify_as_received(url, headers).payload_hash, "UNSIGNED-PAYLOAD")

    def test_the_signed_host_is_the_one_sent(self):
        """Host is in the headers handed to the Agent (which then adds none of
        its own), without the scheme's default port, as the service sees it."""
        for endpoint, host in ((AWS, "s3.eu-central-1.amazonaws.com"),
                               ("http://127.0.0.1:8333", "127.0.0.1:8333"),
                               ("http://minio.internal:80", "minio.internal"),
                               ("https://[::1]:9000", "[::1]:9000")):
            headers = client(True, endpoint)._signed_headers(
                "GET", client(True, endpoint).url("bkt", "k"), {})
            self.assertEqual(headers["Host"], [host], endpoint)
            self.assertIn("host;", headers["Authorization"][0])

    def test_no_credentials_means_no_signature(self):
        c = S3Client(task.Clock(), "anon", AWS, "eu-central-1", BackendCredentials())
        headers = c._signed_headers("GET", c.url("b", "k"), {})
        self.assertNotIn("Authorization", headers)

    @given(st.text(min_size=1, max_size=60).filter(lambda k: "\x00" not in k))
    def test_any_key_round_trips_through_the_url(self, key):
        for c in (client(True), client(False)):
            url = c.url("bkt", key)
            path = urlsplit(url).path
            if c.path_style:
                self.assertTrue(path.startswith("/bkt/"), url)
                path = path[len("/bkt"):]
            self.assertEqual(unquote(path[1:]), key, url)
            self.assertNotIn("?", url)
            self.assertNotIn("#", url)


class UpstreamPartSizeTests(unittest.TestCase):
    """An object stored as an upstream multipart upload fits S3's rules: at
    most 10,000 parts, each but the last at least 5 MiB."""

    @given(st.integers(0, 5 * 1024 ** 4))
    def test_fits_in_ten_thousand_parts_of_whole_mebibytes(self, size):
        part = upstream_part_size(size)
        self.assertGreaterEqual(part, 16 * 1024 * 1024)
        self.assertEqual(part % (1024 * 1024), 0)
        self.assertLessEqual(-(-size // part), 10_000)

    def test_sizes(self):
        mib = 1024 * 1024
        self.assertEqual(upstream_part_size(20 * mib), 16 * mib)
        self.assertEqual(upstream_part_size(5 * 1024 ** 4), 525 * mib)


class InFlightTests(unittest.TestCase):
    """Parts of an upstream multipart upload go a few at a time."""

    def setUp(self):
        self.waiting: dict[int, defer.Deferred] = {}
        self.peak = 0

    def run_part(self, n: int) -> defer.Deferred:
        self.waiting[n] = defer.Deferred()
        self.peak = max(self.peak, sum(1 for d in self.waiting.values() if not d.called))
        return self.waiting[n]

    def test_results_come_in_part_order_with_at_most_width_running(self):
        done = defer.ensureDeferred(in_flight(10, self.run_part, 3))
        for n in (3, 1, 2, 5, 4, 6, 9, 8, 7, 10):
            while n not in self.waiting:  # not started yet: finish the oldest running one
                oldest = min(k for k, d in self.waiting.items() if not d.called)
                self.waiting[oldest].callback(f"etag{oldest}")
            if not self.waiting[n].called:
                self.waiting[n].callback(f"etag{n}")
        self.assertEqual(self.successResultOf(done), [f"etag{n}" for n in range(1, 11)])
        self.assertEqual(self.peak, 3)

    def test_a_failure_stops_new_parts_and_waits_for_running_ones(self):
        done = defer.ensureDeferred(in_flight(10, self.run_part, 3))
        self.waiting[2].errback(ValueError("part 2 refused"))
        self.assertNoResult(done)  # parts 1 and 3 still running
        self.waiting[1].callback("etag1")
        self.waiting[3].callback("etag3")
        self.assertEqual(sorted(self.waiting), [1, 2, 3])  # nothing started after the failure
        self.failureResultOf(done, ValueError)

    def test_no_parts(self):
        self.assertEqual(self.successResultOf(defer.ensureDeferred(in_flight(0, self.run_part, 4))), [])


class RegionHintTests(unittest.TestCase):
    """A bucket in another region fails every request; the log line says
    which region to configure, and clients learn nothing of the backend."""

    def test_redirects_and_region_refusals_name_the_buckets_region(self):
        c = client(True)
        moved = c.error_from(301, b"<Error><Code>PermanentRedirect</Code><Message>Use the "
                             b"endpoint.</Message></Error>", "ap-southeast-2")
        self.assertEqual(moved.code, "PermanentRedirect")
        self.assertIn("the bucket is in region ap-southeast-2; backend 'archive' signs for "
                      "eu-central-1", moved.message)
        malformed = c.error_from(400, b"<Error><Code>AuthorizationHeaderMalformed</Code>"
                                 b"<Message>wrong region</Message><Region>us-west-2</Region>"
                                 b"</Error>")
        self.assertIn("region us-west-2", malformed.message)
        self.assertEqual(errors.from_upstream(moved.status, moved.code, moved.message).status, 500)
        self.assertEqual(errors.from_upstream(malformed.status, malformed.code,
                                              malformed.message).status, 500)

    def test_other_errors_and_the_same_region_get_no_hint(self):
        c = client(True)
        for status, body, region in (
                (404, b"<Error><Code>NoSuchKey</Code><Message>gone</Message></Error>", "us-west-2"),
                (301, b"<Error><Code>PermanentRedirect</Code></Error>", "eu-central-1"),
                (301, b"", "")):
            self.assertNotIn("region", c.error_from(status, body, region).message)
