"""An S3 backend's credentials: the keys its config names or, when it names
none, what the AWS credential chain finds, as with any other S3 tool. The
chain is botocore's: the AWS_* environment, the shared credentials and config
files (AWS_PROFILE), web identity (EKS), SSO, the container role (ECS) and the
EC2 instance role.

Role credentials are temporary. botocore renews them when they are used, with
a blocking HTTP call; here they are renewed in a thread on a timer instead,
and requests are signed with the last snapshot, so that no request waits on a
metadata service and the reactor never blocks."""

from __future__ import annotations

from typing import Callable, Optional

import botocore.session
from botocore.exceptions import BotoCoreError
from botocore.credentials import Credentials, ReadOnlyCredentials, RefreshableCredentials
from twisted.internet import task, threads
from twisted.logger import Logger

log = Logger(namespace="dgproxy.storage.credentials")

# botocore renews role credentials once they are within 15 minutes of expiry
# (and must by 10): asking every minute renews them well before either.
RENEW_EVERY = 60.0


class CredentialsUnavailable(Exception):
    """The AWS chain failed at start-up (a named profile missing, a role
    that could not be assumed, a metadata service that answered with an error)."""


class BackendCredentials:
    """The signing keys of one backend, as a snapshot that renewal replaces."""

    def __init__(self, found: Optional[Credentials] = None, method: str = "none"):
        """C{found}: botocore credentials; renewable ones are asked for their
        first snapshot here (blocking: this runs at start-up)."""
        self._found = found
        self.method = method
        try:
            self.current: Optional[ReadOnlyCredentials] = (
                found.get_frozen_credentials() if found is not None else None)
        except BotoCoreError as e:
            raise CredentialsUnavailable(f"{method}: {e}") from None
        self._timer: Optional[task.LoopingCall] = None

    @classmethod
    def resolve(cls, access_key: Optional[str], secret_key: Optional[str],
                chain: Callable[[], Optional[Credentials]] = None) -> "BackendCredentials":
        """The configured keys, else the AWS chain's, else none (unsigned)."""
        if access_key:
            return cls(Credentials(access_key, secret_key or ""), "config")
        try:
            found = (chain or _aws_chain)()
        except BotoCoreError as e:
            raise CredentialsUnavailable(f"AWS credential chain: {e}") from None
        if found is None:
            return cls()
        return cls(found, found.method or "aws chain")

    @property
    def renewable(self) -> bool:
        return isinstance(self._found, RefreshableCredentials)

    def describe(self) -> str:
        """For the start-up line."""
        if self.current is None:
            return "no credentials (requests unsigned)"
        return f"credentials from {self.method}" + (", renewed" if self.renewable else "")

    def start_renewing(self, reactor, backend: str, every: float = RENEW_EVERY) -> None:
        """Renew in a thread every C{every} seconds, if the credentials expire."""
        if not self.renewable or self._timer is not None:
            return
        self._timer = task.LoopingCall(self.renew, reactor, backend)
        self._timer.clock = reactor
        self._timer.start(every, now=False)

    def stop_renewing(self) -> None:
        if self._timer is not None and self._timer.running:
            self._timer.stop()
        self._timer = None

    def renew(self, reactor, backend: str):
        """Take a new snapshot (botocore fetches new keys only when due). A
        failure keeps the old one, which may still be valid, and says why."""
        d = threads.deferToThreadPool(reactor, reactor.getThreadPool(),
                                      self._found.get_frozen_credentials)

        def took(snapshot: ReadOnlyCredentials) -> None:
            if snapshot != self.current:
                log.info("Backend '{backend}': credentials from {method} renewed",
                         backend=backend, method=self.method)
            self.current = snapshot

        def failed(f) -> None:
            log.warn("Backend '{backend}': renewing credentials from {method} failed: "
                     "{why}; signing with the current ones",
                     backend=backend, method=self.method, why=f.getErrorMessage())

        return d.addCallbacks(took, failed)


def _aws_chain() -> Optional[Credentials]:
    """What botocore's default chain finds in this process's environment."""
    return botocore.session.Session().get_credentials()
