"""Mapping a client's object key to the stored keys of its deltaspace."""

from __future__ import annotations

from dataclasses import dataclass

from dgproxy.storage.metadata import DELTA_SUFFIX, REFERENCE_NAME

INTERNAL_PREFIX = ".dg/"  # multipart state and other internal blobs


@dataclass(frozen=True)
class ObjectKey:
    """A client key split at its last '/': deltaspace prefix and filename."""

    key: str

    @property
    def deltaspace(self) -> str:
        return self.key.rpartition("/")[0]

    @property
    def filename(self) -> str:
        return self.key.rpartition("/")[2]

    @property
    def passthrough_key(self) -> str:
        return self.key

    @property
    def delta_key(self) -> str:
        return self.key + DELTA_SUFFIX

    @property
    def reference_key(self) -> str:
        return reference_key(self.deltaspace)


def reference_key(deltaspace: str) -> str:
    return f"{deltaspace}/{REFERENCE_NAME}" if deltaspace else REFERENCE_NAME


def may_be_stored_as_delta(key: str) -> bool:
    """Whether some tool may have stored C{key} as C{key.delta}. dgproxy, the
    Rust proxy and the Python tool each store a delta only for a file name
    ending in one of their delta extensions, and every extension starts with
    a dot: a file name without one is never a delta. (The extension lists
    themselves differ between the tools and with the config, so they are
    not consulted.)"""
    return "." in key.rpartition("/")[2]


def user_key_of(stored_key: str) -> str | None:
    """The client key a stored key represents, or None for internal blobs."""
    name = stored_key.rpartition("/")[2]
    if name == REFERENCE_NAME or stored_key.startswith(INTERNAL_PREFIX):
        return None
    while (stored_key.endswith(DELTA_SUFFIX)
           and may_be_stored_as_delta(stored_key[: -len(DELTA_SUFFIX)])):
        stored_key = stored_key[: -len(DELTA_SUFFIX)]
    return stored_key


def common_prefix_of(key: str, prefix: str, delimiter: str | None) -> str | None:
    """The common prefix a listing under C{prefix} collapses C{key} into (up
    to and including the first C{delimiter} after C{prefix}), or None when
    the key is listed as itself."""
    if delimiter:
        cut = key.find(delimiter, len(prefix))
        if cut >= 0:
            return key[:cut + len(delimiter)]
    return None


def listing_frontier(last_stored: str) -> str:
    """The smallest client key whose blobs may not all have been listed yet,
    when a listing in stored-key order has got as far as C{last_stored}.

    A client key K is stored as K and as K.delta; K.delta sorts after K, and
    after every key that continues K with something smaller than ".delta"
    (K-2, K 1, K+x). So once the listing is at S, the keys still open are S
    and those prefixes K of S where the rest of S sorts before a delta
    suffix and K may be a delta at all (L{may_be_stored_as_delta}): their
    K.delta is still to come. Every client key below the shortest such
    prefix is complete. (UTF-8 byte order, S3's order, is code point order,
    so Python's string comparison is the right one.)

    Without the second condition, names like C{app-1.2.3.tar} would keep
    C{app} open, and every page would read on through all C{app-*} keys."""
    for i in range(1, len(last_stored) + 1):
        rest = last_stored[i:]
        if ((rest < DELTA_SUFFIX or rest.startswith(DELTA_SUFFIX))
                and may_be_stored_as_delta(last_stored[:i])):
            return last_stored[:i]
    return last_stored
