"""End-to-end: the SeaweedFS behind one bucket goes away, then comes back.

dgproxy routes `remote` to a SeaweedFS backend named `weed` and everything
else to a filesystem backend. While SeaweedFS is stopped, `remote` answers 503
(ServiceUnavailable or SlowDown) and the log names the backend, while the
filesystem bucket keeps working; uploads tried during the outage leave nothing
behind; once SeaweedFS is started again (same data directory, same ports:
L{Seaweed} picks its ports once, in its constructor, so C{start()} after
C{stop()} reuses them) the same requests succeed.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Optional

from botocore.exceptions import BotoCoreError, ClientError
from twisted.trial import unittest

from tests.e2e.harness import ProxyProcess
from tests.e2e.test_native_sse import FAKE_ACCESS_KEY, FAKE_SECRET, FakeS3
from tests.e2e.test_observability import scrape
from tests.e2e.test_routing import routing_yaml
from tests.e2e.test_s3_backend import (
    ClassFixture, WeedServer, etag, list_all, random_bytes, s3_error, stored_objects,
    tar_versions)

OUTAGE_CODES = ("ServiceUnavailable", "SlowDown")


class BackendOutageTests(ClassFixture, unittest.TestCase):
    weed: Optional[WeedServer] = None
    proxy: Optional[ProxyProcess] = None

    @classmethod
    def setUpClass(cls):
        cls.weed = WeedServer()  # assigned before start: tearDownClass stops it
        cls.weed.start()
        cls.w = cls.weed.client()
        cls.proxy = ProxyProcess()
        cls.proxy.config_path = os.path.join(cls.proxy.workdir, "dgproxy.yaml")
        with open(cls.proxy.config_path, "w") as f:
            f.write(routing_yaml(os.path.join(cls.proxy.workdir, "fsdata"), cls.weed.endpoint))
        cls.proxy.start()
        cls.s3 = cls.proxy.client()  # one attempt per call: a 503 is not retried
        cls.s3.create_bucket(Bucket="remote")
        cls.s3.create_bucket(Bucket="localbkt")


    def assertOutage(self, fn, **kwargs) -> None:
        status, code = s3_error(fn, **kwargs)
        self.assertEqual(status, 503, (fn.__name__, kwargs.get("Key"), code))
        if fn.__name__ != "head_object":  # HEAD answers carry no body, so no code
            self.assertIn(code, OUTAGE_CODES, (fn.__name__, kwargs.get("Key")))

    def wait_until_writable(self, bucket: str, timeout: float = 60.0) -> None:
        """A restarted SeaweedFS can take many seconds over the first write into a
        bucket (its volumes are being re-registered); wait for that here, with a
        direct write, so it is not charged to dgproxy."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.w.put_object(Bucket=bucket, Key="zz-ready-probe", Body=b"probe")
                self.w.delete_object(Bucket=bucket, Key="zz-ready-probe")
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def test_backend_gone_mid_download_cuts_the_client(self):
        """The response headers promised a length; when the backend dies
        halfway through the body, dgproxy cuts the client's connection at
        once (the client must not wait for bytes that will never come)."""
        self.wait_until_writable("real-remote")
        size = 64 * 1024 * 1024
        self.s3.put_object(Bucket="remote", Key="big/cut.dat", Body=random_bytes(size, seed=9))
        presigner = self.proxy.client(signature_version="s3v4")
        url = presigner.generate_presigned_url("get_object", ExpiresIn=300,
                                               Params={"Bucket": "remote", "Key": "big/cut.dat"})
        path = url[len(self.proxy.endpoint):]
        sock = socket.create_connection(("127.0.0.1", self.proxy.port), timeout=30)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.proxy.port}\r\n\r\n"
                         .encode())
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(65536)
            self.assertIn(b" 200 ", head.split(b"\r\n", 1)[0])
            self.weed.stop()  # the client has read almost nothing yet
            got = len(head.split(b"\r\n\r\n", 1)[1])
            started = time.monotonic()
            try:
                while True:
                    data = sock.recv(1 << 20)
                    if not data:
                        break
                    got += len(data)
            except ConnectionResetError:
                pass
            self.assertLess(got, size)
            self.assertLess(time.monotonic() - started, 25)
        finally:
            sock.close()
            self.weed.start()
            self.wait_until_writable("real-remote")
            deadline = time.monotonic() + 30
            while "big/cut.dat" in stored_objects(self.w, "real-remote"):
                self.assertLess(time.monotonic(), deadline, "big/cut.dat not deleted")
                self.s3.delete_object(Bucket="remote", Key="big/cut.dat")
                time.sleep(0.2)
        self.assertIn("Response body failed after headers were sent", self.proxy.log())

    def test_outage_and_recovery(self):
        s3 = self.s3
        tars = tar_versions(4, seed=31)
        plain = random_bytes(200_000, seed=32)
        for i in (1, 2):
            s3.put_object(Bucket="remote", Key=f"rel/app-{i}.tar", Body=tars[i - 1])
        s3.put_object(Bucket="remote", Key="plain.dat", Body=plain)
        s3.put_object(Bucket="localbkt", Key="rel/app-1.tar", Body=tars[0])
        before = stored_objects(self.w, "real-remote")
        self.assertEqual(set(before), {"plain.dat", "rel/reference.bin", "rel/app-1.tar.delta",
                                       "rel/app-2.tar.delta"})
        log_mark = len(self.proxy.log())
        metrics_before = scrape(self.proxy)

        self.weed.stop()

        self.assertOutage(s3.get_object, Bucket="remote", Key="plain.dat")
        metrics_after = scrape(self.proxy)
        for name, labels in (("deltaglider_backend_requests_total",
                              dict(backend="weed", method="GET", status="unreachable")),
                             ("deltaglider_backend_retries_total",
                              dict(backend="weed", reason="unreachable"))):
            self.assertGreaterEqual(metrics_after.total(name, **labels)
                                    - metrics_before.total(name, **labels), 1, name)
        self.assertOutage(s3.get_object, Bucket="remote", Key="rel/app-2.tar")
        self.assertOutage(s3.head_object, Bucket="remote", Key="plain.dat")
        self.assertOutage(s3.list_objects_v2, Bucket="remote")
        self.assertOutage(s3.delete_object, Bucket="remote", Key="plain.dat")
        # Uploads during the outage: a delta against a cached reference, a first
        # object of a new deltaspace (would be a reference), a passthrough file.
        self.assertOutage(s3.put_object, Bucket="remote", Key="rel/app-3.tar", Body=tars[2])
        self.assertOutage(s3.put_object, Bucket="remote", Key="fresh/app-1.tar", Body=tars[0])
        self.assertOutage(s3.put_object, Bucket="remote", Key="new.dat", Body=plain)
        self.assertOutage(s3.copy_object, Bucket="remote", Key="rel/copied.tar",
                          CopySource={"Bucket": "localbkt", "Key": "rel/app-1.tar"})

        # The filesystem-routed bucket does not notice.
        s3.put_object(Bucket="localbkt", Key="rel/app-2.tar", Body=tars[1])
        self.assertEqual(s3.get_object(Bucket="localbkt", Key="rel/app-2.tar")["Body"].read(),
                         tars[1])
        self.assertEqual([o["Key"] for o in list_all(s3, "localbkt")],
                         ["rel/app-1.tar", "rel/app-2.tar"])
        s3.head_object(Bucket="localbkt", Key="rel/app-1.tar")

        log = self.proxy.log()[log_mark:]
        self.assertIn("'weed'", log)
        self.assertNotIn("Traceback", log)

        self.weed.start()
        self.wait_until_writable("real-remote")

        # Same requests, now answered; nothing of the failed uploads is visible.
        deadline = time.monotonic() + 20
        while True:
            try:
                got = s3.get_object(Bucket="remote", Key="plain.dat")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        self.assertEqual(got["Body"].read(), plain)
        got = s3.get_object(Bucket="remote", Key="rel/app-2.tar")
        self.assertEqual((got["Body"].read(), got["ETag"]), (tars[1], etag(tars[1])))
        s3.head_object(Bucket="remote", Key="plain.dat")
        self.assertEqual({o["Key"]: o["Size"] for o in list_all(s3, "remote")},
                         {"plain.dat": len(plain), "rel/app-1.tar": len(tars[0]),
                          "rel/app-2.tar": len(tars[1])})
        self.assertEqual(stored_objects(self.w, "real-remote"), before)
        for key in ("rel/app-3.tar", "fresh/app-1.tar", "new.dat", "rel/copied.tar"):
            self.assertEqual(s3_error(s3.head_object, Bucket="remote", Key=key)[0], 404, key)

        # And writes work again, in the same deltaspaces.
        s3.put_object(Bucket="remote", Key="rel/app-3.tar", Body=tars[2])
        s3.put_object(Bucket="remote", Key="fresh/app-1.tar", Body=tars[0])
        self.assertEqual(s3.get_object(Bucket="remote", Key="rel/app-3.tar")["Body"].read(),
                         tars[2])
        stored = stored_objects(self.w, "real-remote")
        self.assertIn("rel/app-3.tar.delta", stored)
        self.assertLess(stored["rel/app-3.tar.delta"], len(tars[2]) // 10)
        self.assertIn("fresh/reference.bin", stored)


def proxy_on_fake_s3(test: unittest.TestCase, **env: str) -> tuple[FakeS3, ProxyProcess]:
    """A running FakeS3 and a dgproxy with it as its only backend, both
    stopped when C{test} ends."""
    fake = FakeS3().start()
    test.addCleanup(fake.stop)
    proxy = ProxyProcess(env={
        "DGP_S3_ENDPOINT": fake.endpoint, "DGP_S3_REGION": "us-east-1",
        "DGP_BE_AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY,
        "DGP_BE_AWS_SECRET_ACCESS_KEY": FAKE_SECRET, **env})
    test.addCleanup(proxy.cleanup)
    proxy.start()
    return fake, proxy


class SilentBackendTests(unittest.TestCase):
    """A backend that stops sending in the middle of a response body (no
    reset, no close: a network partition) is given up on after
    DGP_S3_READ_TIMEOUT_SECS, and the client's connection is cut."""

    def setUp(self):
        self.fake, self.proxy = proxy_on_fake_s3(self, DGP_S3_READ_TIMEOUT_SECS="2")

    def test_silent_body_is_cut_after_the_read_timeout(self):
        s3 = self.proxy.client()
        s3.create_bucket(Bucket="quiet")
        body = random_bytes(4 * 1024 * 1024, seed=11)
        s3.put_object(Bucket="quiet", Key="half.dat", Body=body)
        self.fake.stalls["half.dat"] = 20
        started = time.monotonic()
        with self.assertRaises(Exception):  # a short read or a reset, not a hang
            s3.get_object(Bucket="quiet", Key="half.dat")["Body"].read()
        self.assertLess(time.monotonic() - started, 12)
        self.assertIn("sent no byte of a response body for 2 s", self.proxy.log())
        del self.fake.stalls["half.dat"]
        self.assertEqual(s3.get_object(Bucket="quiet", Key="half.dat")["Body"].read(), body)

    def test_upload_that_is_never_answered_gets_a_503(self):
        s3 = self.proxy.client()
        s3.create_bucket(Bucket="mute")
        # A .dat of known length streams upstream; the first .zip (a delta
        # candidate) is spooled and its reference sent as a file: both wait for
        # the answer at most 2 s (the file is retried, as whole-file PUTs are).
        for key, stored, deadline in (("mute.dat", "mute.dat", 10),
                                      ("first.zip", "reference.bin", 20)):
            self.fake.hangs[stored] = 30
            started = time.monotonic()
            status, code = s3_error(s3.put_object, Bucket="mute", Key=key, Body=b"x" * 100_000)
            self.assertEqual(status, 503, (key, code))
            self.assertLess(time.monotonic() - started, deadline, key)
        log = self.proxy.log()
        self.assertIn("did not take or answer an upload within 2 s", log)
        self.assertIn("unreachable", log)

    def test_upload_the_backend_stops_reading_is_given_up(self):
        s3 = self.proxy.client()
        s3.create_bucket(Bucket="stuck")
        self.fake.stops["big.dat"] = 30
        started = time.monotonic()
        try:
            s3.put_object(Bucket="stuck", Key="big.dat", Body=random_bytes(32 * 1024 * 1024, 3))
        except ClientError as e:  # the 503, if the client reads it before the close
            self.assertEqual(e.response["ResponseMetadata"]["HTTPStatusCode"], 503)
        except (BotoCoreError, OSError):  # or the connection cut while it still sent
            pass
        else:
            self.fail("the upload succeeded")
        self.assertLess(time.monotonic() - started, 15)
        self.assertIn("did not take or answer an upload within 2 s", self.proxy.log())
        self.assertNotIn("big.dat", self.fake.stored("stuck"))



class RangeAnswerTests(unittest.TestCase):
    """A ranged GET goes upstream as one ranged GET. HTTP lets a service
    answer it with the whole object (200); the client still gets just its
    range."""

    def setUp(self):
        self.fake, self.proxy = proxy_on_fake_s3(self)
        self.s3 = self.proxy.client()
        self.s3.create_bucket(Bucket="ranges")

    def test_a_service_that_ignores_ranges(self):
        body = random_bytes(3 * 1024 * 1024 + 17, seed=5)
        self.s3.put_object(Bucket="ranges", Key="clip.dat", Body=body)
        self.fake.ignores_ranges = True
        for header, expected in [("bytes=0-99", body[:100]), ("bytes=-1000", body[-1000:]),
                                 ("bytes=2000000-", body[2000000:]),
                                 ("bytes=1048570-2097160", body[1048570:2097161])]:
            got = self.s3.get_object(Bucket="ranges", Key="clip.dat", Range=header)
            self.assertEqual(got["ContentLength"], len(expected), header)
            self.assertEqual(got["Body"].read(), expected, header)
        self.assertEqual(s3_error(self.s3.get_object, Bucket="ranges", Key="clip.dat",
                                  Range=f"bytes={len(body)}-"), (416, "InvalidRange"))
        # One upstream request per ranged GET, whatever the answer.
        before = len(self.fake.requests)
        self.s3.get_object(Bucket="ranges", Key="clip.dat", Range="bytes=5-9")["Body"].read()
        self.assertEqual([r.method for r in self.fake.requests[before:]], ["GET"])


class UpstreamMultipartTests(unittest.TestCase):
    """An object a client uploaded in parts is joined upstream: an upstream
    multipart upload whose parts are copied from the stored ones, with no
    byte through dgproxy. One that fails midway is aborted upstream, and
    nothing of it is visible."""

    def setUp(self):
        self.fake, self.proxy = proxy_on_fake_s3(self)
        self.s3 = self.proxy.client()
        self.s3.create_bucket(Bucket="parts")

    def upload(self, key: str, parts: list[bytes]) -> str:
        uid = self.s3.create_multipart_upload(Bucket="parts", Key=key)["UploadId"]
        done = [{"PartNumber": n, "ETag": self.s3.upload_part(
            Bucket="parts", Key=key, UploadId=uid, PartNumber=n, Body=body)["ETag"]}
            for n, body in enumerate(parts, 1)]
        return self.s3.complete_multipart_upload(Bucket="parts", Key=key, UploadId=uid,
                                                 MultipartUpload={"Parts": done})["ETag"]

    def test_a_failed_upstream_part_aborts_the_upstream_upload(self):
        parts = [os.urandom(6 * 1024 * 1024) for _ in range(3)] + [b"tail"]  # 2 upstream parts
        self.fake.failed_parts[2] = (500, "InternalError", "disk on fire")
        self.assertEqual(s3_error(self.upload, "big/one.dat", parts), (500, "InternalError"))
        self.assertEqual(s3_error(self.s3.head_object, Bucket="parts", Key="big/one.dat")[0], 404)
        self.assertNotIn("big/one.dat", self.fake.stored("parts"))
        deadline = time.monotonic() + 10
        while self.fake.uploads and time.monotonic() < deadline:  # aborted in the background
            time.sleep(0.05)
        self.assertEqual(self.fake.uploads, {}, "the upstream upload was left behind")
        # Once the service takes parts again, the same upload works.
        del self.fake.failed_parts[2]
        def part_reads() -> int:
            return sum(1 for r in self.fake.object_reads()
                       if r.method == "GET" and "/part-" in r.key)

        reads_before = part_reads()
        etag = self.upload("big/one.dat", parts)
        self.assertTrue(etag.endswith('-4"'), etag)
        self.assertEqual(self.fake.stored("parts")["big/one.dat"].etag, etag.strip('"'),
                         "the upstream object is made of the client's parts")
        self.assertEqual(part_reads(), reads_before, "dgproxy read the parts back to join them")
        listed = self.s3.list_objects_v2(Bucket="parts", Prefix="big/")["Contents"]
        self.assertEqual([o["ETag"] for o in listed], [etag])
        got = self.s3.get_object(Bucket="parts", Key="big/one.dat")
        self.assertEqual(got["ETag"], etag)
        self.assertEqual(got["Body"].read(), b"".join(parts))

    def test_an_error_inside_the_complete_answer_is_a_failure(self):
        """AWS can fail a Complete after its 200 has begun, with the error as
        the body: that is no object, and the upstream upload is aborted."""
        self.fake.complete_error = "InternalError"
        parts = [os.urandom(5 * 1024 * 1024), b"tail"]
        self.assertEqual(s3_error(self.upload, "big/two.dat", parts), (500, "InternalError"))
        self.assertEqual(s3_error(self.s3.head_object, Bucket="parts", Key="big/two.dat")[0], 404)
        deadline = time.monotonic() + 10
        while self.fake.uploads and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(self.fake.uploads, {})


class UpstreamErrorTests(unittest.TestCase):
    """What a client is told when the S3 service answers with an error: a
    throttle stays a throttle (after dgproxy's own retries of idempotent
    calls), an error about the request keeps its status and code, and a
    refusal of dgproxy's credentials or a failure of the service is a 500."""

    def setUp(self):
        self.fake, self.proxy = proxy_on_fake_s3(self)
        self.s3 = self.proxy.client()  # no retries of its own
        self.s3.create_bucket(Bucket="upstream-errors")

    def reads_of(self, key: str) -> int:
        return sum(1 for r in self.fake.object_reads() if r.key == key)

    def test_slow_down_reaches_the_client_after_retries(self):
        self.fake.fails["hot.dat"] = (503, "SlowDown", "Please reduce your request rate.")
        self.assertEqual(s3_error(self.s3.get_object, Bucket="upstream-errors", Key="hot.dat"),
                         (503, "SlowDown"))
        self.assertEqual(self.reads_of("hot.dat"), 3)  # GET is retried with backoff
        self.assertEqual(s3_error(self.s3.head_object, Bucket="upstream-errors", Key="hot.dat")[0], 503)
        status, code = s3_error(self.s3.put_object, Bucket="upstream-errors", Key="hot.dat", Body=b"x" * 1000)
        self.assertEqual((status, code), (503, "SlowDown"))
        # Once the service recovers, the same calls work.
        del self.fake.fails["hot.dat"]
        self.s3.put_object(Bucket="upstream-errors", Key="hot.dat", Body=b"cool")
        self.assertEqual(self.s3.get_object(Bucket="upstream-errors", Key="hot.dat")["Body"].read(), b"cool")

    def test_metrics_tell_upstream_throttling_from_dgproxys_own(self):
        """The seed's "503 SlowDown on PUT" page says the 503 comes from the
        service: the backend metrics show it, with dgproxy's retries."""
        before = scrape(self.proxy)
        self.s3.put_object(Bucket="upstream-errors", Key="fine.dat", Body=b"fine")
        self.fake.fails["hot.dat"] = (503, "SlowDown", "Please reduce your request rate.")
        self.assertEqual(s3_error(self.s3.get_object, Bucket="upstream-errors", Key="hot.dat"),
                         (503, "SlowDown"))
        after = scrape(self.proxy)

        def moved(name, **labels):
            return after.total(name, **labels) - before.total(name, **labels)

        requests = "deltaglider_backend_requests_total"
        self.assertEqual(moved(requests, backend="default", method="GET", status="503"), 3)
        self.assertGreaterEqual(moved(requests, backend="default", method="PUT", status="200"), 1)
        self.assertEqual(moved("deltaglider_backend_retries_total", backend="default",
                               reason="status_503"), 2)
        self.assertGreaterEqual(moved("deltaglider_backend_request_duration_seconds_count",
                                      backend="default", method="GET"), 3)

    def test_an_error_about_the_request_keeps_its_status_and_code(self):
        self.fake.fails["odd.dat"] = (400, "InvalidRequest", "The service will not take this key")
        try:
            self.s3.get_object(Bucket="upstream-errors", Key="odd.dat")
        except ClientError as e:
            error = e.response["Error"]
            self.assertEqual(e.response["ResponseMetadata"]["HTTPStatusCode"], 400)
            self.assertEqual((error["Code"], error["Message"]),
                             ("InvalidRequest", "The service will not take this key"))
        else:
            self.fail("GET succeeded")
        self.assertEqual(self.reads_of("odd.dat"), 1)  # a 4xx is not retried
        self.fake.fails["huge.dat"] = (400, "EntityTooLarge", "")
        self.assertEqual(s3_error(self.s3.put_object, Bucket="upstream-errors", Key="huge.dat", Body=b"x"),
                         (400, "EntityTooLarge"))
        self.assertIn("upstream 400 InvalidRequest", self.proxy.log())

    def test_refused_credentials_and_service_failures_are_internal_errors(self):
        for key, failure in (("a.dat", (403, "AccessDenied", "no")),
                             ("b.dat", (400, "AuthorizationHeaderMalformed", "region")),
                             ("c.dat", (403, "SignatureDoesNotMatch", "")),
                             ("d.dat", (500, "InternalError", "boom")),
                             ("e.dat", (400, "<script>", "hostile code"))):
            self.fake.fails[key] = failure
            self.assertEqual(s3_error(self.s3.get_object, Bucket="upstream-errors", Key=key),
                             (500, "InternalError"), key)
        self.assertEqual(self.reads_of("d.dat"), 3)  # a 5xx is retried first
        self.assertIn("upstream 403 AccessDenied", self.proxy.log())
