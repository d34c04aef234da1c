"""Listing a page without listing the whole prefix (ObjectStore.list with a limit).

A backend that lists in pages (S3) stops as soon as the client's page is
certain. That is subtle because stored keys and client keys sort
differently: K.delta comes after K-2 and K 1, so client key K can still
turn up (or turn out newer as a delta) after later keys were listed. The
property: for any stored keys, prefix, delimiter, marker and page size, a
page listed with early stopping, from any backend page size, is exactly the
page cut from the full listing.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Optional

from hypothesis import example, given, settings, strategies as st
from twisted.internet import defer
from twisted.trial import unittest

from dgproxy.engine.keys import listing_frontier, user_key_of
from dgproxy.engine.store import ObjectStore
from dgproxy.s3.listing import paginate
from dgproxy.storage.interface import StoredObject

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


class PagedBackend:
    """Lists sorted stored keys in pages of C{page} entries, S3 style: with
    delimiter '/', keys collapse into common prefixes, which count toward
    the page; C{start_after} and C{more} are honoured, C{more}'s answer
    sizing the next page when C{page} is None (as S3Backend does)."""

    name = "paged"

    def __init__(self, blobs: dict[str, StoredObject], page: Optional[int]):
        self.blobs = blobs
        self.page = page
        self.pages_listed = 0

    def list(self, bucket, prefix, delimiter, start_after=None, more=None):
        entries: list[tuple[str, object]] = []
        seen_prefixes = set()
        for key in sorted(self.blobs, key=lambda k: k.encode("utf-8")):
            if not key.startswith(prefix) or (start_after is not None and key <= start_after):
                continue
            if delimiter:
                cut = key.find(delimiter, len(prefix))
                if cut >= 0:
                    p = key[:cut + len(delimiter)]
                    if p not in seen_prefixes:
                        seen_prefixes.add(p)
                        entries.append((p, None))
                    continue
            entries.append((key, self.blobs[key]))
        objects, prefixes = [], []
        at, size = 0, self.page or 3
        while at < len(entries):
            self.pages_listed += 1
            for key, obj in entries[at:at + size]:
                if obj is None:
                    prefixes.append(key)
                else:
                    objects.append(obj)
            at += size
            if at < len(entries) and more is not None:
                wanted = more(objects, prefixes)
                if wanted <= 0:
                    break
                size = self.page or max(1, wanted)
        return defer.succeed((objects, prefixes))


def store_over(backend) -> ObjectStore:
    return ObjectStore(backend, 5 * 1024**3, policy=None, codec=None, references=None,
                       spool=None)


def run(d: defer.Deferred):
    out = []
    d.addBoth(out.append)
    if isinstance(out[0], Exception) or hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def page_of(store, prefix, delimiter, marker, max_keys, limited: bool):
    kwargs = dict(after=marker, limit=max_keys) if limited else {}
    versions, prefixes = run(defer.ensureDeferred(
        store.list("b", prefix, delimiter, **kwargs)))
    page = paginate([(v.key, v) for v in versions], prefixes, prefix, delimiter, marker,
                    max_keys)
    return ([(k, v.stored.key, v.size) for k, v in page.objects], page.prefixes,
            page.truncated, page.last)


# Client keys built from pieces that share prefixes and sort around ".delta"
# and "/" (K-1, K 2, K.d, K.tar, K/x after K), so that deltas sorting late
# behind other keys, and common prefixes, are the usual case.
PIECES = ["a", "b", "-1", "-2", " 1", ".d", ".tar", "/", "/x", "+"]
NAMES = st.lists(st.sampled_from(PIECES), min_size=1, max_size=4).map("".join).filter(
    lambda k: not k.startswith("/") and "//" not in k and not k.endswith(".delta"))


@st.composite
def buckets(draw):
    """Stored blobs: each client key as plain, delta or both (newest wins)."""
    blobs = {}
    for key in draw(st.sets(NAMES, max_size=25)):
        kind = draw(st.sampled_from(["plain", "delta", "both"]))
        for i, stored in enumerate([key] if kind == "plain" else [key + ".delta"] if
                                   kind == "delta" else [key, key + ".delta"]):
            when = T0 + timedelta(seconds=draw(st.integers(0, 5)))
            blobs[stored] = StoredObject(stored, len(stored) + i, when, None,
                                         etag=f"{len(blobs):032x}")
    return blobs


def _blobs(*stored: str) -> dict[str, StoredObject]:
    return {k: StoredObject(k, i, T0, None, etag=f"{i:032x}") for i, k in enumerate(stored)}


# Client key "a.tar" exists only as a delta, which sorts after a.tar-1, a.tar-2 and a.tar-3.
LATE_DELTA = _blobs("a.tar-1", "a.tar-2", "a.tar-3", "a.tar.delta")


class EarlyStopListingTests(unittest.TestCase):
    @settings(max_examples=1000, deadline=None)
    @example(LATE_DELTA, "", None, None, 1, 1)
    @example(LATE_DELTA, "", None, None, 2, None)
    @example(_blobs("a.d-/x", "a.d.delta", "a.d/y"), "", "/", None, 1, 1)
    @given(buckets(), st.sampled_from(["", "a", "a-", "a/", "b"]),
           st.sampled_from([None, "/", "-"]), st.one_of(st.none(), NAMES),
           st.integers(1, 6), st.one_of(st.none(), st.integers(1, 4)))
    def test_a_page_is_the_page_of_the_full_listing(self, blobs, prefix, delimiter, marker,
                                                    max_keys, backend_page):
        full = page_of(store_over(PagedBackend(blobs, 1000)), prefix, delimiter, marker,
                       max_keys, limited=False)
        early = page_of(store_over(PagedBackend(blobs, backend_page)), prefix, delimiter,
                        marker, max_keys, limited=True)
        self.assertEqual(early, full)

    def test_walking_all_pages_lists_every_key_once(self):
        keys = [f"k{i:04d}.tar" + ("-x" if i % 3 else "") for i in range(300)]
        blobs = {}
        for i, k in enumerate(keys):
            stored = k + ".delta" if i % 2 else k
            blobs[stored] = StoredObject(stored, i, T0, None, etag=f"{i:032x}")
        backend = PagedBackend(blobs, 10)
        store = store_over(backend)
        seen, marker = [], None
        while True:
            objects, _, truncated, last = page_of(store, "", None, marker, 25, limited=True)
            seen += [k for k, _, _ in objects]
            if not truncated:
                break
            marker = last
        self.assertEqual(seen, sorted(keys))
        # Each client page read a few backend pages, not all 30 of them.
        self.assertLess(backend.pages_listed, 12 * 4 + 30)

    def test_frontier(self):
        self.assertEqual(listing_frontier("z"), "z")
        self.assertEqual(listing_frontier("app.tar-2"), "app.tar")  # app.tar.delta may follow
        self.assertEqual(listing_frontier("dir/x.tar b"), "dir/x.tar")
        self.assertEqual(listing_frontier("dir/x.tar.delta"), "dir/x.tar")
        self.assertEqual(listing_frontier("dir/"), "dir/")
        # A file name without a dot is never stored as a delta, by any tool.
        self.assertEqual(listing_frontier("app-2.tar"), "app-2.tar")
        self.assertEqual(listing_frontier("dir/a b"), "dir/a b")
        self.assertEqual(listing_frontier("v1.2/app-2"), "v1.2/app-2")
        self.assertEqual(listing_frontier("releases/app-1.2.3.tar"), "releases/app-1.2")

    def test_a_dotless_name_ending_in_delta_is_an_object_of_its_own(self):
        """Only a name some tool may have stored as a delta loses ".delta"."""
        self.assertEqual(user_key_of("dir/notes.delta"), "dir/notes.delta")
        self.assertEqual(user_key_of("dir/app.tar.delta"), "dir/app.tar")
        blobs = _blobs("dir/notes-1", "dir/notes.delta", "dir/app.tar.delta")
        objects, _, _, _ = page_of(store_over(PagedBackend(blobs, 1)), "dir/", None, None, 10,
                                   limited=True)
        self.assertEqual([k for k, _, _ in objects],
                         ["dir/app.tar", "dir/notes-1", "dir/notes.delta"])

    def test_versioned_names_are_listed_without_reading_ahead(self):
        """3,000 release archives app-<n>.tar in one prefix, half stored as
        deltas: each client page of 100 reads about one backend page of 100
        more, not the rest of the prefix (app-… keys used to keep app open)."""
        blobs = {}
        for i in range(3000):
            stored = f"releases/app-{i:05d}.tar" + (".delta" if i % 2 else "")
            blobs[stored] = StoredObject(stored, i, T0, None, etag=f"{i:032x}")
        backend = PagedBackend(blobs, 100)
        store = store_over(backend)
        seen, marker, pages = [], None, 0
        while True:
            objects, _, truncated, last = page_of(store, "releases/", None, marker, 100,
                                                  limited=True)
            seen += [k for k, _, _ in objects]
            pages += 1
            if not truncated:
                break
            marker = last
        self.assertEqual(seen, [f"releases/app-{i:05d}.tar" for i in range(3000)])
        self.assertEqual(pages, 30)
        self.assertLessEqual(backend.pages_listed, 3 * pages)
