"""Range and conditional requests (SPEC §2; RFC 9110 §13 and §14).

parse_range returns the inclusive (first, last) a 206 is built from; every
result must lie inside the object. check_read evaluates preconditions in the
RFC 9110 §13.2.2 order: If-Match, then If-Unmodified-Since (only without
If-Match), then If-None-Match, then If-Modified-Since (only without
If-None-Match).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

from hypothesis import HealthCheck, example, given, settings, strategies as st
from twisted.trial import unittest

from dgproxy.s3.conditions import NotModified, check_read, check_write, parse_range
from dgproxy.storage.interface import ByteRange
from dgproxy.s3.errors import S3Error

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

ETAG = '"5d41402abc4b2a76b9719d911017c592"'
MODIFIED = datetime(2024, 1, 10, 12, 0, 0, 500000, tzinfo=timezone.utc)


def http_date(when: datetime) -> str:
    return format_datetime(when.astimezone(timezone.utc), usegmt=True)


BEFORE = http_date(MODIFIED - timedelta(days=1))
SAME_SECOND = http_date(MODIFIED.replace(microsecond=0))
AFTER = http_date(MODIFIED + timedelta(days=1))


def headers(**kw):
    table = {k.replace("_", "-").lower(): v for k, v in kw.items()}
    return lambda name: table.get(name.lower())


def outcome(fn, *args, **kwargs):
    """'ok', 304, or the S3 error status."""
    try:
        fn(*args, **kwargs)
    except NotModified:
        return 304
    except S3Error as e:
        return e.status
    return "ok"


def read(**kw):
    return outcome(check_read, headers(**kw), ETAG, MODIFIED)


class ParseRangeTests(unittest.TestCase):
    def test_satisfiable_forms(self):
        cases = {
            "bytes=0-9": (0, 9), "bytes=10-": (10, 99), "bytes=-10": (90, 99),
            "bytes=-1000": (0, 99), "bytes=50-1000": (50, 99), "bytes=99-99": (99, 99),
            "bytes=0-0": (0, 0), "bytes=0-99": (0, 99), "bytes=-100": (0, 99),
            "bytes=99-": (99, 99), "bytes=-1": (99, 99),
        }
        for header, expected in cases.items():
            self.assertEqual(parse_range(header, 100), expected, header)

    def test_unsatisfiable_is_invalid_range(self):
        for header, size in (("bytes=100-", 100), ("bytes=100-200", 100), ("bytes=-0", 100),
                             ("bytes=0-", 0), ("bytes=-5", 0), ("bytes=0-0", 0),
                             ("bytes=1000-2000", 10)):
            e = self.assertRaises(S3Error, parse_range, header, size)
            self.assertEqual((e.code, e.status), ("InvalidRange", 416), header)

    def test_ignored_syntaxes_mean_whole_object(self):
        for header in (None, "", "bytes=5-3", "bytes=0-1,3-4", "items=0-1", "bytes=",
                       "bytes=-", "bytes=a-b", "0-9", "bytes 0-9", "bytes=--1", "bytes=1-2-3"):
            self.assertIsNone(parse_range(header, 100), header)

    def test_huge_numbers_do_not_crash(self):
        # A hostile header is the client's problem: a 416 or a full read, never a 500.
        big = "9" * 5000
        for header in ("bytes=0-" + big, "bytes=" + big + "-", "bytes=-" + big):
            try:
                result = parse_range(header, 100)
            except S3Error as e:
                self.assertEqual(e.code, "InvalidRange")
            else:
                self.assertIn(result, (None, (0, 99)))


    @SETTINGS
    @given(st.integers(0, 10 ** 12),
           st.one_of(
               st.builds(lambda a, b: f"bytes={a}-{b}", st.integers(0, 10 ** 13),
                         st.integers(0, 10 ** 13)),
               st.builds(lambda a: f"bytes={a}-", st.integers(0, 10 ** 13)),
               st.builds(lambda n: f"bytes=-{n}", st.integers(0, 10 ** 13)),
               st.text(alphabet="bytes=-0123456789, ", max_size=20),
               st.text(max_size=20)))
    @example(0, "bytes=0-0")
    @example(1, "bytes=-1")
    def test_any_result_lies_inside_the_object(self, size, header):
        try:
            result = parse_range(header, size)
        except S3Error as e:
            self.assertEqual((e.code, e.status), ("InvalidRange", 416))
            return
        if result is not None:
            first, last = result
            self.assertTrue(0 <= first <= last < size, (header, size, result))

    @SETTINGS
    @given(st.integers(0, 10 ** 6), st.integers(0, 2 * 10 ** 6), st.integers(0, 2 * 10 ** 6))
    def test_first_last_model(self, size, a, b):
        header = f"bytes={a}-{b}"
        if b < a:
            self.assertIsNone(parse_range(header, size))
        elif a >= size:
            self.assertRaises(S3Error, parse_range, header, size)
        else:
            self.assertEqual(parse_range(header, size), (a, min(b, size - 1)))

    @SETTINGS
    @given(st.integers(0, 10 ** 6), st.integers(0, 2 * 10 ** 6))
    def test_suffix_model(self, size, n):
        header = f"bytes=-{n}"
        if n == 0 or size == 0:
            self.assertRaises(S3Error, parse_range, header, size)
        else:
            self.assertEqual(parse_range(header, size), (max(0, size - n), size - 1))


class ByteRangeHeaderTests(unittest.TestCase):
    """The range dgproxy sends upstream is the client's, re-spelled: it
    resolves to the same bytes against any size."""

    @SETTINGS
    @given(st.text(alphabet="bytes=-0123456789 ", max_size=30) | st.builds(
        lambda a, b: f"bytes={a}-{b}", st.integers(0, 10 ** 25), st.one_of(st.just(""),
                                                                          st.integers(0, 10 ** 25))),
           st.integers(0, 10 ** 13))
    def test_sent_header_means_the_same(self, header, size):
        byte_range = ByteRange.parse(header)
        if byte_range is None:
            return
        again = ByteRange.parse(byte_range.header())
        self.assertEqual(again, byte_range)
        self.assertEqual(again.resolve(size), byte_range.resolve(size))


class CheckReadTests(unittest.TestCase):
    def test_no_conditions(self):
        self.assertEqual(read(), "ok")

    def test_if_match(self):
        self.assertEqual(read(if_match=ETAG), "ok")
        self.assertEqual(read(if_match=ETAG.strip('"')), "ok")  # unquoted, as some clients send
        self.assertEqual(read(if_match="*"), "ok")
        self.assertEqual(read(if_match=f'"other", {ETAG}'), "ok")
        self.assertEqual(read(if_match='"other"'), 412)
        self.assertEqual(read(if_match='"a", "b"'), 412)

    def test_if_match_uses_strong_comparison(self):
        self.assertEqual(read(if_match="W/" + ETAG), 412)

    def test_if_none_match(self):
        self.assertEqual(read(if_none_match=ETAG), 304)
        self.assertEqual(read(if_none_match="*"), 304)
        self.assertEqual(read(if_none_match=f'"x",{ETAG}'), 304)
        self.assertEqual(read(if_none_match='"other"'), "ok")

    def test_if_none_match_uses_weak_comparison(self):
        # RFC 9110 §13.1.2: If-None-Match compares weakly, so W/"x" matches "x".
        self.assertEqual(read(if_none_match="W/" + ETAG), 304)
        self.assertEqual(read(if_none_match='W/"other", W/' + ETAG), 304)


    def test_if_modified_since(self):
        self.assertEqual(read(if_modified_since=AFTER), 304)
        self.assertEqual(read(if_modified_since=SAME_SECOND), 304)  # HTTP dates have 1 s resolution
        self.assertEqual(read(if_modified_since=BEFORE), "ok")
        self.assertEqual(read(if_modified_since="not a date"), "ok")

    def test_if_unmodified_since(self):
        self.assertEqual(read(if_unmodified_since=BEFORE), 412)
        self.assertEqual(read(if_unmodified_since=SAME_SECOND), "ok")
        self.assertEqual(read(if_unmodified_since=AFTER), "ok")
        self.assertEqual(read(if_unmodified_since="garbage"), "ok")

    def test_obsolete_date_formats(self):
        # RFC 9110 §5.6.7: recipients MUST accept all three HTTP-date formats.
        self.assertEqual(read(if_modified_since="Thursday, 11-Jan-24 12:00:00 GMT"), 304)
        self.assertEqual(read(if_modified_since="Thu Jan 11 12:00:00 2024"), 304)


    def test_if_match_beats_if_unmodified_since(self):
        # If-Match present: If-Unmodified-Since is not evaluated at all.
        self.assertEqual(read(if_match=ETAG, if_unmodified_since=BEFORE), "ok")
        self.assertEqual(read(if_match='"other"', if_unmodified_since=AFTER), 412)

    def test_if_none_match_beats_if_modified_since(self):
        # If-None-Match present: If-Modified-Since is not evaluated at all.
        self.assertEqual(read(if_none_match='"other"', if_modified_since=AFTER), "ok")
        self.assertEqual(read(if_none_match=ETAG, if_modified_since=BEFORE), 304)

    def test_precondition_failure_beats_not_modified(self):
        self.assertEqual(read(if_match='"other"', if_none_match=ETAG), 412)
        self.assertEqual(read(if_unmodified_since=BEFORE, if_modified_since=AFTER), 412)
        self.assertEqual(read(if_match=ETAG, if_none_match=ETAG), 304)

    def test_error_names_the_condition(self):
        try:
            check_read(headers(if_match='"x"'), ETAG, MODIFIED)
        except S3Error as e:
            self.assertEqual(e.code, "PreconditionFailed")
            self.assertEqual(e.extra.get("Condition"), "If-Match")
        else:
            self.fail("no error")

    def test_copy_source_conditions(self):
        prefix = "x-amz-copy-source-"

        def copy(**kw):
            table = {prefix + k.replace("_", "-"): v for k, v in kw.items()}
            return outcome(check_read, table.get, ETAG, MODIFIED, prefix)

        self.assertEqual(copy(), "ok")
        self.assertEqual(copy(if_match=ETAG), "ok")
        self.assertEqual(copy(if_match='"x"'), 412)
        self.assertEqual(copy(if_none_match=ETAG), 412)  # never 304 on a copy
        self.assertEqual(copy(if_modified_since=AFTER), 412)
        self.assertEqual(copy(if_unmodified_since=BEFORE), 412)
        self.assertEqual(copy(if_match=ETAG, if_unmodified_since=BEFORE), "ok")
        # Plain conditionals do not apply to the copy source.
        self.assertEqual(outcome(check_read, {"if-match": '"x"'}.get, ETAG, MODIFIED, prefix), "ok")

    @SETTINGS
    @given(st.sampled_from([None, ETAG, '"other"', "*", "W/" + ETAG]),
           st.sampled_from([None, ETAG, '"other"', "*"]),
           st.sampled_from([None, BEFORE, SAME_SECOND, AFTER, "junk"]),
           st.sampled_from([None, BEFORE, SAME_SECOND, AFTER, "junk"]))
    def test_rfc9110_evaluation_order(self, im, inm, ims, ius):
        got = read(if_match=im, if_none_match=inm, if_modified_since=ims, if_unmodified_since=ius)
        modified = MODIFIED.replace(microsecond=0)

        def date(v):
            return {BEFORE: modified - timedelta(days=1), SAME_SECOND: modified,
                    AFTER: modified + timedelta(days=1)}.get(v)

        # Step 1 / 2
        if im is not None:
            if not (im == "*" or im == ETAG):
                self.assertEqual(got, 412)
                return
        elif date(ius) is not None and modified > date(ius):
            self.assertEqual(got, 412)
            return
        # Step 3 / 4
        if inm is not None:
            self.assertEqual(got, 304 if inm in ("*", ETAG) else "ok")
        elif date(ims) is not None:
            self.assertEqual(got, 304 if modified <= date(ims) else "ok")
        else:
            self.assertEqual(got, "ok")


class CheckWriteTests(unittest.TestCase):
    def write(self, current, **kw):
        return outcome(check_write, headers(**kw), current)

    def test_unconditional(self):
        self.assertEqual(self.write(None), "ok")
        self.assertEqual(self.write(ETAG), "ok")

    def test_if_none_match_star_creates_only(self):
        self.assertEqual(self.write(None, if_none_match="*"), "ok")
        self.assertEqual(self.write(ETAG, if_none_match="*"), 412)

    def test_if_match_replaces_only_that_version(self):
        self.assertEqual(self.write(ETAG, if_match=ETAG), "ok")
        self.assertEqual(self.write(ETAG, if_match='"other"'), 412)
        self.assertEqual(self.write(ETAG, if_match="*"), "ok")

    def test_if_match_on_a_missing_key_is_no_such_key(self):
        """As AWS answers (moto's test of it is checked against AWS)."""
        self.assertEqual(self.write(None, if_match=ETAG), 404)
        self.assertEqual(self.write(None, if_match="*"), 404)

    def test_error_is_precondition_failed(self):
        e = self.assertRaises(S3Error, check_write, headers(if_none_match="*"), ETAG)
        self.assertEqual((e.code, e.status), ("PreconditionFailed", 412))
