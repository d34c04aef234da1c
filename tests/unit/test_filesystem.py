"""The filesystem backend on real directories (SPEC §3, storage fact sheet §1.3, §9).

Layout ``{root}/{bucket}/deltaspaces/{stored key}``, metadata in the
``user.dg.metadata`` xattr written on the temp file before the rename, so a
reader sees data and metadata together or not at all; temp files are hidden
and swept at start-up; no key can reach outside its bucket.
"""

from __future__ import annotations

import json
import os
import shutil

from twisted.internet import defer
from twisted.trial import unittest

from tests.unit.helpers import inline, meta_for
from dgproxy.storage import filesystem
from dgproxy.storage.filesystem import FilesystemBackend
from dgproxy.storage.interface import (
    AlreadyExists, BucketMissing, BucketNotEmptyError, KeyConflict, StoredObject)
from dgproxy.storage.metadata import DELTA, XATTR_NAME, ObjectMetadata







class FilesystemTestCase(unittest.TestCase):
    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        self.backend = FilesystemBackend(self.root)
        self.assertEqual(self.backend.prepare(), 0)

    def objects_dir(self, bucket="b"):
        return os.path.join(self.root, bucket, "deltaspaces")

    def path(self, key, bucket="b"):
        return os.path.join(self.objects_dir(bucket), *key.split("/"))

    def plant(self, key, data=b"x", bucket="b", meta=True):
        """Create a file behind the backend's back (as a crash or another tool would)."""
        path = self.path(key, bucket)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        if meta:
            os.setxattr(path, XATTR_NAME, meta_for(key, data).to_json())
        return path

    async def put(self, key, data=b"hello", bucket="b", chunk=65536, **changes):
        writer = await self.backend.open_write(bucket, key)
        for i in range(0, len(data), chunk):
            await writer.write(data[i:i + chunk])
        meta = meta_for(key, data, **changes)
        await writer.commit(meta)
        return meta

    async def read(self, key, bucket="b", offset=0, length=None):
        source = await self.backend.open_read(bucket, key, offset, length)
        if source is None:
            return None
        out = []
        while True:
            data = await source.read(7000)
            if not data:
                return b"".join(out)
            out.append(data)

    async def keys(self, prefix="", delimiter=None, bucket="b"):
        objects, prefixes = await self.backend.list(bucket, prefix, delimiter)
        for o in objects:
            self.assertIsInstance(o, StoredObject)
        return [o.key for o in objects], prefixes

    def temp_files(self, bucket="b"):
        found = []
        for dirpath, _dirs, files in os.walk(os.path.join(self.root, bucket)):
            found.extend(os.path.join(dirpath, f) for f in files if f.startswith((".dgtmp.", ".tmp")))
        return found


class BucketTests(FilesystemTestCase):
    @inline
    async def test_create_list_and_exists(self):
        self.assertFalse(await self.backend.bucket_exists("b"))
        self.assertTrue(await self.backend.create_bucket("zeta"))
        self.assertTrue(await self.backend.create_bucket("alpha"))
        self.assertFalse(await self.backend.create_bucket("alpha"))
        self.assertTrue(os.path.isdir(os.path.join(self.root, "alpha", "deltaspaces")))
        buckets = await self.backend.list_buckets()
        self.assertEqual([b.name for b in buckets], ["alpha", "zeta"])
        self.assertIsNotNone(buckets[0].created.tzinfo)
        self.assertTrue(await self.backend.bucket_exists("alpha"))

    @inline
    async def test_hidden_directories_are_not_buckets(self):
        os.mkdir(os.path.join(self.root, ".hidden"))
        self.assertEqual(await self.backend.list_buckets(), [])

    @inline
    async def test_delete_empty_bucket(self):
        await self.backend.create_bucket("b")
        await self.backend.delete_bucket("b")
        self.assertFalse(os.path.exists(os.path.join(self.root, "b")))
        self.assertFalse(await self.backend.bucket_exists("b"))

    @inline
    async def test_delete_missing_bucket(self):
        with self.assertRaises(BucketMissing):
            await self.backend.delete_bucket("nope")

    @inline
    async def test_delete_bucket_with_objects_is_refused(self):
        await self.backend.create_bucket("b")
        await self.put("deep/dir/obj.txt", b"keep me")
        with self.assertRaises(BucketNotEmptyError):
            await self.backend.delete_bucket("b")
        self.assertEqual(await self.read("deep/dir/obj.txt"), b"keep me")

    @inline
    async def test_dot_file_objects_keep_the_bucket(self):
        await self.backend.create_bucket("b")
        await self.put(".env", b"SECRET=1")
        with self.assertRaises(BucketNotEmptyError):
            await self.backend.delete_bucket("b")

    @inline
    async def test_delete_bucket_ignores_hidden_residue(self):
        await self.backend.create_bucket("b")
        self.plant("reference.bin")
        self.plant("ds/reference.bin")
        self.plant("ds/.dgtmp.0123456789abcdef", meta=False)
        os.makedirs(self.path("empty/dirs"))
        await self.backend.delete_bucket("b")
        self.assertFalse(os.path.exists(os.path.join(self.root, "b")))

    @inline
    async def test_operations_on_a_missing_bucket(self):
        with self.assertRaises(BucketMissing):
            await self.backend.open_write("nope", "k")
        with self.assertRaises(BucketMissing):
            await self.backend.list("nope", "", None)
        self.assertIsNone(await self.backend.stat("nope", "k"))

    @inline
    async def test_bucket_names_cannot_escape_the_root(self):
        for name in ("", ".", "..", "a/b", "../x", "a\0b"):
            with self.assertRaises(BucketMissing, msg=repr(name)):
                await self.backend.create_bucket(name)
            with self.assertRaises(BucketMissing, msg=repr(name)):
                await self.backend.delete_bucket(name)
        self.assertEqual(os.listdir(self.root), [])
        self.assertEqual(os.listdir(os.path.dirname(self.root)), [os.path.basename(self.root)])


class WriteTests(FilesystemTestCase):
    def setUp(self):
        super().setUp()
        return self.backend.create_bucket("b")

    @inline
    async def test_commit_makes_data_and_xattr_visible_together(self):
        meta = await self.put("releases/v1/app.zip", b"payload", note=DELTA, ref_path="reference.bin",
                              ref_sha256="ab" * 32, delta_size=7, delta_cmd="xdelta3",
                              content_type="application/zip", user_metadata={"k": "v"})
        path = self.path("releases/v1/app.zip")
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"payload")
        raw = os.getxattr(path, XATTR_NAME)
        doc = json.loads(raw)
        self.assertEqual((doc["note"], doc["file_size"], doc["original_name"]),
                         ("delta", 7, "app.zip"))
        self.assertEqual(doc["user_metadata"], {"k": "v"})
        self.assertEqual(ObjectMetadata.from_json(raw), meta)
        # The xattr is the only one dgproxy writes.
        self.assertEqual([a for a in os.listxattr(path) if a.startswith("user.")], [XATTR_NAME])
        stored = await self.backend.stat("b", "releases/v1/app.zip")
        self.assertEqual((stored.key, stored.size, stored.metadata),
                         ("releases/v1/app.zip", 7, meta))
        self.assertEqual(self.temp_files(), [])

    @inline
    async def test_uncommitted_writer_is_invisible(self):
        writer = await self.backend.open_write("b", "dir/k")
        await writer.write(b"half")
        self.assertIsNone(await self.backend.stat("b", "dir/k"))
        self.assertFalse(os.path.exists(self.path("dir/k")))
        self.assertEqual(await self.keys(), ([], []))
        self.assertEqual(await self.keys("", "/"), ([], []))
        self.assertEqual(await self.keys("dir/", "/"), ([], []))
        self.assertIsNone(await self.read("dir/k"))
        # The temp file sits beside the target (same filesystem, atomic rename).
        temps = self.temp_files()
        self.assertEqual(len(temps), 1)
        self.assertEqual(os.path.dirname(temps[0]), os.path.dirname(self.path("dir/k")))
        await writer.commit(meta_for("dir/k", b"half"))
        self.assertEqual(await self.read("dir/k"), b"half")

    @inline
    async def test_abort_leaves_nothing(self):
        writer = await self.backend.open_write("b", "x/y")
        await writer.write(b"data" * 1000)
        writer.abort()
        self.assertFalse(os.path.exists(self.path("x/y")))
        self.assertEqual(self.temp_files(), [])
        self.assertIsNone(await self.backend.stat("b", "x/y"))
        writer.abort()  # twice is fine

    @inline
    async def test_abort_after_commit_keeps_the_object(self):
        writer = await self.backend.open_write("b", "k")
        await writer.write(b"v")
        await writer.commit(meta_for("k", b"v"))
        writer.abort()
        self.assertEqual(await self.read("k"), b"v")

    @inline
    async def test_large_write_in_many_chunks(self):
        data = os.urandom(3 * 1024 * 1024 + 17)
        await self.put("big.bin", data, chunk=65536 + 3)
        self.assertEqual(await self.read("big.bin"), data)
        self.assertEqual((await self.backend.stat("b", "big.bin")).size, len(data))
        self.assertEqual(self.temp_files(), [])

    @inline
    async def test_overwrite_replaces_data_and_metadata(self):
        await self.put("k", b"old", content_type="text/old")
        meta = await self.put("k", b"new!", content_type="text/new")
        self.assertEqual(await self.read("k"), b"new!")
        self.assertEqual((await self.backend.stat("b", "k")).metadata, meta)
        self.assertEqual(self.temp_files(), [])

    @inline
    async def test_exclusive_commit(self):
        writer = await self.backend.open_write("b", "ref")
        await writer.write(b"first")
        await writer.commit(meta_for("ref", b"first"), exclusive=True)
        writer = await self.backend.open_write("b", "ref")
        await writer.write(b"second")
        with self.assertRaises(AlreadyExists):
            await writer.commit(meta_for("ref", b"second"), exclusive=True)
        self.assertEqual(await self.read("ref"), b"first")
        self.assertEqual(self.temp_files(), [])

    @inline
    async def test_ranged_read(self):
        await self.put("k", b"0123456789")
        self.assertEqual(await self.read("k", offset=3, length=4), b"3456")
        self.assertEqual(await self.read("k", offset=8), b"89")

    @inline
    async def test_empty_object(self):
        await self.put("empty", b"")
        self.assertEqual(await self.read("empty"), b"")
        self.assertEqual((await self.backend.stat("b", "empty")).size, 0)

    @inline
    async def test_unicode_keys(self):
        await self.put("ключ/鍵 with space/émoji-\U0001F600.txt", b"u")
        self.assertEqual(await self.keys(),
                         (["ключ/鍵 with space/émoji-\U0001F600.txt"], []))


class StatTests(FilesystemTestCase):
    def setUp(self):
        super().setUp()
        return self.backend.create_bucket("b")

    @inline
    async def test_file_without_xattr_has_no_metadata(self):
        self.plant("unmanaged.txt", b"12345", meta=False)
        stored = await self.backend.stat("b", "unmanaged.txt")
        self.assertEqual((stored.size, stored.metadata), (5, None))
        self.assertIsNotNone(stored.modified.tzinfo)

    @inline
    async def test_file_with_unreadable_xattr_has_no_metadata(self):
        path = self.plant("garbled.txt", b"abc", meta=False)
        os.setxattr(path, XATTR_NAME, b"{not json")
        stored = await self.backend.stat("b", "garbled.txt")
        self.assertEqual((stored.size, stored.metadata), (3, None))

    @inline
    async def test_hostile_xattr_does_not_break_stat_or_list(self):
        # One damaged xattr (copied in, or written by a buggy tool) must not
        # make every GET and LIST of its directory fail.
        await self.put("good.txt", b"ok")
        path = self.plant("bad.txt", b"abc", meta=False)
        os.setxattr(path, XATTR_NAME, meta_for("bad.txt", b"abc").to_json().replace(
            b'"file_size":3', b'"file_size":1e999'))
        stored = await self.backend.stat("b", "bad.txt")
        self.assertIsNone(stored.metadata)
        self.assertEqual((await self.keys())[0], ["bad.txt", "good.txt"])


    @inline
    async def test_missing_and_directories_are_absent(self):
        await self.put("dir/k")
        self.assertIsNone(await self.backend.stat("b", "nope"))
        self.assertIsNone(await self.backend.stat("b", "dir"))
        self.assertIsNone(await self.backend.stat("b", "dir/k/deeper"))
        self.assertIsNone(await self.read("dir"))
        self.assertIsNone(await self.read("nope"))


class DeleteTests(FilesystemTestCase):
    def setUp(self):
        super().setUp()
        return self.backend.create_bucket("b")

    @inline
    async def test_delete_prunes_empty_parents_up_to_deltaspaces(self):
        await self.put("a/b/c/d.txt")
        self.assertTrue(await self.backend.delete("b", "a/b/c/d.txt"))
        self.assertFalse(os.path.exists(self.path("a")))
        self.assertTrue(os.path.isdir(self.objects_dir()))
        self.assertTrue(await self.backend.bucket_exists("b"))
        # Writing into the bucket still works afterwards.
        await self.put("a/again.txt")

    @inline
    async def test_delete_keeps_non_empty_parents(self):
        await self.put("a/b/one.txt")
        await self.put("a/two.txt")
        await self.backend.delete("b", "a/b/one.txt")
        self.assertFalse(os.path.exists(self.path("a/b")))
        self.assertEqual(await self.read("a/two.txt"), b"hello")

    @inline
    async def test_delete_missing(self):
        await self.put("dir/k")
        self.assertFalse(await self.backend.delete("b", "nope"))
        self.assertFalse(await self.backend.delete("b", "dir"))
        self.assertFalse(await self.backend.delete("b", "dir/k/x"))
        self.assertEqual(await self.read("dir/k"), b"hello")

    @inline
    async def test_delete_root_object(self):
        await self.put("top")
        self.assertTrue(await self.backend.delete("b", "top"))
        self.assertTrue(os.path.isdir(self.objects_dir()))


class ListTests(FilesystemTestCase):
    KEYS = ["a.txt", "dir/1.txt", "dir/sub/2.txt", "dir/sub/3.txt", "dirt.txt", "z/é.txt",
            "\U0001F600", "\uffff"]

    def setUp(self):
        super().setUp()
        return defer.ensureDeferred(self._setup())

    async def _setup(self):
        await self.backend.create_bucket("b")
        for key in self.KEYS:
            await self.put(key)

    @inline
    async def test_recursive_listing_in_utf8_order(self):
        keys, prefixes = await self.keys()
        self.assertEqual(keys, sorted(self.KEYS, key=lambda k: k.encode("utf-8")))
        self.assertEqual(prefixes, [])

    @inline
    async def test_recursive_listing_with_prefix(self):
        self.assertEqual(await self.keys("dir"),
                         (["dir/1.txt", "dir/sub/2.txt", "dir/sub/3.txt", "dirt.txt"], []))
        self.assertEqual(await self.keys("dir/sub/"), (["dir/sub/2.txt", "dir/sub/3.txt"], []))
        self.assertEqual(await self.keys("dir/sub/3"), (["dir/sub/3.txt"], []))
        self.assertEqual(await self.keys("nothing/here/"), ([], []))

    @inline
    async def test_delimited_listing(self):
        self.assertEqual(await self.keys("", "/"),
                         (["a.txt", "dirt.txt", "\uffff", "\U0001F600"], ["dir/", "z/"]))
        self.assertEqual(await self.keys("dir/", "/"), (["dir/1.txt"], ["dir/sub/"]))
        self.assertEqual(await self.keys("dir", "/"), (["dirt.txt"], ["dir/"]))
        self.assertEqual(await self.keys("dir/s", "/"), ([], ["dir/sub/"]))

    @inline
    async def test_listed_objects_carry_size_and_metadata(self):
        objects, _ = await self.backend.list("b", "dir/sub/", None)
        self.assertEqual([(o.size, o.metadata.original_name) for o in objects],
                         [(5, "2.txt"), (5, "3.txt")])

    @inline
    async def test_temp_files_are_never_listed(self):
        self.plant("dir/.dgtmp.0123456789abcdef", meta=False)
        self.plant(".dgtmp.fedcba9876543210", meta=False)
        os.makedirs(self.path("temponly"))
        self.plant("temponly/.dgtmp.00112233aabbccdd", meta=False)
        writer = await self.backend.open_write("b", "inflight/k")
        await writer.write(b"x")
        for prefix, delim in (("", None), ("", "/"), ("dir/", "/"), ("dir/", None)):
            keys, prefixes = await self.keys(prefix, delim)
            self.assertFalse([k for k in keys if ".dgtmp." in k], (prefix, delim))
            self.assertNotIn("temponly/", prefixes)
            self.assertNotIn("inflight/", prefixes)
        writer.abort()

    @inline
    async def test_reference_only_directory_is_not_a_prefix(self):
        self.plant("refonly/reference.bin")
        _, prefixes = await self.keys("", "/")
        self.assertNotIn("refonly/", prefixes)

    @inline
    async def test_internal_dg_directory_is_hidden(self):
        self.plant(".dg/uploads/u1/part-1", meta=False)
        keys, prefixes = await self.keys("", "/")
        self.assertNotIn(".dg/", prefixes)
        keys, _ = await self.keys()
        self.assertFalse([k for k in keys if k.startswith(".dg/")])

    @inline
    async def test_nested_dg_directory_is_user_data(self):
        # Only {bucket}/deltaspaces/.dg/ is internal (open multipart uploads);
        # check_key accepts "a/.dg/x", so it must show up in listings.
        await self.put("a/.dg/x")
        self.assertIn("a/.dg/x", (await self.keys())[0])
        self.assertIn("a/.dg/", (await self.keys("a/", "/"))[1])


    @inline
    async def test_dot_files_are_listed(self):
        # Unlike the Rust backend (fact sheet §1.3 quirk), a stored .env is visible.
        await self.put("conf/.env")
        self.assertEqual((await self.keys("conf/", "/"))[0], ["conf/.env"])

    @inline
    async def test_unsafe_prefixes_list_nothing(self):
        for prefix in ("../", "dir/../", "../../etc/"):
            self.assertEqual(await self.keys(prefix, "/"), ([], []))
            self.assertEqual(await self.keys(prefix), ([], []))


    def test_directory_pruned_during_a_delimited_listing(self):
        """A concurrent DELETE can remove a directory's last object (and the
        directory) between the listing's check and its scan: nothing is there."""
        gone = os.path.join(self.objects_dir(), "dir", "sub")
        real_scandir = os.scandir

        def scandir_after_prune(path):
            if path == gone:
                shutil.rmtree(gone)
            return real_scandir(path)

        self.patch(os, "scandir", scandir_after_prune)
        self.assertEqual(self.backend._list("b", "dir/sub/", "/"), ([], []))


    @inline
    async def test_paging_hints_stop_early_and_skip_what_came_before(self):
        """The listing reads metadata in key order, LIST_BATCH objects at a
        time, and stops once the caller's C{more} wants none; what it returns
        is then the start of the full listing. C{start_after} skips keys."""
        self.patch(filesystem, "LIST_BATCH", 2)
        full, _ = await self.keys()
        looked = []

        def more(objects, prefixes):
            looked.append(len(objects))
            return 4 - len(objects)

        objects, _ = await self.backend.list("b", "", None, more=more)
        got = [o.key for o in objects]
        self.assertEqual(got, full[:len(got)])
        self.assertEqual(len(got), 4)
        self.assertEqual(looked, [2, 4])
        objects, _ = await self.backend.list("b", "", None, start_after="dir/sub/2.txt")
        self.assertEqual([o.key for o in objects], full[full.index("dir/sub/2.txt") + 1:])
        objects, prefixes = await self.backend.list("b", "", "/", start_after="a.txt",
                                                    more=lambda o, p: 0)
        self.assertEqual(([o.key for o in objects], prefixes), (["dirt.txt"], ["dir/"]))


class TempNameCollisionTests(FilesystemTestCase):
    """User objects whose names merely start like a temp file."""

    def setUp(self):
        super().setUp()
        return self.backend.create_bucket("b")

    @inline
    async def test_object_named_like_a_temp_file_survives_restart(self):
        # check_key accepts ".tmp", ".tmprc" and ".dgtmp.notes"; once stored they
        # must be listed, kept by DeleteBucket and not swept at start-up.
        for key in ("cache/.tmp", "home/.tmprc", "notes/.dgtmp.notes"):
            await self.put(key, b"user data")
        keys, _ = await self.keys()
        self.assertEqual(keys, ["cache/.tmp", "home/.tmprc", "notes/.dgtmp.notes"])
        self.assertEqual(FilesystemBackend(self.root).prepare(), 0)
        for key in ("cache/.tmp", "home/.tmprc", "notes/.dgtmp.notes"):
            self.assertEqual(await self.read(key), b"user data", key)


    @inline
    async def test_delete_bucket_keeps_objects_named_like_temp_files(self):
        await self.put("home/.tmprc", b"user data")
        with self.assertRaises(BucketNotEmptyError):
            await self.backend.delete_bucket("b")



class KeySafetyTests(FilesystemTestCase):
    def setUp(self):
        super().setUp()
        self.outside = os.path.join(self.root, "b", "escaped")
        return self.backend.create_bucket("b")

    UNSAFE = ["../x", "a/../../x", "../../../../../../tmp/evil", "/abs", "/etc/passwd",
              "a/..", "", "x/", "a\0b"]
    # Accepted by check_key(ingest=False) so that old objects stay reachable,
    # but no file on this backend can have such a name.
    UNREPRESENTABLE = ["a//b", "./x", "a/./b"]

    @inline
    async def test_escaping_keys_are_refused_everywhere(self):
        for key in self.UNSAFE:
            with self.assertRaises(KeyConflict, msg=repr(key)):
                await self.backend.open_write("b", key)
            with self.assertRaises(KeyConflict, msg=repr(key)):
                await self.backend.stat("b", key)
            with self.assertRaises(KeyConflict, msg=repr(key)):
                await self.backend.delete("b", key)
            with self.assertRaises(KeyConflict, msg=repr(key)):
                await self.backend.open_read("b", key)
        # Nothing was created anywhere outside deltaspaces/.
        for dirpath, _dirs, files in os.walk(self.root):
            self.assertTrue(dirpath.startswith(self.objects_dir()) or not files, (dirpath, files))

    @inline
    async def test_unrepresentable_keys_cannot_be_written(self):
        for key in self.UNREPRESENTABLE:
            with self.assertRaises(KeyConflict, msg=repr(key)):
                await self.backend.open_write("b", key)

    @inline
    async def test_unrepresentable_keys_are_simply_absent(self):
        # GET/HEAD/DELETE of such a key must be 404 / 204, not a 500 from a
        # KeyConflict nobody above the backend catches on the read path.
        await self.put("a/b")
        await self.put("x")
        for key in self.UNREPRESENTABLE:
            self.assertIsNone(await self.backend.stat("b", key), key)
            self.assertIsNone(await self.backend.open_read("b", key), key)
            self.assertFalse(await self.backend.delete("b", key), key)
        self.assertEqual(await self.read("a/b"), b"hello")
        self.assertEqual(await self.read("x"), b"hello")


    @inline
    async def test_delete_cannot_reach_a_sibling_bucket(self):
        await self.backend.create_bucket("other")
        await self.put("secret", bucket="other")
        with self.assertRaises(KeyConflict):
            await self.backend.delete("b", "../../other/deltaspaces/secret")
        self.assertEqual(await self.read("secret", bucket="other"), b"hello")

    @inline
    async def test_parent_is_a_file(self):
        await self.put("a")
        with self.assertRaises(KeyConflict):
            await self.backend.open_write("b", "a/b")
        with self.assertRaises(KeyConflict):
            await self.backend.open_write("b", "a/b/c")
        self.assertEqual(await self.read("a"), b"hello")

    @inline
    async def test_key_that_is_a_prefix_of_objects(self):
        await self.put("d/inner")
        with self.assertRaises(KeyConflict):
            await self.backend.open_write("b", "d")
        self.assertEqual(await self.read("d/inner"), b"hello")


class PrepareTests(unittest.TestCase):
    def test_prepare_creates_root_and_leaves_no_probe(self):
        root = os.path.abspath(self.mktemp())
        self.assertEqual(FilesystemBackend(root).prepare(), 0)
        self.assertEqual(os.listdir(root), [])

    def test_prepare_sweeps_temp_files(self):
        root = os.path.abspath(self.mktemp())
        deep = os.path.join(root, "b", "deltaspaces", "x", "y")
        os.makedirs(deep)
        temps = [os.path.join(root, "b", "deltaspaces", ".dgtmp.0011223344556677"),
                 os.path.join(deep, ".dgtmp.8899aabbccddeeff"),
                 os.path.join(deep, ".tmpAbC123")]  # the Rust proxy's NamedTempFile
        keep = [os.path.join(deep, "object.bin"), os.path.join(deep, "reference.bin")]
        for p in temps + keep:
            with open(p, "wb") as f:
                f.write(b"x")
        self.assertEqual(FilesystemBackend(root).prepare(), 3)
        for p in temps:
            self.assertFalse(os.path.exists(p), p)
        for p in keep:
            self.assertTrue(os.path.exists(p), p)
        self.assertEqual(FilesystemBackend(root).prepare(), 0)

    def test_prepare_sweeps_an_interrupted_write(self):
        root = os.path.abspath(self.mktemp())
        backend = FilesystemBackend(root)
        backend.prepare()

        async def interrupted():
            await backend.create_bucket("b")
            writer = await backend.open_write("b", "k")
            await writer.write(b"partial")
            # The process "dies" here: no commit, no abort.
            self.assertEqual(FilesystemBackend(root).prepare(), 1)
            self.assertIsNone(await backend.stat("b", "k"))
            self.assertEqual(await backend.list("b", "", None), ([], []))
            writer.abort()
        return defer.ensureDeferred(interrupted())
