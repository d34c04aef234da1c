"""Holding a re-encrypt job to a byte rate: the pacer's arithmetic, and the
rate as the admin API and the command line accept it."""

from __future__ import annotations

import argparse
import json

from hypothesis import given, settings, strategies as st
from twisted.internet import defer, task
from twisted.trial import unittest

from dgproxy.admin.jobs import MIN_RATE, parse_start_request
from dgproxy.cli import parse_rate
from dgproxy.storage.reencrypt import Pacer


class PacerTests(unittest.TestCase):
    def test_waits_until_the_average_falls_to_the_rate(self):
        clock = task.Clock()
        pacer = Pacer(1000, clock)
        d = defer.ensureDeferred(pacer.account(3000))
        self.assertNoResult(d)
        clock.advance(2.9)
        self.assertNoResult(d)
        clock.advance(0.1)
        self.successResultOf(d)

    def test_time_spent_rewriting_counts_towards_the_rate(self):
        clock = task.Clock()
        pacer = Pacer(1000, clock)
        clock.advance(5)  # a slow rewrite of 4000 bytes: already below the rate
        self.successResultOf(defer.ensureDeferred(pacer.account(4000)))
        d = defer.ensureDeferred(pacer.account(2000))  # 6000 bytes due at 6 s
        clock.advance(0.99)
        self.assertNoResult(d)
        clock.advance(0.01)
        self.successResultOf(d)

    def test_no_rate_never_waits(self):
        pacer = Pacer(None, task.Clock())
        self.successResultOf(defer.ensureDeferred(pacer.account(10 ** 12)))


class StartRequestTests(unittest.TestCase):
    def test_rate_is_optional(self):
        self.assertEqual(parse_start_request(b'{"buckets": ["a"]}'), (["a"], None))
        self.assertEqual(parse_start_request(b'{"buckets": ["a"], "max_bytes_per_second": 1048576}'),
                         (["a"], 1048576))

    def test_refusals_name_the_fault(self):
        for body, message in [
                (b"", "no buckets given"), (b"[]", "no buckets given"),
                (b'{"buckets": []}', "no buckets given"), (b'{"buckets": [1]}', "no buckets given"),
                (json.dumps({"buckets": ["b"] * 101}).encode(), "too many buckets (max 100)"),
                (b'{"buckets": ["a"], "max_bytes_per_second": 0}', "max_bytes_per_second"),
                (b'{"buckets": ["a"], "max_bytes_per_second": "50M"}', "max_bytes_per_second"),
                (b'{"buckets": ["a"], "max_bytes_per_second": true}', "max_bytes_per_second"),
                (b'{"buckets": ["a"], "max_bytes_per_second": NaN}', "max_bytes_per_second"),
                (b'{"buckets": ["a"], "max_bytes_per_second": Infinity}', "max_bytes_per_second"),
                (b'{"buckets": ["a"], "max_bytes_per_second": 1000}', "max_bytes_per_second")]:
            with self.assertRaises(ValueError, msg=body) as caught:
                parse_start_request(body)
            self.assertIn(message, str(caught.exception))

    @settings(max_examples=300, deadline=None)
    @given(st.one_of(st.binary(max_size=200),
                     st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(),
                                  lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
                                  max_leaves=10).map(lambda doc: json.dumps(doc).encode())))
    def test_any_body_is_accepted_or_refused_with_a_message(self, body):
        try:
            buckets, rate = parse_start_request(body)
        except ValueError as e:
            self.assertTrue(str(e))
        else:
            self.assertTrue(buckets and all(isinstance(b, str) for b in buckets))
            self.assertTrue(rate is None or rate >= MIN_RATE)


class ParseRateTests(unittest.TestCase):
    def test_units_are_powers_of_1024(self):
        self.assertEqual(parse_rate("50M"), 50 * 1024 ** 2)
        self.assertEqual(parse_rate("50MiB/s"), 50 * 1024 ** 2)
        self.assertEqual(parse_rate("512k"), 512 * 1024)
        self.assertEqual(parse_rate("1.5G"), 1.5 * 1024 ** 3)
        self.assertEqual(parse_rate("100000"), 100000)

    def test_nonsense_is_refused(self):
        for text in ("", "fast", "-5M", "5T", "M", "5 M M"):
            with self.assertRaises(argparse.ArgumentTypeError, msg=text):
                parse_rate(text)
