"""The listing metadata cache of S3 backends (dgproxy.storage.metacache)."""

from __future__ import annotations

import random
import sys
from datetime import datetime, timezone

from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from dgproxy.storage.metacache import MetadataCache, entry_size
from dgproxy.storage.metadata import ObjectMetadata

NOW = datetime(2026, 11, 28, tzinfo=timezone.utc)


def delta_meta(i: int, user: int = 0) -> ObjectMetadata:
    sha = f"{i:064x}"
    return ObjectMetadata(
        tool="dgproxy/0.1", original_name=f"app-{i}.tar", file_sha256=sha, file_size=10**8 + i,
        md5=sha[:32], created_at=NOW, note="delta", content_type="application/x-tar",
        user_metadata={f"key-{j}": f"value-{i}-{j}" for j in range(user)},
        ref_path="reference.bin", ref_sha256=sha, delta_size=4096,
        delta_cmd="xdelta3 -e -9 -s reference.bin app.tar app.tar.delta")


def deep_size(obj, seen: set) -> int:
    """sys.getsizeof of C{obj} and of everything it holds, each object once."""
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, (tuple, list)):
        size += sum(deep_size(o, seen) for o in obj)
    elif isinstance(obj, dict):
        size += sum(deep_size(k, seen) + deep_size(v, seen) for k, v in obj.items())
    elif hasattr(obj, "__dict__"):
        size += deep_size(obj.__dict__, seen)
    return size


def place(i: int) -> tuple[str, str, str, str]:
    return ("default", "releases", f"app/v{i:05d}/app.tar.delta", f"{i:032x}")


class MetadataCacheTests(unittest.TestCase):
    def test_keeps_what_was_put_by_backend_bucket_key_and_etag(self):
        cache = MetadataCache()
        cache.put(place(1), delta_meta(1))
        self.assertEqual(cache.get(place(1)), delta_meta(1))
        backend, bucket, key, etag = place(1)
        for other in ((backend, bucket, key, "f" * 32), ("other", bucket, key, etag),
                      (backend, "other", key, etag), (backend, bucket, key + "x", etag)):
            self.assertIsNone(cache.get(other), other)

    def test_a_full_budget_makes_room_and_keeps_the_newest(self):
        one = entry_size(place(1), delta_meta(1))
        cache = MetadataCache(budget_bytes=3 * one + one // 2, choose=random.Random(7))
        for i in range(1, 11):
            cache.put(place(i), delta_meta(i))
            self.assertEqual(cache.get(place(i)), delta_meta(i))
            self.assertLessEqual(cache.size, cache.budget)
        self.assertEqual(len(cache), 3)

    def test_listings_of_more_than_fits_still_find_a_share(self):
        """A listing walks the same 1,000 keys each time, with room for 800:
        dropping the least recently used would find none of them on any walk.
        Random room-making finds about 600 (the N = 1000·e^-((1000-N)/800)
        of random replacement on a loop)."""
        one = entry_size(place(0), delta_meta(0))
        cache = MetadataCache(budget_bytes=800 * one, choose=random.Random(11))
        found = []
        for walk in range(6):
            hits = 0
            for i in range(1000):
                if cache.get(place(i)) is not None:
                    hits += 1
                else:
                    cache.put(place(i), delta_meta(i))
            found.append(hits)
        self.assertEqual(found[0], 0)
        for hits in found[2:]:
            self.assertTrue(500 <= hits <= 800, found)

    def test_putting_a_place_again_replaces_it(self):
        cache = MetadataCache()
        cache.put(place(1), delta_meta(1))
        cache.put(place(1), delta_meta(2, user=3))
        self.assertEqual(len(cache), 1)
        self.assertEqual(cache.get(place(1)), delta_meta(2, user=3))
        self.assertEqual(cache.size, entry_size(place(1), delta_meta(2, user=3)))

    def test_a_zero_budget_keeps_nothing(self):
        cache = MetadataCache(budget_bytes=0)
        cache.put(place(1), delta_meta(1))
        self.assertEqual((len(cache), cache.size), (0, 0))
        self.assertIsNone(cache.get(place(1)))

    def test_an_entry_larger_than_the_budget_leaves_the_others(self):
        small = entry_size(place(1), delta_meta(1))
        cache = MetadataCache(budget_bytes=small + 10)
        cache.put(place(1), delta_meta(1))
        cache.put(place(2), delta_meta(2, user=20))
        self.assertEqual(cache.get(place(1)), delta_meta(1))
        self.assertIsNone(cache.get(place(2)))

    def test_the_estimate_is_close_to_the_objects_held(self):
        """What the budget means: 2,000 entries as listings make them, against
        the sizes of every object they hold (sys.getsizeof, each object once).
        (tracemalloc would depend on which free lists earlier tests left.)"""
        for user in (0, 8):
            cache = MetadataCache(budget_bytes=10**9)
            for i in range(2000):
                cache.put(place(i), delta_meta(i, user))
            seen = {id(NOW)}  # one timestamp shared by all, as a listing's would not be
            held = (sys.getsizeof(cache._entries) + sys.getsizeof(cache._slots)
                    + sum(deep_size(k, seen) + deep_size(v, seen)
                          for k, v in cache._entries.items()))
            self.assertTrue(0.85 <= cache.size / held <= 1.15,
                            f"user={user}: estimated {cache.size}, held {held}")

    @settings(max_examples=200, deadline=None, derandomize=True, database=None)
    @given(budget=st.integers(0, 20_000),
           steps=st.lists(st.tuples(st.sampled_from(["put", "get"]), st.integers(0, 15),
                                    st.integers(0, 6)), max_size=60))
    def test_size_is_the_sum_of_the_entries_and_within_the_budget(self, budget, steps):
        cache = MetadataCache(budget_bytes=budget)
        for op, i, user in steps:
            if op == "put":
                cache.put(place(i), delta_meta(i, user))
                if entry_size(place(i), delta_meta(i, user)) <= budget:
                    self.assertEqual(cache.get(place(i)), delta_meta(i, user))
            else:
                got = cache.get(place(i))
                self.assertTrue(got is None or got.original_name == f"app-{i}.tar")
            kept = [cache.get(place(j)) for j in range(16)]
            self.assertEqual(cache.size, sum(entry_size(place(j), m)
                                             for j, m in enumerate(kept) if m is not None))
            self.assertLessEqual(cache.size, budget)
