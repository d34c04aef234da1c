"""ListObjects pagination against a brute-force model.

A client walks pages by passing the returned marker back (V1 NextMarker, V2
continuation token). Whatever the key set, prefix, delimiter and page size,
the walk must yield every entry (keys and collapsed common prefixes) exactly
once, in UTF-8 byte order, with each page at most max-keys long.
"""

from __future__ import annotations

import re

from hypothesis import HealthCheck, example, given, settings, strategies as st
from twisted.trial import unittest

from dgproxy.s3.errors import S3Error
from dgproxy.s3.listing import decode_token, encode_token, paginate, parse_max_keys

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

# Characters whose order differs between UTF-16 code units and UTF-8 bytes
# (U+FFFF vs U+10000), a low byte, the delimiter, and multi-byte letters.
_ALPHABET = ["a", "b", "/", "-", "é", "\uffff", "\U00010000", "\x01", "~", "A"]
_KEY = st.text(alphabet=_ALPHABET, min_size=1, max_size=6)
_KEYSETS = st.lists(_KEY, unique=True, max_size=30)
_PREFIX = st.sampled_from(["", "a", "a/", "b/é", "/"]) | st.text(alphabet=_ALPHABET, max_size=3)
_DELIM = st.sampled_from([None, "/", "-", "a/", "é", "\U00010000"])


def model(keys, prefix, delimiter):
    """Every entry of the listing, in order: (name, is_prefix)."""
    out = set()
    for k in keys:
        if not k.startswith(prefix):
            continue
        rest = k[len(prefix):]
        if delimiter:
            i = rest.find(delimiter)
            if i >= 0:
                out.add((prefix + rest[:i + len(delimiter)], True))
                continue
        out.add((k, False))
    return sorted(out, key=lambda e: e[0].encode("utf-8"))


def walk(keys, prefix, delimiter, max_keys, marker=None, via_token=False, test=None):
    objects = [(k, "v:" + k) for k in sorted(keys)]
    seen = []
    for _ in range(len(keys) + 2):
        page = paginate(objects, [], prefix, delimiter, marker, max_keys)
        entries = ([(k, False) for k, _ in page.objects] + [(p, True) for p in page.prefixes])
        entries.sort(key=lambda e: e[0].encode("utf-8"))
        if test is not None:
            test.assertLessEqual(len(entries), max_keys)
            for k, v in page.objects:
                test.assertEqual(v, "v:" + k)
            test.assertEqual(page.last, entries[-1][0] if entries else None)
            if page.truncated:
                test.assertTrue(entries, "a truncated page must make progress")
        seen.extend(entries)
        if not page.truncated:
            return seen
        marker = decode_token(encode_token(page.last)) if via_token else page.last
    raise AssertionError("pagination did not terminate")


class PaginateTests(unittest.TestCase):
    def test_simple_pages(self):
        objs = [(k, k) for k in ("a", "b", "c", "d", "e")]
        p1 = paginate(objs, [], "", None, None, 2)
        self.assertEqual([k for k, _ in p1.objects], ["a", "b"])
        self.assertTrue(p1.truncated)
        self.assertEqual(p1.last, "b")
        p2 = paginate(objs, [], "", None, p1.last, 2)
        self.assertEqual([k for k, _ in p2.objects], ["c", "d"])
        p3 = paginate(objs, [], "", None, p2.last, 2)
        self.assertEqual([k for k, _ in p3.objects], ["e"])
        self.assertFalse(p3.truncated)

    def test_exactly_full_page_is_not_truncated(self):
        objs = [(k, k) for k in ("a", "b")]
        page = paginate(objs, [], "", None, None, 2)
        self.assertFalse(page.truncated)

    def test_delimiter_collapses_and_prefixes_count_toward_max_keys(self):
        objs = [(k, k) for k in ("a.txt", "dir/1", "dir/2", "dir/sub/3", "z.txt")]
        page = paginate(objs, [], "", "/", None, 2)
        self.assertEqual([k for k, _ in page.objects], ["a.txt"])
        self.assertEqual(page.prefixes, ["dir/"])
        self.assertTrue(page.truncated)
        self.assertEqual(page.last, "dir/")
        nxt = paginate(objs, [], "", "/", page.last, 2)
        self.assertEqual([k for k, _ in nxt.objects], ["z.txt"])
        self.assertEqual(nxt.prefixes, [])
        self.assertFalse(nxt.truncated)

    def test_prefix_and_delimiter(self):
        objs = [(k, k) for k in ("dir/1", "dir/sub/3", "dir/sub/4", "dirt", "other")]
        page = paginate(objs, [], "dir/", "/", None, 1000)
        self.assertEqual([k for k, _ in page.objects], ["dir/1"])
        self.assertEqual(page.prefixes, ["dir/sub/"])

    def test_backend_prefixes_are_merged_in_order(self):
        page = paginate([("b.txt", 1), ("d.txt", 2)], ["c/", "a/", "zz/"], "", "/", None, 1000)
        self.assertEqual(page.prefixes, ["a/", "c/", "zz/"])
        page = paginate([("b.txt", 1), ("d.txt", 2)], ["c/", "a/"], "", "/", None, 2)
        self.assertEqual(([k for k, _ in page.objects], page.prefixes), (["b.txt"], ["a/"]))
        self.assertEqual(page.last, "b.txt")

    def test_backend_prefixes_outside_the_prefix_are_dropped(self):
        page = paginate([], ["a/", "b/x/"], "b/", "/", None, 1000)
        self.assertEqual(page.prefixes, ["b/x/"])

    def test_utf8_byte_order(self):
        keys = ["\U00010000", "\uffff", "z", "é"]
        page = paginate([(k, k) for k in keys], [], "", None, None, 1000)
        self.assertEqual([k for k, _ in page.objects], ["z", "é", "\uffff", "\U00010000"])

    def test_marker_is_exclusive_and_need_not_exist(self):
        objs = [(k, k) for k in ("a", "b", "c")]
        self.assertEqual([k for k, _ in paginate(objs, [], "", None, "b", 10).objects], ["c"])
        self.assertEqual([k for k, _ in paginate(objs, [], "", None, "aa", 10).objects],
                         ["b", "c"])
        self.assertEqual(paginate(objs, [], "", None, "c", 10).objects, [])

    def test_zero_max_keys_returns_nothing(self):
        page = paginate([("a", 1)], [], "", None, None, 0)
        self.assertEqual((page.objects, page.prefixes), ([], []))

    def test_empty(self):
        page = paginate([], [], "", "/", None, 1000)
        self.assertEqual((page.objects, page.prefixes, page.truncated, page.last),
                         ([], [], False, None))

    @SETTINGS
    @given(_KEYSETS, _PREFIX, _DELIM, st.integers(1, 7))
    @example(["a/1", "a/2", "a-", "b"], "", "/", 1)
    def test_walk_yields_every_entry_once_in_byte_order(self, keys, prefix, delimiter, max_keys):
        seen = walk(keys, prefix, delimiter, max_keys, test=self)
        self.assertEqual(seen, model(keys, prefix, delimiter))

    @SETTINGS
    @given(_KEYSETS, _PREFIX, _DELIM, st.integers(1, 7))
    def test_walk_with_continuation_tokens(self, keys, prefix, delimiter, max_keys):
        self.assertEqual(walk(keys, prefix, delimiter, max_keys, via_token=True),
                         model(keys, prefix, delimiter))

    @SETTINGS
    @given(_KEYSETS, _PREFIX, _DELIM, st.integers(1, 1000), _KEY)
    def test_start_marker_skips_everything_up_to_it(self, keys, prefix, delimiter, max_keys,
                                                   marker):
        page = paginate([(k, k) for k in keys], [], prefix, delimiter, marker, max_keys)
        expected = [e for e in model(keys, prefix, delimiter)
                    if e[0].encode("utf-8") > marker.encode("utf-8")]
        got = sorted([(k, False) for k, _ in page.objects] + [(p, True) for p in page.prefixes],
                     key=lambda e: e[0].encode("utf-8"))
        self.assertEqual(got, expected[:max_keys])
        self.assertEqual(page.truncated, len(expected) > max_keys)


class TokenTests(unittest.TestCase):
    @SETTINGS
    @given(st.text(max_size=50))
    def test_tokens_round_trip(self, key):
        token = encode_token(key)
        self.assertRegex(token, r"^[A-Za-z0-9_=-]*$")
        self.assertEqual(decode_token(token), key)

    @SETTINGS
    @given(st.text(max_size=40))
    @example("%%%")
    @example("\u00e9t\u00e9")
    @example("/w==")
    def test_any_token_decodes_or_is_invalid_argument(self, token):
        try:
            result = decode_token(token)
        except S3Error as e:
            self.assertEqual((e.code, e.status), ("InvalidArgument", 400))
            return
        self.assertIsInstance(result, str)

    def test_bad_tokens(self):
        for token in ("\u00e9", "_w==", "abc"):
            e = self.assertRaises(S3Error, decode_token, token)
            self.assertEqual(e.code, "InvalidArgument")


class MaxKeysTests(unittest.TestCase):
    def test_values(self):
        self.assertEqual(parse_max_keys(None), 1000)
        self.assertEqual(parse_max_keys(""), 1000)
        self.assertEqual(parse_max_keys("0"), 0)
        self.assertEqual(parse_max_keys("1"), 1)
        self.assertEqual(parse_max_keys("999"), 999)
        self.assertEqual(parse_max_keys("1000"), 1000)
        self.assertEqual(parse_max_keys("1001"), 1000)
        self.assertEqual(parse_max_keys("2147483647"), 1000)

    def test_invalid(self):
        for value in ("-1", "abc", "1.5", "1e3", "9" * 5000, "0x10"):
            e = self.assertRaises(S3Error, parse_max_keys, value)
            self.assertEqual((e.code, e.status), ("InvalidArgument", 400), value)

    @SETTINGS
    @given(st.text(max_size=12) | st.integers(-10 ** 20, 10 ** 20).map(str))
    def test_any_value_is_in_range_or_invalid_argument(self, value):
        try:
            n = parse_max_keys(value)
        except S3Error as e:
            self.assertEqual(e.code, "InvalidArgument")
            return
        self.assertTrue(0 <= n <= 1000)
        if re.fullmatch(r"\d+", value):
            self.assertEqual(n, min(int(value), 1000))
