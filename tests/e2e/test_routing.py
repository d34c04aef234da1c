"""End-to-end: two backends behind one dgproxy (SPEC §1, §3; anchor-config §1.4).

A filesystem backend (`local`, the default) and a SeaweedFS one (`weed`); the
virtual bucket `remote` is routed to `weed` under the real name `real-remote`.
Objects land where the routing says, ListBuckets shows virtual names, and
start-up refuses a route to an undefined backend and an S3 backend that is not
there.
"""

from __future__ import annotations

import os
from typing import Optional

from twisted.trial import unittest

from tests.e2e.harness import ProxyProcess, free_port
from tests.e2e.seaweed import WEED_ACCESS_KEY, WEED_SECRET_KEY
from tests.e2e.test_s3_backend import (
    ClassFixture, WeedServer, etag, list_all, random_bytes, s3_error, stored_meta,
    stored_objects, tar_versions)


def routing_yaml(fs_path: str, endpoint: str, extra_buckets: str = "") -> str:
    return f"""\
storage:
  backends:
    - name: local
      type: filesystem
      path: {fs_path}
    - name: weed
      type: s3
      endpoint: {endpoint}
      access_key_id: {WEED_ACCESS_KEY}
      secret_access_key: {WEED_SECRET_KEY}
  default_backend: local
  buckets:
    remote:
      backend: weed
      alias: real-remote
{extra_buckets}"""


def files_under(root: str) -> dict[str, int]:
    """Relative path -> size of every file under C{root}."""
    out = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, root)] = os.path.getsize(full)
    return out


class RoutingTests(ClassFixture, unittest.TestCase):
    weed: Optional[WeedServer] = None
    proxy: Optional[ProxyProcess] = None

    @classmethod
    def setUpClass(cls):
        cls.weed = WeedServer()  # assigned before start: tearDownClass stops it
        cls.weed.start()
        cls.w = cls.weed.client()
        cls.w.create_bucket(Bucket="not-routed")  # on weed, but no route names it
        cls.proxy = ProxyProcess()
        cls.fs_root = os.path.join(cls.proxy.workdir, "fsdata")
        cls.proxy.config_path = os.path.join(cls.proxy.workdir, "dgproxy.yaml")
        with open(cls.proxy.config_path, "w") as f:
            f.write(routing_yaml(cls.fs_root, cls.weed.endpoint))
        cls.proxy.start()
        cls.s3 = cls.proxy.client()
        cls.s3.create_bucket(Bucket="remote")
        cls.s3.create_bucket(Bucket="localbkt")


    def test_startup_log_names_the_routes(self):
        log = self.proxy.log()
        self.assertIn("Backend 'local'", log)
        self.assertIn("Backend 'weed'", log)
        self.assertIn("'remote'", log)
        self.assertIn("real-remote", log)

    def test_create_bucket_uses_the_real_name(self):
        names = [b["Name"] for b in self.w.list_buckets()["Buckets"]]
        self.assertIn("real-remote", names)
        self.assertNotIn("remote", names)
        self.assertNotIn("localbkt", names)
        self.assertTrue(os.path.isdir(os.path.join(self.fs_root, "localbkt")))
        self.assertFalse(os.path.exists(os.path.join(self.fs_root, "remote")))
        self.assertFalse(os.path.exists(os.path.join(self.fs_root, "real-remote")))

    def test_objects_land_on_their_backend(self):
        tars = tar_versions(3, seed=21)
        plain = random_bytes(300_000, seed=22)
        for bucket in ("remote", "localbkt"):
            for i, data in enumerate(tars, 1):
                self.s3.put_object(Bucket=bucket, Key=f"obj/rel/app-{i}.tar", Body=data)
            self.s3.put_object(Bucket=bucket, Key="obj/plain.dat", Body=plain,
                               Metadata={"where": bucket})

        # remote -> SeaweedFS bucket real-remote, in the shared layout.
        stored = stored_objects(self.w, "real-remote", "obj/")
        self.assertEqual(set(stored), {"obj/plain.dat", "obj/rel/reference.bin",
                                       "obj/rel/app-1.tar.delta", "obj/rel/app-2.tar.delta",
                                       "obj/rel/app-3.tar.delta"})
        self.assertEqual(stored["obj/plain.dat"], len(plain))
        self.assertEqual(stored_meta(self.w, "real-remote", "obj/plain.dat").get("user-where"),
                         "remote")
        self.assertFalse(os.path.exists(os.path.join(self.fs_root, "remote")))
        self.assertFalse(os.path.exists(os.path.join(self.fs_root, "real-remote")))

        # localbkt -> the filesystem backend's directory, nothing in SeaweedFS.
        on_disk = files_under(os.path.join(self.fs_root, "localbkt", "deltaspaces", "obj"))
        self.assertEqual(on_disk.get("plain.dat"), len(plain))
        self.assertIn(os.path.join("rel", "reference.bin"), on_disk)
        self.assertIn(os.path.join("rel", "app-3.tar.delta"), on_disk)
        for name in [b["Name"] for b in self.w.list_buckets()["Buckets"]]:
            if name != "real-remote":
                self.assertEqual(stored_objects(self.w, name, "obj/"), {}, name)

        # Both read back the same through their virtual names.
        for bucket in ("remote", "localbkt"):
            for i, data in enumerate(tars, 1):
                got = self.s3.get_object(Bucket=bucket, Key=f"obj/rel/app-{i}.tar")
                self.assertEqual(got["Body"].read(), data, (bucket, i))
                self.assertEqual(got["ETag"], etag(data))
            got = self.s3.get_object(Bucket=bucket, Key="obj/plain.dat")
            self.assertEqual(got["Body"].read(), plain)
            self.assertEqual(got["Metadata"], {"where": bucket})
            listed = {o["Key"]: o["Size"] for o in list_all(self.s3, bucket, Prefix="obj/")}
            self.assertEqual(listed, {"obj/plain.dat": len(plain),
                                      **{f"obj/rel/app-{i}.tar": len(t)
                                         for i, t in enumerate(tars, 1)}})

    def test_list_buckets_shows_virtual_names(self):
        names = [b["Name"] for b in self.s3.list_buckets()["Buckets"]]
        self.assertIn("remote", names)
        self.assertIn("localbkt", names)
        self.assertNotIn("real-remote", names)
        self.assertNotIn("not-routed", names)  # a weed bucket no route names
        self.s3.head_bucket(Bucket="remote")
        self.assertEqual(s3_error(self.s3.head_bucket, Bucket="real-remote")[0], 404)

    def test_copy_between_backends(self):
        data = tar_versions(1, seed=23)[0]
        self.s3.put_object(Bucket="localbkt", Key="cross/app.tar", Body=data)
        self.s3.copy_object(Bucket="remote", Key="cross/app.tar",
                            CopySource={"Bucket": "localbkt", "Key": "cross/app.tar"})
        self.assertEqual(self.s3.get_object(Bucket="remote", Key="cross/app.tar")["Body"].read(),
                         data)
        self.assertIn("cross/reference.bin", stored_objects(self.w, "real-remote", "cross/"))
        self.s3.delete_object(Bucket="remote", Key="cross/app.tar")
        self.assertEqual(stored_objects(self.w, "real-remote", "cross/"), {})
        self.assertEqual(self.s3.get_object(Bucket="localbkt", Key="cross/app.tar")["Body"].read(),
                         data)


class StartupErrorTests(unittest.TestCase):
    """No SeaweedFS needed: both failures happen before anything is served."""

    def start_failing(self, yaml_text: str) -> tuple[int, str]:
        proxy = ProxyProcess(config_yaml=yaml_text)
        self.addCleanup(proxy.cleanup)
        return proxy.start_refused(), proxy.log()

    def test_route_to_unknown_backend(self):
        root = self.mktemp()
        yaml_text = routing_yaml(root, f"http://127.0.0.1:{free_port()}", """\
    orphan:
      backend: nowhere
""")
        code, log = self.start_failing(yaml_text)
        self.assertNotEqual(code, 0, log)
        self.assertIn("orphan", log)
        self.assertIn("nowhere", log)
        self.assertNotIn("Traceback", log)

    def test_s3_backend_not_running(self):
        root = self.mktemp()
        port = free_port()  # nothing listens there
        code, log = self.start_failing(routing_yaml(root, f"http://127.0.0.1:{port}"))
        self.assertNotEqual(code, 0, log)
        self.assertIn("'weed'", log)
        self.assertIn(str(port), log)
        self.assertNotIn("Traceback", log)
