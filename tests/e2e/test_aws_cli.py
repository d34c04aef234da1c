"""End-to-end: a real dgproxy process driven by the aws CLI (v1, botocore).

What a user types, what they get back: `aws s3` high-level commands and the
`aws s3api` calls people script with. Files stay under the CLI's 8 MB
multipart threshold (multipart uploads have their own suites). Objects the
test only needs to exist are made with boto3, which is faster than the CLI.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

from botocore.exceptions import ClientError
from twisted.trial import unittest

from tests.e2e.harness import LiveProxyCase, SharedProxy, md5_etag

shared_proxy = SharedProxy().get


def write(path: str, data: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def tree(root: str) -> dict[str, bytes]:
    """Relative path ('/'-separated) -> contents of every file under C{root}."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, root).replace(os.sep, "/")] = read(full)
    return out


class AwsCliTests(LiveProxyCase, unittest.TestCase):

    def setUp(self):
        self.proxy = shared_proxy()
        self.s3 = self.proxy.client()
        self.tmp = os.path.abspath(self.mktemp())
        os.makedirs(self.tmp)


    # helpers -------------------------------------------------------------------

    def aws(self, *args: str) -> str:
        """Run the CLI, require success, return its stdout."""
        return self.proxy.aws(*args).stdout.decode("utf-8")

    def aws_json(self, *args: str):
        return json.loads(self.aws(*args, "--output", "json"))

    def aws_fails(self, *args: str, expect: tuple[str, ...]) -> str:
        """Run the CLI, require failure, check stderr names one of C{expect}."""
        proc = self.proxy.aws(*args, check=False)
        err = proc.stderr.decode("utf-8", "replace")
        self.assertNotEqual(proc.returncode, 0, f"aws {' '.join(args)} succeeded:\n"
                            f"{proc.stdout.decode()}")
        self.assertTrue(any(e in err for e in expect), f"none of {expect} in:\n{err}")
        return err

    @staticmethod
    def parallel(*thunks):
        """Run independent CLI invocations at once (each is a Python start-up)."""
        with ThreadPoolExecutor(len(thunks)) as pool:
            futures = [pool.submit(t) for t in thunks]
            return [f.result() for f in futures]

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        out = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                       Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return out

    def body(self, bucket: str, key: str) -> bytes:
        return self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()

    # aws s3 ----------------------------------------------------------------------
    def test_mb_rb(self):
        bucket = self.new_bucket(create=False)
        out = self.aws("s3", "mb", f"s3://{bucket}")
        self.assertIn(f"make_bucket: {bucket}", out)
        self.assertEqual(self.s3.head_bucket(Bucket=bucket)["ResponseMetadata"]
                         ["HTTPStatusCode"], 200)
        self.s3.put_object(Bucket=bucket, Key="dir/f.txt", Body=b"x")
        self.s3.put_object(Bucket=bucket, Key="g.txt", Body=b"y")
        listing, _, _ = self.parallel(
            lambda: self.aws("s3", "ls").splitlines(),
            lambda: self.aws_fails("s3", "mb", f"s3://{bucket}",
                                   expect=("BucketAlreadyOwnedByYou",)),
            lambda: self.aws_fails("s3", "rb", f"s3://{bucket}", expect=("BucketNotEmpty",)))
        self.assertTrue(any(line.split()[-1] == bucket for line in listing), listing)
        self.assertEqual(self.keys(bucket), ["dir/f.txt", "g.txt"])

        out = self.aws("s3", "rb", "--force", f"s3://{bucket}")
        self.assertIn(f"delete: s3://{bucket}/dir/f.txt", out)
        self.assertIn(f"delete: s3://{bucket}/g.txt", out)
        self.assertIn(f"remove_bucket: {bucket}", out)
        e = self.assertRaises(ClientError, self.s3.head_bucket, Bucket=bucket)
        self.assertEqual(e.response["ResponseMetadata"]["HTTPStatusCode"], 404)
        self.assertNotIn(bucket, [b["Name"] for b in self.s3.list_buckets()["Buckets"]])

    FILES = {
        "data.bin": os.urandom(1536 * 1024 + 3),
        "empty.txt": b"",
        "name with space ü+%.txt": "naïve ✓\n".encode(),
        "sub/deeper.txt": b"deeper\n",
    }

    def upload_files(self, bucket: str) -> None:
        """`aws s3 cp` of one file, then `aws s3 cp --recursive` of a directory."""
        up = os.path.join(self.tmp, "up")
        for name, data in self.FILES.items():
            write(os.path.join(up, name), data)
        single = self.aws("s3", "cp", os.path.join(up, "data.bin"),
                          f"s3://{bucket}/dir/data.bin")
        self.assertIn("upload: ", single)
        self.assertIn(f"s3://{bucket}/dir/data.bin", single)
        os.unlink(os.path.join(up, "data.bin"))
        many = self.aws("s3", "cp", "--recursive", up, f"s3://{bucket}/dir/")
        self.assertEqual(len([l for l in many.splitlines() if l.startswith("upload:")]),
                         len(self.FILES) - 1, many)

    def test_cp_up(self):
        bucket = self.new_bucket()
        self.upload_files(bucket)
        self.assertEqual(sorted(self.keys(bucket)), sorted(f"dir/{n}" for n in self.FILES))
        for name, data in self.FILES.items():
            got = self.s3.get_object(Bucket=bucket, Key=f"dir/{name}")
            self.assertEqual(got["Body"].read(), data, name)
            self.assertEqual(got["ETag"], md5_etag(data), name)
        # The CLI guesses Content-Type from the extension.
        self.assertEqual(self.s3.head_object(Bucket=bucket, Key="dir/empty.txt")["ContentType"],
                         "text/plain")

    def test_cp_recursive_down_and_copy(self):
        bucket = self.new_bucket()
        for name, data in self.FILES.items():
            self.s3.put_object(Bucket=bucket, Key=f"dir/{name}", Body=data)
        down = os.path.join(self.tmp, "down")
        out, _ = self.parallel(
            lambda: self.aws("s3", "cp", "--recursive", f"s3://{bucket}/dir/", down),
            lambda: self.aws("s3", "cp", "--recursive", f"s3://{bucket}/dir/",
                             f"s3://{bucket}/copy/"))
        self.assertIn("download: ", out)
        self.assertEqual(tree(down), self.FILES)
        for name, data in self.FILES.items():
            self.assertEqual(self.body(bucket, f"copy/{name}"), data, name)

    def test_cp_down(self):
        bucket = self.new_bucket()
        for name, data in self.FILES.items():
            self.s3.put_object(Bucket=bucket, Key=f"dir/{name}", Body=data)
        dst = os.path.join(self.tmp, "down", "data.bin")
        out = self.aws("s3", "cp", f"s3://{bucket}/dir/data.bin", dst)
        self.assertIn("download: ", out)
        self.assertEqual(read(dst), self.FILES["data.bin"])
        name = "name with space ü+%.txt"
        to_stdout, copied, _ = self.parallel(
            lambda: self.proxy.aws("s3", "cp", f"s3://{bucket}/dir/{name}", "-").stdout,
            lambda: self.aws("s3", "cp", f"s3://{bucket}/dir/data.bin",
                             f"s3://{bucket}/copy/data.bin"),
            lambda: self.aws_fails("s3", "cp", f"s3://{bucket}/nope.bin",
                                   os.path.join(self.tmp, "x"),
                                   expect=("404", "Not Found", "NoSuchKey")))
        self.assertEqual(to_stdout, self.FILES[name])
        self.assertIn("copy: ", copied)
        self.assertEqual(self.body(bucket, "copy/data.bin"), self.FILES["data.bin"])
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "x")))

    def test_ls(self):
        bucket = self.new_bucket()
        objects = {"a.txt": b"12345", "dir/b.txt": b"123", "dir/sub/c.txt": b"1",
                   "sp ace/d.txt": b"1234567"}
        for key, data in objects.items():
            self.s3.put_object(Bucket=bucket, Key=key, Body=data)

        lines = self.aws("s3", "ls", f"s3://{bucket}/").splitlines()
        pre = sorted(line.split("PRE", 1)[1].strip() for line in lines if " PRE " in line)
        self.assertEqual(pre, ["dir/", "sp ace/"])
        files = [line.split(None, 3) for line in lines if " PRE " not in line]
        self.assertEqual([(f[2], f[3]) for f in files], [("5", "a.txt")])

        lines = self.aws("s3", "ls", f"s3://{bucket}/dir/").splitlines()
        self.assertTrue(any(line.strip() == "PRE sub/" for line in lines), lines)
        files = [line.split(None, 3) for line in lines if " PRE " not in line]
        self.assertEqual([(f[2], f[3]) for f in files], [("3", "b.txt")])

        out = self.aws("s3", "ls", f"s3://{bucket}", "--recursive", "--summarize")
        rows = [line.split(None, 3) for line in out.splitlines()
                if line[:2].isdigit() and len(line.split(None, 3)) == 4]
        self.assertEqual({r[3]: int(r[2]) for r in rows},
                         {k: len(v) for k, v in objects.items()})
        self.assertIn("Total Objects: 4", out)
        self.assertIn("Total Size: 16", out)

    def test_rm(self):
        bucket = self.new_bucket()
        for key in ("a.txt", "dir/1", "dir/2", "dir/sub/3", "dirt", "keep/4"):
            self.s3.put_object(Bucket=bucket, Key=key, Body=key.encode())
        out = self.aws("s3", "rm", f"s3://{bucket}/a.txt")
        self.assertIn(f"delete: s3://{bucket}/a.txt", out)
        self.assertEqual(self.keys(bucket), ["dir/1", "dir/2", "dir/sub/3", "dirt", "keep/4"])
        out = self.aws("s3", "rm", f"s3://{bucket}/dir/", "--recursive")
        self.assertEqual(sorted(line for line in out.splitlines() if line.startswith("delete")),
                         [f"delete: s3://{bucket}/dir/{k}" for k in ("1", "2", "sub/3")])
        self.assertEqual(self.keys(bucket), ["dirt", "keep/4"])

    def test_sync(self):
        bucket = self.new_bucket()
        root = os.path.join(self.tmp, "src")
        local = {
            "a.txt": b"alpha\n",
            "b.bin": os.urandom(200 * 1024),
            "empty.txt": b"",
            "sub/c.txt": b"charlie\n",
            "sub/deep/d.dat": os.urandom(5000),
            "with space.txt": b"spaced\n",
            "ünï/ß+&=.txt": "unicode\n".encode(),
        }
        for rel, data in local.items():
            write(os.path.join(root, rel), data)

        out = self.aws("s3", "sync", root, f"s3://{bucket}/tree")
        self.assertEqual(len([l for l in out.splitlines() if l.startswith("upload:")]),
                         len(local), out)
        self.assertEqual(sorted(self.keys(bucket)), sorted(f"tree/{k}" for k in local))
        for rel, data in local.items():
            self.assertEqual(self.body(bucket, f"tree/{rel}"), data, rel)
        # Nothing changed, nothing to do: sizes and times in the listing agree.
        self.assertEqual(self.aws("s3", "sync", root, f"s3://{bucket}/tree").strip(), "")

        down = os.path.join(self.tmp, "down")
        self.aws("s3", "sync", f"s3://{bucket}/tree", down)
        self.assertEqual(tree(down), local)

        # Change the source: one file gone, one rewritten, one new.
        os.unlink(os.path.join(root, "sub/c.txt"))
        write(os.path.join(root, "a.txt"), b"alpha, second edition\n")
        write(os.path.join(root, "sub/new.txt"), b"new\n")
        out = self.aws("s3", "sync", root, f"s3://{bucket}/tree", "--delete")
        self.assertIn(f"delete: s3://{bucket}/tree/sub/c.txt", out)
        self.assertIn(f"s3://{bucket}/tree/a.txt", out)
        self.assertIn(f"s3://{bucket}/tree/sub/new.txt", out)
        expected = tree(root)
        self.assertEqual(sorted(self.keys(bucket)), sorted(f"tree/{k}" for k in expected))
        self.assertEqual(self.body(bucket, "tree/a.txt"), b"alpha, second edition\n")

        out = self.aws("s3", "sync", f"s3://{bucket}/tree", down, "--delete")
        self.assertIn("delete: ", out)
        self.assertEqual(tree(down), expected)

    # aws s3api -------------------------------------------------------------------
    def test_s3api_objects(self):
        bucket = self.new_bucket()
        data = os.urandom(4096)
        src = write(os.path.join(self.tmp, "obj.bin"), data)
        key = ["--bucket", bucket, "--key", "o/obj.txt"]
        put = self.aws_json("s3api", "put-object", *key, "--body", src,
                            "--content-type", "text/plain", "--metadata", "color=blue,Owner=qa")
        etag = put["ETag"]
        self.assertEqual(etag, md5_etag(data))
        wrong = md5_etag(b"not it")
        ranged = os.path.join(self.tmp, "range.out")
        full = os.path.join(self.tmp, "full.out")
        head, got_range, got_full, _, _, _ = self.parallel(
            lambda: self.aws_json("s3api", "head-object", *key),
            lambda: self.aws_json("s3api", "get-object", *key, "--range", "bytes=10-19", ranged),
            lambda: self.aws_json("s3api", "get-object", *key, "--if-match", etag, full),
            lambda: self.aws_fails("s3api", "head-object", *key, "--if-match", wrong,
                                   expect=("(412)", "Precondition Failed")),
            lambda: self.aws_fails("s3api", "get-object", *key, "--if-none-match", etag,
                                   os.path.join(self.tmp, "no"),
                                   expect=("(304)", "Not Modified")),
            lambda: self.aws_fails("s3api", "put-object", *key, "--body", __file__,
                                   "--if-none-match", "*", expect=("PreconditionFailed",)))
        self.assertEqual(head["ETag"], etag)
        self.assertEqual(head["ContentType"], "text/plain")
        self.assertEqual(head["Metadata"], {"color": "blue", "owner": "qa"})

        self.assertEqual(got_range["ContentRange"], "bytes 10-19/4096")
        self.assertEqual(got_range["ContentLength"], 10)
        self.assertEqual(read(ranged), data[10:20])

        self.assertEqual(read(full), data)
        self.assertEqual(got_full["Metadata"], {"color": "blue", "owner": "qa"})
        self.assertEqual(got_full["ContentType"], "text/plain")
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "no")))
        # The refused conditional PUT changed nothing.
        self.assertEqual(self.body(bucket, "o/obj.txt"), data)

    def test_s3api_list_objects_v2_paging(self):
        bucket = self.new_bucket()
        expected = sorted(f"logs/{i:02d}.log" for i in range(11))
        for key in expected + ["other/x", "top"]:
            self.s3.put_object(Bucket=bucket, Key=key, Body=b"")
        base = ["s3api", "list-objects-v2", "--bucket", bucket]
        # Without --max-items the CLI follows every continuation token itself.
        everything, first = self.parallel(
            lambda: self.aws_json(*base, "--page-size", "4"),
            lambda: self.aws_json(*base, "--prefix", "logs/", "--max-items", "4",
                                  "--page-size", "3"))
        self.assertEqual([o["Key"] for o in everything["Contents"]],
                         expected + ["other/x", "top"])
        page, collected, calls = first, [], 1
        while True:
            page_keys = [o["Key"] for o in page.get("Contents", [])]
            collected += page_keys
            token = page.get("NextToken")
            if not token:
                break
            self.assertEqual(len(page_keys), 4)
            self.assertLess(calls, 10)
            page = self.aws_json(*base, "--prefix", "logs/", "--max-items", "4",
                                 "--page-size", "3", "--starting-token", token)
            calls += 1
        self.assertEqual(collected, expected)
        self.assertEqual(calls, 3)
