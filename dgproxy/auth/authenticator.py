"""Who is calling: SigV4 verification against the configured credentials.

One credential pair for now (the IAM user table replaces L{lookup_secret}
later). Open access (C{authentication: none}) lets every request through as
C{$anonymous} and verifies nothing.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Optional

from dgproxy.auth.sigv4 import AuthFailure, AuthResult, SignedRequest, verify


@dataclass(frozen=True)
class Principal:
    name: str
    access_key_id: Optional[str]


ANONYMOUS = Principal("$anonymous", None)


class Authenticator:
    def __init__(self, access_key_id: Optional[str], secret_access_key: Optional[str],
                 open_access: bool, clock_skew_seconds: int,
                 clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)):
        self._akid = access_key_id
        self._akid_digest = hashlib.sha256((access_key_id or "").encode("utf-8")).digest()
        self._secret = secret_access_key
        self.open_access = open_access and not access_key_id
        self._skew = clock_skew_seconds
        self._clock = clock

    def lookup_secret(self, access_key_id: str) -> Optional[str]:
        """The secret for a key; compares digests so timing says nothing."""
        if not self._akid or not self._secret:
            return None
        given = hashlib.sha256(access_key_id.encode("utf-8", "surrogatepass")).digest()
        return self._secret if hmac.compare_digest(given, self._akid_digest) else None

    def authenticate(self, request: SignedRequest) -> tuple[Principal, Optional[AuthResult]]:
        """Raise L{AuthFailure} unless the request is signed by a known key."""
        if self.open_access:
            return ANONYMOUS, None
        result = verify(request, self.lookup_secret, self._clock(), self._skew)
        return Principal("$bootstrap", result.access_key_id), result


__all__ = ["Authenticator", "AuthFailure", "Principal", "ANONYMOUS"]
