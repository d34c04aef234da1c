"""End-to-end: dgproxy reaches its S3 backend through an outbound HTTP proxy
named by HTTPS_PROXY / HTTP_PROXY, skipping it for NO_PROXY hosts, as the AWS
tools do. The proxy is a real tinyproxy (Debian's `tinyproxy`, installed by
`make test`) that wants Basic credentials and logs each request it relays;
SeaweedFS serves S3 over HTTP and over HTTPS (a throwaway CA)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Optional

from twisted.trial import unittest

from tests.e2e.harness import ProxyProcess, free_port, read_log
from tests.e2e.seaweed import Seaweed
from tests.e2e.test_s3_backend import ClassFixture, random_bytes

TINYPROXY = shutil.which("tinyproxy")
USER, PASSWORD = "relay", "relaysecret42"  # tinyproxy takes letters and digits only


class TinyProxy:
    """tinyproxy in the foreground on a free port, wanting USER/PASSWORD."""

    def __init__(self):
        self.workdir = tempfile.mkdtemp(prefix="dgp-tinyproxy-")
        self.port = free_port()
        self.log_path = os.path.join(self.workdir, "tinyproxy.log")
        self.proc: Optional[subprocess.Popen] = None

    def url(self, password: str = PASSWORD) -> str:
        return f"http://{USER}:{password}@127.0.0.1:{self.port}"

    def start(self) -> "TinyProxy":
        conf = os.path.join(self.workdir, "tinyproxy.conf")
        with open(conf, "w") as f:
            f.write(f'Port {self.port}\nListen 127.0.0.1\nTimeout 60\nMaxClients 64\n'
                    f'Allow 127.0.0.1\nLogLevel Connect\nLogFile "{self.log_path}"\n'
                    f'PidFile "{os.path.join(self.workdir, "tinyproxy.pid")}"\n'
                    f'BasicAuth {USER} {PASSWORD}\nDisableViaHeader Yes\n')
        self.proc = subprocess.Popen([TINYPROXY, "-d", "-c", conf], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"tinyproxy did not start:\n{self.log()}") from None
                time.sleep(0.05)

    def log(self) -> str:
        return read_log(self.log_path)

    def relayed(self) -> list[str]:
        """The request lines it relayed ("CONNECT host:port HTTP/1.1", "GET http://…")."""
        return [line.split("): ", 1)[1] for line in self.log().splitlines()
                if "Request (file descriptor" in line]

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.workdir, ignore_errors=True)


class UpstreamProxyTests(ClassFixture, unittest.TestCase):
    weed: Optional[Seaweed] = None
    tiny: Optional[TinyProxy] = None

    @classmethod
    def setUpClass(cls):
        if TINYPROXY is None:
            raise unittest.SkipTest("tinyproxy is not installed (make test installs it)")
        cls.weed = Seaweed(tls=True)
        cls.weed.start()
        cls.tiny = TinyProxy().start()

    @classmethod
    def tearDownClass(cls):
        if cls.tiny is not None:
            cls.tiny.cleanup()
            cls.tiny = None
        super().tearDownClass()

    def dgproxy(self, endpoint: str, **env: str) -> ProxyProcess:
        p = ProxyProcess(env={**self.weed.backend_env(), "DGP_S3_ENDPOINT": endpoint,
                              "SSL_CERT_FILE": self.weed.ca_file, **env})
        p.env.pop("SSL_CERT_DIR", None)
        self.addCleanup(p.cleanup)
        return p

    def assertRoundTrips(self, p: ProxyProcess, bucket: str) -> None:
        p.start()
        s3 = p.client()
        s3.create_bucket(Bucket=bucket)
        cases = {"small.txt": b"through the proxy\n",
                 "large.dat": random_bytes(9 * 1024 * 1024 + 3, seed=11)}
        for key, data in cases.items():
            s3.put_object(Bucket=bucket, Key=key, Body=data)
        for key, data in cases.items():
            self.assertEqual(s3.get_object(Bucket=bucket, Key=key)["Body"].read(), data, key)
        listed = s3.list_objects_v2(Bucket=bucket)["Contents"]
        self.assertEqual(sorted(o["Key"] for o in listed), sorted(cases))

    def test_https_backend_through_a_connect_tunnel(self):
        before = len(self.tiny.relayed())
        p = self.dgproxy(self.weed.https_endpoint, HTTPS_PROXY=self.tiny.url())
        self.assertRoundTrips(p, "via-tunnel")
        host_port = self.weed.https_endpoint.split("://", 1)[1]
        relayed = self.tiny.relayed()[before:]
        self.assertTrue(relayed, self.tiny.log())
        self.assertTrue(all(r.startswith(f"CONNECT {host_port} HTTP/1.") for r in relayed),
                        relayed)
        log = p.log()
        self.assertIn(f"through proxy http://127.0.0.1:{self.tiny.port}", log)
        self.assertNotIn(PASSWORD, log)

    def test_http_backend_through_the_proxy_in_absolute_form(self):
        before = len(self.tiny.relayed())
        p = self.dgproxy(self.weed.endpoint, http_proxy=self.tiny.url())
        self.assertRoundTrips(p, "via-proxy")
        relayed = self.tiny.relayed()[before:]
        self.assertIn(f"PUT {self.weed.endpoint}/via-proxy/large.dat HTTP/1.1", relayed)
        self.assertIn(f"GET {self.weed.endpoint}/via-proxy/large.dat HTTP/1.1", relayed)

    def test_no_proxy_hosts_are_reached_directly(self):
        before = len(self.tiny.relayed())
        p = self.dgproxy(self.weed.https_endpoint, HTTPS_PROXY=self.tiny.url(),
                         HTTP_PROXY=self.tiny.url(), NO_PROXY="localhost,127.0.0.1")
        self.assertRoundTrips(p, "direct")
        self.assertEqual(self.tiny.relayed()[before:], [])
        self.assertNotIn("through proxy", p.log())

    def test_a_proxy_that_refuses_the_credentials_stops_start_up(self):
        for endpoint, var in ((self.weed.https_endpoint, "HTTPS_PROXY"),
                              (self.weed.endpoint, "HTTP_PROXY")):
            p = self.dgproxy(endpoint, **{var: self.tiny.url(password="wrong")})
            self.assertNotEqual(p.start_refused(), 0)
            self.assertIn("failed its start-up check", p.log(), var)
            # 407, or 401 as tinyproxy answers a CONNECT with the wrong password
            self.assertRegex(p.log(), r"40[17] (Proxy Authentication Required|Unauthorized)")

    def test_an_unusable_proxy_url_stops_start_up(self):
        p = self.dgproxy(self.weed.https_endpoint, HTTPS_PROXY="socks5://127.0.0.1:1080")
        self.assertNotEqual(p.start_refused(), 0)
        self.assertIn("S3 backend 'default': proxy 'socks5://127.0.0.1:1080': only http:// "
                      "proxies are supported", p.log())
