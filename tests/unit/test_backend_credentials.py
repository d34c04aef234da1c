"""Unit: where an S3 backend's keys come from, and how temporary ones are
renewed off the reactor thread (botocore's own RefreshableCredentials, fed
by a function instead of a metadata service)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from botocore.credentials import Credentials, RefreshableCredentials
from botocore.exceptions import CredentialRetrievalError, ProfileNotFound
from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from dgproxy.storage.credentials import BackendCredentials, CredentialsUnavailable
from dgproxy.storage.s3client import S3Client


def _expiring(minutes: float) -> str:
    return (datetime.now(timezone.utc) + timedelta(minutes=minutes)).isoformat()


class RoleKeys:
    """A role whose keys change on every fetch: AKROLE1, AKROLE2, ... Each
    expires within botocore's mandatory-renewal window, so every snapshot
    asks for new ones; C{failing} makes the fetch fail instead."""

    def __init__(self):
        self.fetches = 0
        self.failing = False

    def __call__(self) -> dict:
        if self.failing:
            raise CredentialRetrievalError(provider="container-role", error_msg="503 from the agent")
        self.fetches += 1
        return {"access_key": f"AKROLE{self.fetches}", "secret_key": f"secret{self.fetches}",
                "token": f"token{self.fetches}", "expiry_time": _expiring(5)}

    def credentials(self) -> RefreshableCredentials:
        return RefreshableCredentials.create_from_metadata(self(), self, "container-role")


class ResolveTests(unittest.TestCase):
    def test_configured_keys_win_and_the_chain_is_not_asked(self):
        def chain():
            raise AssertionError("chain asked")
        c = BackendCredentials.resolve("AKIDCONFIG", "s3cret", chain=chain)
        self.assertEqual((c.current.access_key, c.current.secret_key, c.current.token),
                         ("AKIDCONFIG", "s3cret", None))
        self.assertEqual(c.describe(), "credentials from config")
        self.assertFalse(c.renewable)

    def test_the_chain_fills_in_when_the_config_names_none(self):
        found = Credentials("AKIDENV", "envsecret", method="env")
        c = BackendCredentials.resolve(None, None, chain=lambda: found)
        self.assertEqual(c.current.access_key, "AKIDENV")
        self.assertEqual(c.describe(), "credentials from env")

    def test_nothing_found_means_unsigned(self):
        c = BackendCredentials.resolve("", None, chain=lambda: None)
        self.assertIsNone(c.current)
        self.assertEqual(c.describe(), "no credentials (requests unsigned)")
        headers = S3Client(task.Clock(), "anon", "http://127.0.0.1:1", "us-east-1", c)._signed_headers(
            "GET", "http://127.0.0.1:1/b/k", {})
        self.assertNotIn("Authorization", headers)

    def test_a_chain_error_is_reported_not_raised_raw(self):
        def chain():
            raise ProfileNotFound(profile="nightly")
        e = self.assertRaises(CredentialsUnavailable, BackendCredentials.resolve, None, None,
                              chain=chain)
        self.assertIn("nightly", str(e))

    def test_a_role_that_cannot_be_fetched_at_start_up_is_reported(self):
        keys = RoleKeys()
        creds = keys.credentials()
        keys.failing = True
        # Past expiry, so the first snapshot must fetch, and fails.
        creds._expiry_time = datetime.now(timezone.utc) - timedelta(minutes=1)
        e = self.assertRaises(CredentialsUnavailable, BackendCredentials, creds, "container-role")
        self.assertIn("container-role", str(e))


class RenewalTests(unittest.TestCase):
    """Real reactor and thread pool: renewal runs botocore's blocking fetch
    in a thread; the test waits (bounded) for the snapshot to change."""

    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    @defer.inlineCallbacks
    def wait_for(self, predicate, what: str, timeout: float = 10.0):
        deadline = reactor.seconds() + timeout
        while not predicate():
            if reactor.seconds() > deadline:
                self.fail(f"timed out waiting for {what}")
            yield task.deferLater(reactor, 0.02, lambda: None)

    @defer.inlineCallbacks
    def test_renewed_keys_sign_the_next_request(self):
        keys = RoleKeys()
        c = BackendCredentials(keys.credentials(), "container-role")
        self.assertTrue(c.renewable)
        self.assertEqual(c.describe(), "credentials from container-role, renewed")
        client = S3Client(reactor, "role", "http://127.0.0.1:1", "us-east-1", c)
        first = client._signed_headers("GET", "http://127.0.0.1:1/b/k", {})
        self.assertIn("Credential=AKROLE", first["Authorization"][0])
        before = c.current.access_key
        c.start_renewing(reactor, "role", every=0.05)
        self.addCleanup(c.stop_renewing)
        yield self.wait_for(lambda: c.current.access_key != before, "renewal")
        after = client._signed_headers("GET", "http://127.0.0.1:1/b/k", {})
        self.assertIn(f"Credential={c.current.access_key}/", after["Authorization"][0])
        self.assertEqual(after["X-Amz-Security-Token"], [c.current.token])
        self.assertTrue(any("renewed" in (e.get("log_format") or "") for e in self.events))

    @defer.inlineCallbacks
    def test_a_failed_renewal_keeps_the_keys_and_warns(self):
        keys = RoleKeys()
        c = BackendCredentials(keys.credentials(), "container-role")
        held = c.current
        keys.failing = True
        c.start_renewing(reactor, "role", every=0.05)
        self.addCleanup(c.stop_renewing)
        yield self.wait_for(lambda: any("failed" in (e.get("log_format") or "")
                                        for e in self.events), "a warning")
        self.assertEqual(c.current, held)
        keys.failing = False
        yield self.wait_for(lambda: c.current != held, "recovery")
        self.assertTrue(c.current.access_key.startswith("AKROLE"))

    def test_static_keys_start_no_timer(self):
        c = BackendCredentials.resolve("AKIDCONFIG", "s3cret")
        clock = task.Clock()
        c.start_renewing(clock, "static", every=1)
        self.assertEqual(clock.getDelayedCalls(), [])
