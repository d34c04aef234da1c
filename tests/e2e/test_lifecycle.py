"""Start-up and shutdown of a real C{twistd -n dgproxy} process (SPEC §1, §3).

Refusing to start (no credentials, a bad config file, a data directory
without xattrs) must be quick, non-zero and say why in words an operator
can act on; start-up sweeps stale temp files; SIGTERM drains in-flight
requests and exits 0; C{dgproxy config lint} reports by exit code.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from twisted.trial import unittest

from tests.e2e.harness import VENV_BIN, ProxyProcess
from tests.e2e.test_hostile import (
    MiB, UNSIGNED, RawReader, connect, request, send_head, signed_headers, wait_until)

DGPROXY = os.path.join(VENV_BIN, "dgproxy")


def _no_auth_env(proxy: ProxyProcess) -> None:
    for name in ("DGP_ACCESS_KEY_ID", "DGP_SECRET_ACCESS_KEY", "DGP_AUTHENTICATION"):
        proxy.env.pop(name, None)


def _exit_of(proxy: ProxyProcess, timeout: float = 15.0) -> tuple[int, float]:
    """Start C{proxy} expecting it to refuse; (exit code, seconds it took)."""
    started = time.monotonic()
    proxy.start(wait=False)
    try:
        code = proxy.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"dgproxy did not exit within {timeout}s:\n{proxy.log()}") from None
    return code, time.monotonic() - started


def _refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


def _per_test_spool(proxy: ProxyProcess) -> str:
    spool = os.path.join(proxy.workdir, "spool")
    os.makedirs(spool, exist_ok=True)
    proxy.env["DGP_SPOOL_DIR"] = spool
    return spool


class RefuseToStartTests(unittest.TestCase):

    def proxy(self, **kw) -> ProxyProcess:
        p = ProxyProcess(**kw)
        self.addCleanup(p.cleanup)
        return p

    def test_no_credentials(self):
        p = self.proxy()
        _no_auth_env(p)
        code, took = _exit_of(p)
        log = p.log()
        self.assertNotEqual(code, 0, log)
        self.assertLess(took, 10, "refusing to start should be quick")
        lines = [line for line in log.splitlines() if "DGP_ACCESS_KEY_ID" in line]
        self.assertEqual(len(lines), 1, log)
        self.assertIn("DGP_AUTHENTICATION=none", lines[0])
        self.assertNotIn("Traceback", log)

    def test_open_access_needs_no_credentials(self):
        p = self.proxy(open_access=True)
        self.assertNotIn("DGP_ACCESS_KEY_ID", p.env)
        p.start()
        self.assertIsNone(p.proc.poll())
        self.assertEqual(request(p, "PUT", "/open-bucket").status, 200)

    def test_invalid_config(self):
        cases = [
            ("storage:\n  bogus: 1\n", "storage.bogus"),
            ("access:\n  iam_mode: gui\n  access_key_idd: x\n", "access.access_key_idd"),
            ("advanced:\n  cache_size_mb: lots\n", "advanced.cache_size_mb"),
            ("nonsense_section: {}\n", "nonsense_section"),
        ]
        for text, key in cases:
            p = self.proxy(config_yaml=text)
            code, took = _exit_of(p)
            log = p.log()
            self.assertNotEqual(code, 0, log)
            self.assertLess(took, 10)
            self.assertIn(p.config_path, log)
            self.assertIn(key, log)
            self.assertNotIn("Traceback", log)

    def test_unparseable_config(self):
        p = self.proxy(config_yaml="storage: [unclosed\n  x: :\n")
        code, _took = _exit_of(p)
        log = p.log()
        self.assertNotEqual(code, 0, log)
        self.assertIn(p.config_path, log)
        self.assertNotIn("Traceback", log)

    def test_config_from_environment_variable(self):
        """C{$DGP_CONFIG} is read when no C{--config} is given."""
        p = self.proxy()
        path = os.path.join(p.workdir, "elsewhere.yaml")
        with open(path, "w") as f:
            f.write("storage:\n  bogus_via_env: 1\n")
        p.env["DGP_CONFIG"] = path
        code, _took = _exit_of(p)
        self.assertNotEqual(code, 0)
        self.assertIn("storage.bogus_via_env", p.log())
        self.assertIn(path, p.log())


class XattrTests(unittest.TestCase):
    """A data directory whose filesystem cannot hold user xattrs."""

    def mount_without_xattrs(self) -> str:
        if os.geteuid() != 0:
            raise unittest.SkipTest("mounting a filesystem without user xattrs needs root")
        base = tempfile.mkdtemp(prefix="dgp-noxattr-")
        self.addCleanup(shutil.rmtree, base, True)
        mnt = os.path.join(base, "mnt")
        os.mkdir(mnt)
        attempts = []
        mkfs = shutil.which("mkfs.vfat") or shutil.which("mkfs.fat")
        if mkfs:
            image = os.path.join(base, "fat.img")
            with open(image, "wb") as f:
                f.truncate(16 * MiB)
            attempts.append(("vfat", [[mkfs, image], ["mount", "-o", "loop", "-t", "vfat", image, mnt]]))
        attempts.append(("ramfs", [["mount", "-t", "ramfs", "ramfs", mnt]]))
        tried = []
        for fs, commands in attempts:
            ok = all(subprocess.run(c, capture_output=True).returncode == 0 for c in commands)
            if not ok:
                tried.append(f"{fs}: mount failed")
                continue
            self.addCleanup(subprocess.run, ["umount", "-l", mnt], capture_output=True)
            probe = os.path.join(mnt, "probe")
            open(probe, "wb").close()
            try:
                os.setxattr(probe, "user.dg.test", b"1")
            except OSError as e:
                if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
                    os.unlink(probe)
                    return mnt
                raise
            tried.append(f"{fs}: supports user xattrs here")
            subprocess.run(["umount", "-l", mnt], capture_output=True)
        raise unittest.SkipTest("no filesystem without user xattrs could be mounted ("
                                + "; ".join(tried) + ")")

    def test_data_dir_without_xattrs(self):
        mnt = self.mount_without_xattrs()
        data = os.path.join(mnt, "data")
        p = ProxyProcess(data_dir=data)
        self.addCleanup(p.cleanup)
        code, took = _exit_of(p)
        log = p.log()
        self.assertNotEqual(code, 0, log)
        self.assertLess(took, 10)
        self.assertIn("Data directory does not support extended attributes.", log)
        self.assertIn(data, log)
        self.assertNotIn("Traceback", log)
        # The probe file is gone: the refusal leaves the directory as it found it.
        self.assertEqual([f for f in os.listdir(data) if not f.startswith("lost+found")], [])


class StartupSweepTests(unittest.TestCase):

    def setUp(self):
        self.base = tempfile.mkdtemp(prefix="dgp-sweep-")
        self.addCleanup(shutil.rmtree, self.base, True)
        self.data = os.path.join(self.base, "data")

    def run_proxy(self) -> ProxyProcess:
        p = ProxyProcess(data_dir=self.data)
        self.addCleanup(p.cleanup)
        return p.start()

    def test_stale_temp_files_are_swept(self):
        p = self.run_proxy()
        self.assertEqual(request(p, "PUT", "/bkt").status, 200)
        self.assertEqual(request(p, "PUT", "/bkt/keep/obj.txt", b"kept").status, 200)
        self.assertEqual(p.stop(signal.SIGKILL), -signal.SIGKILL)

        objects = os.path.join(self.data, "bkt", "deltaspaces")
        stale = [
            os.path.join(objects, "keep", ".dgtmp.0123456789abcdef"),
            os.path.join(objects, ".dgtmp.fedcba9876543210"),
            os.path.join(objects, "deep", "er", ".dgtmp.00ff00ff00ff00ff"),
            os.path.join(objects, "keep", ".tmpAbC123"),  # the Rust proxy's NamedTempFile
        ]
        for path in stale:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(b"partial write from a crash")

        p = self.run_proxy()
        for path in stale:
            self.assertFalse(os.path.exists(path), path)
        self.assertEqual(request(p, "GET", "/bkt/keep/obj.txt").body, b"kept")
        listing = request(p, "GET", "/bkt?list-type=2").body
        self.assertIn(b"<Key>keep/obj.txt</Key>", listing)
        self.assertNotIn(b"dgtmp", listing)
        self.assertNotIn(b"<Prefix>deep/", listing)

    def test_user_dotfiles_survive_a_restart(self):
        """A client key whose file name looks like a temp file (C{.tmprc},
        C{.dgtmp.notes}) is either refused at PUT or kept: the start-up sweep
        must not delete an object the client was told was stored."""
        p = self.run_proxy()
        self.assertEqual(request(p, "PUT", "/bkt").status, 200)
        stored = []
        for key in ("cfg/.tmprc", ".tmp-notes", "d/.dgtmp.notes", "x/.tmpAbC123",
                    "y/.dgtmp.0123456789abcdef"):
            r = request(p, "PUT", f"/bkt/{key}", b"user data " + key.encode())
            self.assertIn(r.status, (200, 400), r)
            if r.status == 200:
                stored.append(key)
        p.stop()
        p = self.run_proxy()
        for key in stored:
            r = request(p, "GET", f"/bkt/{key}")
            self.assertEqual((key, r.status, r.body), (key, 200, b"user data " + key.encode()))


class ShutdownTests(unittest.TestCase):

    def start(self, drain_secs: int) -> tuple[ProxyProcess, str]:
        p = ProxyProcess(env={"DGP_DRAIN_TIMEOUT_SECS": str(drain_secs)})
        self.addCleanup(p.cleanup)
        spool = _per_test_spool(p)
        p.start()
        self.assertEqual(request(p, "PUT", "/bkt").status, 200)
        return p, spool

    def begin_upload(self, p: ProxyProcess, key: str, total: int, first: bytes) -> socket.socket:
        path = f"/bkt/{key}"
        headers = signed_headers(p, "PUT", path, payload_hash=UNSIGNED)
        headers["Content-Length"] = str(total)
        sock = connect(p, timeout=20)
        self.addCleanup(sock.close)
        send_head(sock, "PUT", path, headers)
        sock.sendall(first)
        time.sleep(0.3)  # dispatched and streaming into the store
        return sock

    def drain_upload(self, key: str):
        """SIGTERM in the middle of an upload, then the client finishes it;
        returns (proxy, data, the reply the client got or None)."""
        p, _spool = self.start(drain_secs=20)
        data = os.urandom(4 * MiB)
        sock = self.begin_upload(p, key, len(data), data[:MiB])
        p.proc.send_signal(signal.SIGTERM)
        self.assertTrue(wait_until(lambda: _refuses_connections(p.port), 3),
                        "still accepting connections after SIGTERM")
        self.assertIsNone(p.proc.poll(), "exited without draining the in-flight upload")
        sock.sendall(data[MiB:])
        reply = RawReader(sock).response("PUT")
        try:
            p.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.fail("dgproxy did not exit after draining:\n" + p.log())
        return p, data, reply

    def test_sigterm_stops_listening_and_finishes_inflight_upload(self):
        p, data, _reply = self.drain_upload("slow.dat")
        self.assertEqual(p.temp_files(), [])
        # The upload was stored whole: a new process on the same data serves it.
        again = ProxyProcess(data_dir=p.data_dir)
        self.addCleanup(again.cleanup)
        again.start()
        got = request(again, "GET", "/bkt/slow.dat")
        self.assertEqual(got.status, 200, got)
        self.assertEqual(got.body, data)

    def test_sigterm_inflight_client_gets_its_response(self):
        p, _data, reply = self.drain_upload("answered.dat")
        self.assertIsNotNone(reply, "connection closed before the response:\n" + p.log()[-1500:])
        self.assertEqual(reply.status, 200, reply)


    def test_drain_timeout_cuts_stalled_upload(self):
        p, spool = self.start(drain_secs=2)
        sock = self.begin_upload(p, "stalled.dat", 4 * MiB, os.urandom(MiB))
        started = time.monotonic()
        p.proc.send_signal(signal.SIGTERM)
        try:
            p.proc.wait(12)
        except subprocess.TimeoutExpired:
            self.fail("dgproxy ignored DGP_DRAIN_TIMEOUT_SECS:\n" + p.log())
        took = time.monotonic() - started
        self.assertGreater(took, 1.5, "exited without waiting for the in-flight request")
        self.assertLess(took, 10)
        sock.settimeout(5)
        try:
            rest = sock.recv(65536)
        except ConnectionResetError:
            rest = b""
        self.assertFalse(rest.startswith(b"HTTP/1.1 200"), rest)
        self.assertFalse(os.path.exists(os.path.join(p.data_dir, "bkt", "deltaspaces",
                                                     "stalled.dat")))
        self.assertEqual(p.temp_files(), [])
        self.assertEqual(os.listdir(spool), [])

    def test_sigterm_exits_zero(self):
        p, _spool = self.start(drain_secs=10)
        self.assertEqual(p.stop(), 0, "idle SIGTERM:\n" + p.log()[-2000:])

        p, _spool = self.start(drain_secs=10)
        data = os.urandom(2 * MiB)
        sock = self.begin_upload(p, "drained.dat", len(data), data[:MiB])
        p.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        sock.sendall(data[MiB:])
        self.assertEqual(p.proc.wait(15), 0, "SIGTERM after a drain:\n" + p.log()[-2000:])



class ConfigLintTests(unittest.TestCase):

    def lint(self, path: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DGP_", "AWS_"))}
        return subprocess.run([DGPROXY, "config", "lint", path], capture_output=True, text=True,
                              env=env, timeout=30)

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="dgp-lint-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def write(self, name: str, text: str) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_good_file(self):
        path = self.write("good.yaml", (
            "access:\n  iam_mode: declarative\n"
            "storage:\n  filesystem: /var/lib/dgproxy\n"
            "  buckets:\n    releases:\n      compression: true\n      max_delta_ratio: 0.5\n"
            "      public_prefixes: [pub/]\n"
            "advanced:\n  cache_size_mb: 2048\n  listen_addr: 0.0.0.0:9000\n"))
        r = self.lint(path)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout, f"{path}: ok\n")

    def test_empty_file_is_ok(self):
        path = self.write("empty.yaml", "")
        r = self.lint(path)
        self.assertEqual((r.returncode, r.stdout), (0, f"{path}: ok\n"), r.stderr)

    def test_bad_file(self):
        for text, key in (("storage:\n  bogus: 1\n", "storage.bogus"),
                          ("advanced:\n  max_delta_ratio: 7\n", "max_delta_ratio"),
                          ("storage:\n  buckets:\n    Bad_Name: {}\n", "storage.buckets.Bad_Name")):
            path = self.write("bad.yaml", text)
            r = self.lint(path)
            self.assertEqual(r.returncode, 4, (text, r.stdout, r.stderr))
            self.assertIn(key, r.stderr + r.stdout)
            self.assertIn(path, r.stderr + r.stdout)
            self.assertNotIn("Traceback", r.stderr)

    def test_unparseable_file(self):
        path = self.write("broken.yaml", "storage: [unclosed\n")
        r = self.lint(path)
        self.assertEqual(r.returncode, 4, r.stderr)
        self.assertIn(path, r.stderr + r.stdout)
        self.assertNotIn("Traceback", r.stderr)

    def test_missing_file(self):
        path = os.path.join(self.dir, "nope.yaml")
        r = self.lint(path)
        self.assertEqual(r.returncode, 3, r.stderr)
        self.assertIn(path, r.stderr + r.stdout)
