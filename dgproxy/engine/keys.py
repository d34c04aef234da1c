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


def user_key_of(stored_key: str) -> str | None:
    """The client key a stored key represents, or None for internal blobs."""
    name = stored_key.rpartition("/")[2]
    if name == REFERENCE_NAME or stored_key.startswith(INTERNAL_PREFIX):
        return None
    while stored_key.endswith(DELTA_SUFFIX):
        stored_key = stored_key[: -len(DELTA_SUFFIX)]
    return stored_key
