"""End-to-end: an S3 backend reached over HTTPS (as AWS S3 always is).

SeaweedFS serves S3 over TLS with a certificate signed by a throwaway CA; the
dgproxy process trusts that CA through the standard ``SSL_CERT_FILE``
variable (OpenSSL's own, read by Twisted's TLS client and by the start-up
check alike). Without it the backend's certificate is refused at start-up.
"""

from __future__ import annotations

import os

from twisted.trial import unittest

from tests.e2e.harness import ProxyProcess
from tests.e2e.seaweed import Seaweed
from tests.tls import server_cert
from tests.e2e.test_s3_backend import (ClassFixture, etag, list_all, random_bytes,
                                       stored_objects, tar_versions)


def https_env(weed: Seaweed, trust: bool) -> dict:
    env = {**weed.backend_env(), "DGP_S3_ENDPOINT": weed.https_endpoint}
    if trust:
        env["SSL_CERT_FILE"] = weed.ca_file
    return env


class HttpsBackendTests(ClassFixture, unittest.TestCase):
    weed = None
    proxy = None
    bucket = "dgp-https"

    @classmethod
    def setUpClass(cls):
        cls.weed = Seaweed(tls=True)  # assigned first: tearDownClass stops it
        cls.weed.start()
        cls.proxy = ProxyProcess(env=https_env(cls.weed, trust=True))
        cls.proxy.env.pop("SSL_CERT_DIR", None)
        cls.proxy.start()
        cls.s3 = cls.proxy.client()
        cls.w = cls.weed.client()
        cls.s3.create_bucket(Bucket=cls.bucket)

    def test_start_up_names_the_https_endpoint(self):
        self.assertIn(f"S3 at {self.weed.https_endpoint}", self.proxy.log())

    def test_objects_round_trip_over_tls(self):
        """Bytes in both directions through TLS, large enough to fill the
        socket buffers many times over, plus a range and a listing."""
        cases = {"plain/small.txt": b"over https\n",
                 "plain/large.dat": random_bytes(24 * 1024 * 1024 + 7, seed=3)}
        for key, data in cases.items():
            put = self.s3.put_object(Bucket=self.bucket, Key=key, Body=data)
            self.assertEqual(put["ETag"], etag(data), key)
        for key, data in cases.items():
            got = self.s3.get_object(Bucket=self.bucket, Key=key)
            self.assertEqual(got["Body"].read(), data, key)
            self.assertEqual(got["ETag"], etag(data), key)
        large = cases["plain/large.dat"]
        part = self.s3.get_object(Bucket=self.bucket, Key="plain/large.dat",
                                  Range="bytes=5000000-5999999")["Body"].read()
        self.assertEqual(part, large[5_000_000:6_000_000])
        listed = {o["Key"]: o["Size"] for o in list_all(self.s3, self.bucket, Prefix="plain/")}
        self.assertEqual(listed, {k: len(v) for k, v in cases.items()})
        # What SeaweedFS holds is the same bytes (read back over plain HTTP).
        raw = self.w.get_object(Bucket=self.bucket, Key="plain/large.dat")["Body"].read()
        self.assertEqual(raw, large)

    def test_delta_versions_over_tls(self):
        versions = tar_versions(3, seed=11)
        for i, data in enumerate(versions):
            self.s3.put_object(Bucket=self.bucket, Key=f"rel/app-{i}.tar", Body=data)
        stored = stored_objects(self.w, self.bucket, "rel/")
        self.assertIn("rel/reference.bin", stored)
        self.assertIn("rel/app-2.tar.delta", stored)
        self.assertLess(stored["rel/app-2.tar.delta"], len(versions[2]) // 10)
        for i, data in enumerate(versions):
            got = self.s3.get_object(Bucket=self.bucket, Key=f"rel/app-{i}.tar")
            self.assertEqual(got["Body"].read(), data, i)

    def test_multipart_upload_over_tls(self):
        parts = [random_bytes(5 * 1024 * 1024, seed=20), random_bytes(1234, seed=21)]
        key = "mp/object.bin"
        upload = self.s3.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
        done = []
        for n, body in enumerate(parts, 1):
            r = self.s3.upload_part(Bucket=self.bucket, Key=key, UploadId=upload,
                                    PartNumber=n, Body=body)
            done.append({"PartNumber": n, "ETag": r["ETag"]})
        self.s3.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload,
                                          MultipartUpload={"Parts": done})
        got = self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        self.assertEqual(got, b"".join(parts))

    def test_an_untrusted_certificate_stops_start_up(self):
        """The same backend without its CA: the start-up check refuses the
        certificate, names the backend and endpoint, and the process exits."""
        proxy = ProxyProcess(env=https_env(self.weed, trust=False))
        proxy.env.pop("SSL_CERT_FILE", None)
        proxy.env.pop("SSL_CERT_DIR", None)
        self.addCleanup(proxy.cleanup)
        code = proxy.start_refused()
        log = proxy.log()
        self.assertNotEqual(code, 0)
        self.assertIn(f"S3 backend 'default' at {self.weed.https_endpoint} failed its start-up "
                      f"check", log)
        self.assertIn("CERTIFICATE_VERIFY_FAILED", log.upper().replace(" ", "_"))

    def test_aws_ca_bundle_is_the_only_trust(self):
        """AWS_CA_BUNDLE, the AWS tools' variable, names the authorities to
        trust in place of the system's (and SSL_CERT_FILE's): with the
        backend's CA in it dgproxy starts and serves; a bundle of another CA,
        or one that cannot be read, stops it at start-up."""
        proxy = ProxyProcess(env={**https_env(self.weed, trust=False),
                                  "AWS_CA_BUNDLE": self.weed.ca_file})
        proxy.env.pop("SSL_CERT_FILE", None)
        proxy.env.pop("SSL_CERT_DIR", None)
        self.addCleanup(proxy.cleanup)
        proxy.start()
        s3 = proxy.client()
        s3.put_object(Bucket=self.bucket, Key="bundle/a.txt", Body=b"trusted by bundle")
        got = s3.get_object(Bucket=self.bucket, Key="bundle/a.txt")["Body"].read()
        self.assertEqual(got, b"trusted by bundle")

        other = os.path.join(proxy.workdir, "other-ca.pem")
        with open(other, "wb") as f:
            f.write(server_cert().ca_pem)
        missing = os.path.join(proxy.workdir, "missing.pem")
        for bundle, said in ((other, "certificate verify failed"),
                             (missing, f"AWS_CA_BUNDLE {missing}: No such file or directory")):
            refused = ProxyProcess(env={**https_env(self.weed, trust=True),
                                        "AWS_CA_BUNDLE": bundle})
            self.addCleanup(refused.cleanup)
            self.assertNotEqual(refused.start_refused(), 0)
            self.assertIn(said, refused.log())
