"""End-to-end: an S3 backend whose config names no keys signs with what the
AWS credential chain finds, as on EC2, ECS or EKS, where operators give a
role, not keys. The chain is fed through the environment and a shared
credentials file (a real SeaweedFS that enforces SigV4 behind dgproxy), and
through a container credentials endpoint served by the test, whose temporary
keys carry a session token: SeaweedFS takes a token as an STS session it
does not know, so that case runs against L{FakeS3}, which checks the
signature as AWS does."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from twisted.trial import unittest

from tests.e2e.harness import ProxyProcess
from tests.e2e.seaweed import WEED_ACCESS_KEY, WEED_SECRET_KEY
from tests.e2e.test_native_sse import FAKE_ACCESS_KEY, FAKE_SECRET, FakeS3
from tests.e2e.test_s3_backend import ClassFixture, WeedServer, random_bytes

ROLE_TOKEN = "container-session-token-0123456789"
AUTH_TOKEN = "task-auth-token"


class _RoleEndpoint(BaseHTTPRequestHandler):
    """The ECS container credentials service: temporary keys for a role."""

    asked: list = []

    def do_GET(self):
        self.asked.append((self.path, self.headers.get("Authorization")))
        if self.headers.get("Authorization") != AUTH_TOKEN:
            self.send_response(403)
            self.end_headers()
            return
        expires = datetime.now(timezone.utc) + timedelta(hours=6)
        body = json.dumps({"AccessKeyId": FAKE_ACCESS_KEY, "SecretAccessKey": FAKE_SECRET,
                           "Token": ROLE_TOKEN,
                           "Expiration": expires.strftime("%Y-%m-%dT%H:%M:%SZ")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class ChainCredentialsTests(ClassFixture, unittest.TestCase):
    weed: Optional[WeedServer] = None

    @classmethod
    def setUpClass(cls):
        cls.weed = WeedServer()
        cls.weed.start()
        cls.weed.client().create_bucket(Bucket="chain")

    def dgproxy(self, env: dict) -> ProxyProcess:
        """A dgproxy on the SeaweedFS with no backend keys of its own."""
        p = ProxyProcess(env={"DGP_S3_ENDPOINT": self.weed.endpoint,
                              "DGP_S3_REGION": "us-east-1", **env})
        self.addCleanup(p.cleanup)
        return p

    def assertServes(self, p: ProxyProcess, key: str) -> None:
        p.start()
        body = random_bytes(300_000, seed=len(key))
        s3 = p.client()
        s3.put_object(Bucket="chain", Key=key, Body=body)
        self.assertEqual(s3.get_object(Bucket="chain", Key=key)["Body"].read(), body)
        stored = self.weed.client().get_object(Bucket="chain", Key=key)["Body"].read()
        self.assertEqual(stored, body)

    def test_keys_from_the_aws_environment(self):
        p = self.dgproxy({"AWS_ACCESS_KEY_ID": WEED_ACCESS_KEY,
                        "AWS_SECRET_ACCESS_KEY": WEED_SECRET_KEY})
        self.assertServes(p, "env/a.dat")
        self.assertIn("credentials from env", p.log())

    def test_keys_from_a_named_profile_of_the_shared_files(self):
        p = self.dgproxy({"AWS_PROFILE": "weed"})
        path = os.path.join(p.workdir, "credentials")
        with open(path, "w") as f:
            f.write("[default]\naws_access_key_id = AKIAWRONGWRONGWRONG\n"
                    "aws_secret_access_key = wrong\n\n"
                    f"[weed]\naws_access_key_id = {WEED_ACCESS_KEY}\n"
                    f"aws_secret_access_key = {WEED_SECRET_KEY}\n")
        p.env["AWS_SHARED_CREDENTIALS_FILE"] = path
        self.assertServes(p, "profile/a.dat")
        self.assertIn("credentials from shared-credentials-file", p.log())

    def test_a_missing_profile_refuses_to_start_and_says_which(self):
        p = self.dgproxy({"AWS_PROFILE": "no-such-profile"})
        self.assertNotEqual(p.start_refused(), 0)
        self.assertIn("S3 backend 'default' has no usable credentials", p.log())
        self.assertIn("no-such-profile", p.log())

    def test_no_keys_anywhere_is_refused_by_a_service_that_checks(self):
        """Nothing found: requests go unsigned, and this SeaweedFS refuses the
        start-up check, which says to look at the credentials."""
        p = self.dgproxy({})
        self.assertNotEqual(p.start_refused(), 0)
        self.assertIn("failed its start-up check", p.log())
        self.assertIn("are the credentials right?", p.log())


class FakeS3CredentialsTests(unittest.TestCase):
    def test_container_role_keys_with_a_session_token(self):
        """Temporary keys carry a token, sent and signed as
        X-Amz-Security-Token; they are renewed, so the start-up line says so."""
        fake = FakeS3().start()
        self.addCleanup(fake.stop)
        server = ThreadingHTTPServer(("127.0.0.1", 0), _RoleEndpoint)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        _RoleEndpoint.asked = []
        url = f"http://127.0.0.1:{server.server_address[1]}/v2/credentials/task-1"
        p = ProxyProcess(env={"DGP_S3_ENDPOINT": fake.endpoint, "DGP_S3_REGION": "us-east-1",
                              "AWS_CONTAINER_CREDENTIALS_FULL_URI": url,
                              "AWS_CONTAINER_AUTHORIZATION_TOKEN": AUTH_TOKEN})
        self.addCleanup(p.cleanup)
        p.start()
        self.assertIn("credentials from container-role, renewed", p.log())
        self.assertEqual(_RoleEndpoint.asked[0], ("/v2/credentials/task-1", AUTH_TOKEN))
        s3 = p.client()
        s3.create_bucket(Bucket="role")
        body = random_bytes(300_000, seed=3)
        s3.put_object(Bucket="role", Key="a/b.dat", Body=body)
        self.assertEqual(s3.get_object(Bucket="role", Key="a/b.dat")["Body"].read(), body)
        self.assertEqual(fake.stored("role")["a/b.dat"].body, body)
        with fake.lock:
            seen = list(fake.requests)
        self.assertGreater(len(seen), 2)
        for r in seen:  # FakeS3 refused any whose signature did not hold
            self.assertEqual(r.headers.get("x-amz-security-token"), ROLE_TOKEN, r)
            self.assertIn("x-amz-security-token", r.headers["authorization"], r)

    def test_keys_scoped_to_their_buckets(self):
        """An AWS role scoped to its buckets may not list all buckets. The
        start-up check and /_/ready take AccessDenied to a signed ListBuckets
        as proof that the keys work, and dgproxy lists the buckets its config
        declares there (those that exist) instead, for clients and for its own
        sweeps alike."""
        fake = FakeS3().start()
        self.addCleanup(fake.stop)
        fake.denies_list_buckets = True
        fake.buckets["scoped"] = {}
        fake.buckets["undeclared"] = {}
        p = ProxyProcess(env={"DGP_S3_ENDPOINT": fake.endpoint, "DGP_S3_REGION": "us-east-1",
                              "DGP_BE_AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY,
                              "DGP_BE_AWS_SECRET_ACCESS_KEY": FAKE_SECRET},
                         config_yaml="storage:\n  buckets:\n    scoped: {}\n    gone: {}\n")
        self.addCleanup(p.cleanup)
        p.start()
        self.assertIn("ListBuckets is denied to these credentials (AccessDenied)", p.log())
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(p.endpoint + "/_/ready", timeout=2) as r:
                    self.assertEqual(r.status, 200)
                    break
            except urllib.error.HTTPError as e:
                if time.monotonic() > deadline:
                    raise AssertionError(f"/_/ready still {e.code}: {e.read()!r}") from None
                time.sleep(0.2)
        s3 = p.client()
        self.assertEqual([b["Name"] for b in s3.list_buckets()["Buckets"]], ["scoped"])
        s3.put_object(Bucket="scoped", Key="k.dat", Body=b"scoped body")
        self.assertEqual(s3.get_object(Bucket="scoped", Key="k.dat")["Body"].read(), b"scoped body")
        self.assertEqual(fake.stored("scoped")["k.dat"].body, b"scoped body")
        log = p.log()
        self.assertIn("listing the buckets the config declares on it instead: scoped, gone", log)
        self.assertNotIn("Unhandled Error", log)
        self.assertNotIn("#critical]", log)
