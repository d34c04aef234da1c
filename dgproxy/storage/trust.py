"""Which certificate authorities an https:// S3 endpoint is checked against:
the system's (OpenSSL's defaults, which C{SSL_CERT_FILE} and C{SSL_CERT_DIR}
move), or only those in the PEM file C{AWS_CA_BUNDLE} names, as for the
AWS CLI and SDKs, so that a bundle made for them works here unchanged."""

from __future__ import annotations

import re
import ssl
from typing import Mapping, Optional

from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.web.client import BrowserLikePolicyForHTTPS

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.S)


class Trust:
    """The TLS policy for the S3 client and the SSL context for the
    start-up check, from one source."""

    def __init__(self, environment: Mapping[str, str]):
        """Raise ValueError when C{AWS_CA_BUNDLE} names a file that holds no
        usable certificate (said at start-up, not at the first request)."""
        self.bundle: Optional[str] = environment.get("AWS_CA_BUNDLE") or None
        if self.bundle is None:
            self.policy = BrowserLikePolicyForHTTPS()
            return
        try:
            with open(self.bundle, "rb") as f:
                blocks = _PEM.findall(f.read())
            certificates = [Certificate.loadPEM(b) for b in blocks]
        except OSError as e:
            raise ValueError(f"AWS_CA_BUNDLE {self.bundle}: {e.strerror}") from None
        except Exception as e:
            raise ValueError(f"AWS_CA_BUNDLE {self.bundle}: not a PEM certificate: {e}") from None
        if not certificates:
            raise ValueError(f"AWS_CA_BUNDLE {self.bundle}: no PEM certificate in it")
        self.policy = BrowserLikePolicyForHTTPS(trustRoot=trustRootFromCertificates(certificates))

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.bundle)
