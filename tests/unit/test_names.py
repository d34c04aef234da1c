"""Which bucket and key a request names, and which names dgproxy accepts.

SPEC §2 (path- and virtual-host-style addressing; key rules) and storage fact
sheet §1.2: keys never name a path outside the bucket's directory.
"""

from __future__ import annotations

import os
import re
from urllib.parse import quote

from hypothesis import HealthCheck, example, given, settings, strategies as st
from twisted.trial import unittest

from dgproxy.s3.errors import S3Error
from dgproxy.s3.names import MAX_KEY_BYTES, Target, check_bucket_name, check_key, parse_target

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
DOMAINS = ("localhost",)


def _code(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except S3Error as e:
        return e.code, e.status
    return None


class PathStyleTests(unittest.TestCase):
    def test_service_root(self):
        self.assertEqual(parse_target(b"/", None, DOMAINS), Target(None, None))
        self.assertEqual(parse_target(b"/", "localhost:9000", DOMAINS), Target(None, None))

    def test_bucket_only(self):
        self.assertEqual(parse_target(b"/photos", None, DOMAINS), Target("photos", None))
        self.assertEqual(parse_target(b"/photos/", "127.0.0.1:9000", DOMAINS),
                         Target("photos", None))

    def test_bucket_and_key(self):
        self.assertEqual(parse_target(b"/photos/2024/a.jpg", "localhost:9000", DOMAINS),
                         Target("photos", "2024/a.jpg"))

    def test_key_keeps_inner_and_trailing_slashes(self):
        self.assertEqual(parse_target(b"/b/dir/", None, DOMAINS), Target("b", "dir/"))
        self.assertEqual(parse_target(b"/b/a//c", None, DOMAINS), Target("b", "a//c"))
        self.assertEqual(parse_target(b"/b//x", None, DOMAINS), Target("b", "/x"))

    def test_percent_decoding(self):
        self.assertEqual(parse_target(b"/b/a%20b%2Fc", None, DOMAINS).key, "a b/c")
        self.assertEqual(parse_target(b"/b/%E2%82%AC%F0%9F%98%80", None, DOMAINS).key,
                         "\u20ac\U0001F600")
        # '+' is a literal plus in a path, not a space.
        self.assertEqual(parse_target(b"/b/a+b", None, DOMAINS).key, "a+b")
        self.assertEqual(parse_target(b"/b/100%25", None, DOMAINS).key, "100%")

    def test_encoded_dot_dot_decodes_to_dot_dot(self):
        # Decoding happens first, so check_key sees (and refuses) the real segment.
        key = parse_target(b"/b/a/%2E%2E/x", None, DOMAINS).key
        self.assertEqual(key, "a/../x")
        self.assertEqual(_code(check_key, key, ingest=False), ("InvalidArgument", 400))

    def test_invalid_utf8_is_invalid_argument(self):
        for raw in (b"/b/%FF", b"/b/a%C3", b"/b/%ED%A0%80", b"/%FF/key", b"/b/\xff"):
            e = self.assertRaises(S3Error, parse_target, raw, None, DOMAINS)
            self.assertEqual((e.code, e.status), ("InvalidArgument", 400), raw)

    def test_host_not_under_a_domain_is_path_style(self):
        self.assertEqual(parse_target(b"/photos/k", "photos.example.org", DOMAINS),
                         Target("photos", "k"))
        self.assertEqual(parse_target(b"/photos/k", "localhost", DOMAINS), Target("photos", "k"))
        self.assertEqual(parse_target(b"/photos/k", "[::1]:9000", DOMAINS), Target("photos", "k"))
        self.assertEqual(parse_target(b"/photos/k", "notlocalhost", DOMAINS),
                         Target("photos", "k"))

    def test_path_must_start_with_slash(self):
        for raw in (b"photos/key", b"*", b""):
            e = self.assertRaises(S3Error, parse_target, raw, None, DOMAINS)
            self.assertEqual(e.status, 400)


class VirtualHostTests(unittest.TestCase):
    def test_bucket_from_host(self):
        self.assertEqual(parse_target(b"/a/b.txt", "photos.localhost", DOMAINS),
                         Target("photos", "a/b.txt"))

    def test_with_port(self):
        self.assertEqual(parse_target(b"/k", "photos.localhost:9000", DOMAINS),
                         Target("photos", "k"))

    def test_host_is_case_insensitive(self):
        self.assertEqual(parse_target(b"/Key", "Photos.LocalHost:9000", DOMAINS),
                         Target("photos", "Key"))

    def test_trailing_dot(self):
        self.assertEqual(parse_target(b"/k", "photos.localhost.", DOMAINS), Target("photos", "k"))

    def test_bucket_root(self):
        self.assertEqual(parse_target(b"/", "photos.localhost:9000", DOMAINS),
                         Target("photos", None))

    def test_configured_domains(self):
        domains = ("s3.example.com", "S3.Other.ORG")
        self.assertEqual(parse_target(b"/k", "my.dotted.bucket.s3.example.com", domains),
                         Target("my.dotted.bucket", "k"))
        self.assertEqual(parse_target(b"/k", "b1.s3.other.org:443", domains), Target("b1", "k"))
        # localhost is not configured here: path style.
        self.assertEqual(parse_target(b"/b2/k", "b1.localhost", domains), Target("b2", "k"))
        # The bare domain is the service endpoint, not a bucket.
        self.assertEqual(parse_target(b"/b2/k", "s3.example.com", domains), Target("b2", "k"))

    def test_no_domains_means_path_style_only(self):
        self.assertEqual(parse_target(b"/b2/k", "b1.localhost", ()), Target("b2", "k"))

    def test_key_percent_decoding(self):
        self.assertEqual(parse_target(b"/a%2Fb%20c", "photos.localhost", DOMAINS).key, "a/b c")
        e = self.assertRaises(S3Error, parse_target, b"/%FE", "photos.localhost", DOMAINS)
        self.assertEqual(e.code, "InvalidArgument")


_KEY_TEXT = st.text(min_size=1, max_size=40)


class ParseTargetPropertyTests(unittest.TestCase):
    @SETTINGS
    @given(_KEY_TEXT)
    def test_percent_encoded_key_round_trips_path_style(self, key):
        raw = b"/bucket/" + quote(key, safe="").encode("ascii")
        self.assertEqual(parse_target(raw, "localhost:9000", DOMAINS), Target("bucket", key))

    @SETTINGS
    @given(_KEY_TEXT)
    def test_percent_encoded_key_round_trips_virtual_host(self, key):
        raw = b"/" + quote(key, safe="/").encode("ascii")
        self.assertEqual(parse_target(raw, "bucket.localhost:9000", DOMAINS),
                         Target("bucket", key))

    @SETTINGS
    @given(st.binary(max_size=40), st.sampled_from([None, "localhost", "b.localhost:1", "x.y"]))
    def test_arbitrary_paths_give_a_target_or_an_s3_error(self, tail, host):
        try:
            target = parse_target(b"/" + tail, host, DOMAINS)
        except S3Error as e:
            self.assertEqual(e.status, 400)
            return
        self.assertIsInstance(target, Target)


class BucketNameTests(unittest.TestCase):
    GOOD = ["abc", "my-bucket", "my.bucket.name", "a1b", "123", "a" * 63, "x-y.z-0", "0ab"]
    BAD = ["ab", "a" * 64, "", "ABC", "Abc", "my_bucket", "-abc", "abc-", ".abc", "abc.",
           "a..b", "a.-b", "a-.b", "192.168.1.1", "10.0.0.255", "xn--abc", "bucket-s3alias",
           "a b", "bück", "abc/", "abc\0"]

    def test_valid_names(self):
        for name in self.GOOD:
            check_bucket_name(name)

    def test_invalid_names(self):
        for name in self.BAD:
            self.assertEqual(_code(check_bucket_name, name), ("InvalidBucketName", 400), name)

    def test_other_reserved_prefixes_and_suffixes(self):
        # AWS's naming rules also reserve these; a bucket created under such a
        # name here could never be migrated to AWS.
        for name in ("sthree-bucket", "amzn-s3-demo-bucket", "bucket--ol-s3", "bucket.mrap",
                     "bucket--x-s3", "bucket--table-s3"):
            self.assertEqual(_code(check_bucket_name, name), ("InvalidBucketName", 400), name)


    @SETTINGS
    @given(st.text(alphabet="ab019.-_A", max_size=66))
    def test_matches_the_s3_rules(self, name):
        dotted_quad = re.fullmatch(r"\d+\.\d+\.\d+\.\d+", name) is not None
        if dotted_quad and not all(str(int(p)) == p and int(p) < 256 for p in name.split(".")):
            return  # leading zeros / out of range: whether that "is an IP" is moot
        valid = (3 <= len(name) <= 63
                 and re.fullmatch(r"[a-z0-9.\-]+", name) is not None
                 and name[0].isalnum() and name[-1].isalnum()
                 and ".." not in name and ".-" not in name and "-." not in name
                 and not dotted_quad)
        result = _code(check_bucket_name, name)
        self.assertEqual(result is None, valid, name)


class KeyTests(unittest.TestCase):
    def assertInvalid(self, key, ingest, code="InvalidArgument"):
        self.assertEqual(_code(check_key, key, ingest=ingest), (code, 400), repr(key))

    def test_ordinary_keys(self):
        for key in ("a", "a/b/c.txt", "unicodé/ключ/鍵.bin", "a b", "a+b", "100%",
                    ".env", "dir/.hidden", "reference.bin/inner.txt", "x.delta/y",
                    "archive.delta.zip", "reference.bin.txt", "a.b", "..a", "a..", "...",
                    "tab\there", "emoji-\U0001F600"):
            for ingest in (True, False):
                check_key(key, ingest=ingest)

    def test_dot_dot_segments(self):
        for key in ("..", "../x", "a/../b", "a/..", "a/b/../../.."):
            for ingest in (True, False):
                self.assertInvalid(key, ingest)

    def test_nul_and_backslash(self):
        for key in ("a\0b", "\0", "a\\b", "..\\x", "a/b\\"):
            for ingest in (True, False):
                self.assertInvalid(key, ingest)

    def test_absolute_keys(self):
        for key in ("/etc/passwd", "/a"):
            for ingest in (True, False):
                self.assertInvalid(key, ingest)

    def test_reserved_filenames(self):
        for key in ("reference.bin", "a/reference.bin", "a.delta", "x/y/z.delta", ".delta",
                    "a.zip.delta"):
            for ingest in (True, False):
                self.assertInvalid(key, ingest)

    def test_internal_prefix_is_reserved(self):
        for key in (".dg/x", ".dg/uploads/u1/part-1"):
            for ingest in (True, False):
                self.assertInvalid(key, ingest)
        for key in (".dgx/y", ".dg_notes", "a/.dg/x", "dg/x"):
            check_key(key, ingest=True)

    def test_trailing_slash_and_dot(self):
        for key in ("dir/", "a/b/", "", "x/.", "."):
            for ingest in (True, False):
                self.assertInvalid(key, ingest)

    def test_empty_segment_only_refused_on_ingest(self):
        for key in ("a//b", "a///b/c"):
            self.assertInvalid(key, ingest=True)
            check_key(key, ingest=False)

    def test_dot_segment_only_refused_on_ingest(self):
        self.assertInvalid("a/./b", ingest=True)

    def test_length_is_counted_in_utf8_bytes(self):
        check_key("a" * MAX_KEY_BYTES, ingest=True)
        check_key("é" * (MAX_KEY_BYTES // 2), ingest=True)  # 1024 bytes
        self.assertEqual(MAX_KEY_BYTES, 1024)
        for key in ("a" * 1025, "é" * 513, "€" * 342, "\U0001F600" * 257):
            self.assertLess(len(key), 1026)
            self.assertInvalid(key, ingest=True, code="KeyTooLongError")
            self.assertInvalid(key, ingest=False, code="KeyTooLongError")


_SEGMENTS = st.one_of(
    st.sampled_from(["a", "b c", "..", ".", "", "é", "reference.bin", "x.delta", "\\", "\0",
                     "...", ".hidden", "%2e%2e", "~", "\U0001F600", "con", "a" * 300]),
    st.text(max_size=8))
_KEYS = st.one_of(st.lists(_SEGMENTS, min_size=1, max_size=6).map("/".join), st.text(max_size=20))


class KeyPropertyTests(unittest.TestCase):
    base = os.path.abspath(os.path.join("data", "bucket", "deltaspaces"))

    @SETTINGS
    @given(_KEYS)
    @example("a/../../x")
    @example("/etc/passwd")
    def test_ingest_keys_stay_inside_the_bucket(self, key):
        if _code(check_key, key, ingest=True) is not None:
            return
        path = os.path.join(self.base, key)
        normal = os.path.normpath(path)
        self.assertEqual(os.path.commonpath([self.base, normal]), self.base)
        self.assertNotEqual(normal, self.base)
        # No segment is reinterpreted: the path names exactly the key.
        self.assertEqual(normal, path)
        self.assertEqual(os.path.relpath(normal, self.base).replace(os.sep, "/"), key)

    @SETTINGS
    @given(_KEYS)
    def test_read_keys_stay_inside_the_bucket(self, key):
        if _code(check_key, key, ingest=False) is not None:
            return
        normal = os.path.normpath(os.path.join(self.base, key))
        self.assertEqual(os.path.commonpath([self.base, normal]), self.base)
        self.assertNotEqual(normal, self.base)

    @SETTINGS
    @given(_KEYS)
    def test_ingest_rules_only_add_to_read_rules(self, key):
        if _code(check_key, key, ingest=True) is None:
            self.assertIsNone(_code(check_key, key, ingest=False))

    @SETTINGS
    @given(st.text(min_size=200, max_size=1100))
    def test_over_1024_bytes_is_always_refused(self, key):
        result = _code(check_key, key, ingest=False)
        if len(key.encode("utf-8")) > MAX_KEY_BYTES:
            self.assertEqual(result, ("KeyTooLongError", 400))
        else:
            self.assertNotEqual(result, ("KeyTooLongError", 400))

    @SETTINGS
    @given(_KEYS)
    def test_only_s3_errors(self, key):
        for ingest in (True, False):
            try:
                check_key(key, ingest=ingest)
            except S3Error as e:
                self.assertEqual(e.status, 400)
