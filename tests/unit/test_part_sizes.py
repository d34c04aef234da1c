"""The part sizes an object completed from parts keeps, for GET ?partNumber=N."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from dgproxy.engine.multipart import PARTS_TEXT_LIMIT, part_spans, parts_text

SETTINGS = settings(max_examples=300, deadline=None, derandomize=True, database=None)


class PartSizesTests(unittest.TestCase):
    def test_runs_of_equal_sizes(self):
        self.assertEqual(parts_text([8 << 20] * 12 + [1000]), "8388608*12,1000")
        self.assertEqual(part_spans("5*2,3", 13), [(0, 4), (5, 9), (10, 12)])

    @SETTINGS
    @given(st.lists(st.integers(0, 10 ** 10), min_size=1, max_size=300))
    def test_spans_give_back_each_part(self, sizes):
        text = parts_text(sizes)
        if text is None:  # too many different sizes to keep
            return
        self.assertLessEqual(len(text), PARTS_TEXT_LIMIT)
        spans = part_spans(text, sum(sizes))
        self.assertEqual([last - first + 1 for first, last in spans], sizes)
        self.assertEqual(spans[0][0], 0)
        self.assertIsNone(part_spans(text, sum(sizes) + 1))

    @SETTINGS
    @given(st.text(max_size=300), st.integers(0, 10 ** 12))
    def test_any_stored_text_gives_spans_that_tile_the_object_or_none(self, text, total):
        spans = part_spans(text, total)
        if spans is None:
            return
        at = 0
        for first, last in spans:
            self.assertEqual(first, at)
            at = last + 1
        self.assertEqual(at, total)
        self.assertLessEqual(len(spans), 10000)
