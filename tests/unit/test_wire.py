"""HTTP wire helpers: heads fed apart from bodies, HTTP dates."""

from datetime import datetime, timezone
from email.utils import format_datetime, parsedate_to_datetime

from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from dgproxy.wire import BIG_READ, feed_head_apart, format_http_date, parse_http_date

HEAD = b"GET /b/k HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n"


class FeedHeadApartTests(unittest.TestCase):
    def fed(self, data: bytes) -> list[bytes]:
        pieces: list[bytes] = []
        feed_head_apart(data, pieces.append)
        return pieces

    def test_small_read_is_fed_whole(self):
        data = HEAD + b"hello"
        self.assertEqual(self.fed(data), [data])

    def test_large_read_is_fed_as_head_then_body(self):
        body = b"x" * (2 * BIG_READ)
        self.assertEqual(self.fed(HEAD + body), [HEAD, body])

    def test_large_read_without_a_head_end_is_fed_whole(self):
        data = b"y" * (2 * BIG_READ)
        self.assertEqual(self.fed(data), [data])

    def test_large_read_that_is_only_a_head_is_fed_once(self):
        head = b"GET / HTTP/1.1\r\nX-Pad: " + b"p" * BIG_READ + b"\r\n\r\n"
        self.assertGreater(len(head), BIG_READ)
        self.assertEqual(self.fed(head), [head])

    @settings(max_examples=200)
    @given(st.binary(max_size=3 * BIG_READ), st.integers(min_value=0, max_value=3 * BIG_READ))
    def test_pieces_always_add_up_to_the_read(self, data, at):
        data = data[:at] + b"\r\n\r\n" + data[at:]
        pieces = self.fed(data)
        self.assertEqual(b"".join(pieces), data)
        self.assertTrue(all(pieces))
        if len(pieces) == 2:
            self.assertTrue(pieces[0].endswith(b"\r\n\r\n"))
            self.assertNotIn(b"\r\n\r\n", pieces[0][:-4])


class HttpDateTests(unittest.TestCase):
    def test_imf_fixdate(self):
        self.assertEqual(parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
                         datetime(1994, 11, 6, 8, 49, 37, tzinfo=timezone.utc))

    def test_obsolete_forms(self):
        want = datetime(1994, 11, 6, 8, 49, 37, tzinfo=timezone.utc)
        self.assertEqual(parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT"), want)
        self.assertEqual(parse_http_date("Sun Nov  6 08:49:37 1994"), want)

    def test_nonsense_is_none(self):
        for value in (None, "", "yesterday", "Sun, 32 Nov 1994 08:49:37 GMT",
                      "Sun, 06 Foo 1994 08:49:37 GMT", "Sun, 06 Nov 1994 25:49:37 GMT"):
            self.assertIsNone(parse_http_date(value), value)

    @given(st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(9999, 12, 31),
                        timezones=st.just(timezone.utc)))
    def test_format_matches_email_utils_and_parses_back(self, when):
        when = when.replace(microsecond=0)
        text = format_http_date(when)
        self.assertEqual(text, format_datetime(when, usegmt=True))
        self.assertEqual(parse_http_date(text), when)
        self.assertEqual(parsedate_to_datetime(text), when)

    @given(st.text(max_size=40))
    def test_any_text_parses_or_is_none(self, text):
        got = parse_http_date(text)
        self.assertTrue(got is None or got.tzinfo is not None)
