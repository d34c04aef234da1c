"""Filesystem backend: the Rust proxy's on-disk layout, written atomically.

C{{root}/{bucket}/deltaspaces/{stored key}} holds each blob; its metadata is
the C{user.dg.metadata} xattr on the same inode. Writes go to a temp file in
the target directory, get their xattr, are fsynced and renamed into place,
and the directory is fsynced, so a reader sees the old blob or the new one.
Blocking calls run in the reactor's thread pool.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from datetime import datetime, timezone
from typing import Optional

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from zope.interface import implementer

from dgproxy.storage.interface import (
    AlreadyExists, BucketInfo, BucketMissing, NameTooLong, BucketNotEmptyError, IBackend, IObjectWriter,
    KeyConflict, StorageError, StoredObject, open_span)
from dgproxy.storage.metadata import (
    REFERENCE_NAME, XATTR_NAME, MetadataError, ObjectMetadata)
from dgproxy.streams import FileSink, FileSource

log = Logger()

OBJECTS_DIR = "deltaspaces"
TEMP_NAME = re.compile(r"^(?:\.dgtmp\.[0-9a-f]{16}|\.tmp[A-Za-z0-9]{6})$")  # ours, the Rust proxy's
PROBE_NAME = ".dg_xattr_probe"
MAX_NAME_BYTES = 255
# Objects whose metadata a listing reads between two looks at whether the
# caller's page is complete.
LIST_BATCH = 500


def is_temp_name(name: str) -> bool:
    """An atomic-write temp file (dgproxy's or the Rust proxy's), never user data."""
    return TEMP_NAME.match(name) is not None
XATTR_HELP = ("Data directory does not support extended attributes. "
              "{path}: {reason}. dgproxy stores object metadata in the user.dg.metadata "
              "xattr; use ext4, XFS, Btrfs, ZFS or APFS (not tmpfs, FAT32, exFAT, or NFS "
              "without xattr support), or switch to the S3 backend.")


class XattrUnsupported(Exception):
    """The data directory's filesystem cannot hold user xattrs."""


def _set_xattr(fd_or_path, value: bytes) -> None:
    os.setxattr(fd_or_path, XATTR_NAME, value)


def _get_xattr(path: str) -> Optional[bytes]:
    try:
        return os.getxattr(path, XATTR_NAME)
    except OSError as e:
        if e.errno in (errno.ENODATA, getattr(errno, "ENOATTR", errno.ENODATA)):
            return None
        raise


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_hidden(name: str) -> bool:
    return name == REFERENCE_NAME or is_temp_name(name) or name == PROBE_NAME


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc)


def check_xattr_support(root: str) -> None:
    """Write, read and delete a probe xattr; raise L{XattrUnsupported} if any step fails."""
    probe = os.path.join(root, PROBE_NAME)
    try:
        with open(probe, "wb") as f:
            f.write(b"xattr_probe")
        _set_xattr(probe, b"xattr_test_ok")
        if _get_xattr(probe) != b"xattr_test_ok":
            raise OSError(errno.EIO, "xattr read back a different value")
    except OSError as e:
        raise XattrUnsupported(XATTR_HELP.format(path=root, reason=e.strerror or e)) from None
    finally:
        try:
            os.unlink(probe)
        except OSError:
            pass


@implementer(IObjectWriter)
class _FileWriter:
    """Streams into a temp file beside the target; see L{FilesystemBackend}."""

    hashes_needed = True

    def __init__(self, target: str, temp: str, fileobj):
        self._target = target
        self._temp = temp
        self._sink = FileSink(fileobj)
        self._done = False

    @property
    def size(self) -> int:
        return self._sink.size

    def write(self, data: bytes) -> defer.Deferred:
        return self._sink.write(data)

    async def commit(self, metadata: ObjectMetadata, exclusive: bool = False) -> None:
        """Publish the blob; with C{exclusive}, fail with L{AlreadyExists}
        rather than replace an existing one (a create-if-absent that holds
        across processes sharing the directory)."""
        try:
            await self._sink.flush()
            await deferToThread(self._finish, metadata.to_json(), exclusive)
        except BaseException:
            self.abort()
            raise
        self._done = True

    def _finish(self, meta: bytes, exclusive: bool) -> None:
        f = self._sink.file
        try:
            _set_xattr(f.fileno(), meta)
            os.fsync(f.fileno())
            f.close()
            if exclusive:
                try:
                    os.link(self._temp, self._target)
                except FileExistsError:
                    raise AlreadyExists(self._target) from None
                os.unlink(self._temp)
            else:
                os.rename(self._temp, self._target)
            _fsync_dir(os.path.dirname(self._target))
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise StorageError("insufficient storage space") from e
            raise

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._sink.discard()
        try:
            self._sink.file.close()
        except OSError:
            pass
        try:
            os.unlink(self._temp)
        except FileNotFoundError:
            pass


@implementer(IBackend)
class FilesystemBackend:
    """Blobs and their xattr metadata under one data directory."""

    def __init__(self, root: str, name: str = "default"):
        self.name = name
        self.root = os.path.abspath(root)

    # -- start-up ---------------------------------------------------------
    def prepare(self) -> int:
        """Create the root, probe xattrs, sweep temp files; returns temp files removed.

        Runs synchronously before the service listens."""
        os.makedirs(self.root, exist_ok=True)
        check_xattr_support(self.root)
        swept = 0
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if is_temp_name(name):
                    try:
                        os.unlink(os.path.join(dirpath, name))
                        swept += 1
                    except OSError:
                        pass
        return swept

    # -- paths --------------------------------------------------------------
    def _bucket_dir(self, bucket: str) -> str:
        if not bucket or "/" in bucket or bucket in (".", "..") or "\0" in bucket:
            raise BucketMissing(bucket)
        return os.path.join(self.root, bucket)

    def _objects_dir(self, bucket: str) -> str:
        return os.path.join(self._bucket_dir(bucket), OBJECTS_DIR)

    def _path(self, bucket: str, key: str) -> str:
        """The file for C{key}; refuses anything that could leave the bucket."""
        parts = key.split("/")
        if (not key or key.startswith("/") or "\0" in key
                or any(p in ("", ".", "..") for p in parts)):
            raise KeyConflict(f"unsafe stored key {key!r}")
        base = self._objects_dir(bucket)
        path = os.path.join(base, *parts)
        if os.path.commonpath([base, os.path.normpath(path)]) != base:
            raise KeyConflict(f"unsafe stored key {key!r}")
        return path

    # -- buckets -------------------------------------------------------------
    def list_buckets(self) -> defer.Deferred:
        def scan():
            out = []
            for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
                if entry.is_dir(follow_symlinks=False) and not entry.name.startswith("."):
                    out.append(BucketInfo(entry.name, _utc(entry.stat().st_mtime)))
            return out
        return deferToThread(scan)

    def bucket_exists(self, bucket: str) -> defer.Deferred:
        def exists():
            try:
                return os.path.isdir(self._bucket_dir(bucket))
            except BucketMissing:  # a name no bucket directory can have
                return False
        return deferToThread(exists)

    def create_bucket(self, bucket: str) -> defer.Deferred:
        def create():
            path = self._bucket_dir(bucket)
            try:
                os.mkdir(path)
            except FileExistsError:
                return False
            os.mkdir(os.path.join(path, OBJECTS_DIR))
            _fsync_dir(self.root)
            return True
        return deferToThread(create)

    def delete_bucket(self, bucket: str) -> defer.Deferred:
        def delete():
            path = self._bucket_dir(bucket)
            if not os.path.isdir(path):
                raise BucketMissing(bucket)
            objects = os.path.join(path, OBJECTS_DIR)
            for dirpath, dirs, files in os.walk(objects):
                if dirpath == objects:
                    dirs[:] = [d for d in dirs if d != ".dg"]  # open uploads go with the bucket
                if any(not _is_hidden(f) for f in files):
                    raise BucketNotEmptyError(bucket)
            shutil.rmtree(path)
            _fsync_dir(self.root)
        return deferToThread(delete)

    # -- objects ---------------------------------------------------------------
    def _stat_path(self, key: str, path: str) -> Optional[StoredObject]:
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            if e.errno == errno.ENAMETOOLONG:
                return None
            raise
        if not os.path.isfile(path):
            return None
        raw = _get_xattr(path)
        meta = None
        if raw is not None:
            try:
                meta = ObjectMetadata.from_json(raw)
            except MetadataError as e:
                log.warn("Unreadable metadata on {path}: {error}", path=path, error=str(e))
        return StoredObject(key, st.st_size, _utc(st.st_mtime), meta)

    def _existing_path(self, bucket: str, key: str) -> Optional[str]:
        """The file for a read or delete; None for a key no write could have
        made (empty or '.' segments). Keys that would escape still raise."""
        parts = key.split("/")
        if (key and not key.startswith("/") and not key.endswith("/") and "\0" not in key
                and ".." not in parts and any(p in ("", ".") for p in parts)):
            return None
        return self._path(bucket, key)

    def local_file(self, bucket: str, key: str) -> Optional[str]:
        """The blob's own file, for readers that want a path (xdelta3's source)."""
        return self._existing_path(bucket, key)

    async def open_with_stat(self, bucket: str, key: str, byte_range=None):
        stored = await self.stat(bucket, key)
        if stored is None:
            return None
        return await open_span(self, bucket, key, stored, byte_range, stored.size)

    def stat(self, bucket: str, key: str) -> defer.Deferred:
        def stat_():
            path = self._existing_path(bucket, key)
            return None if path is None else self._stat_path(key, path)
        return deferToThread(stat_)

    def open_read(self, bucket: str, key: str, offset: int = 0,
                  length: Optional[int] = None, stored=None) -> defer.Deferred:
        def open_():
            path = self._existing_path(bucket, key)
            if path is None:
                return None
            try:
                f = open(path, "rb")
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                return None
            except OSError as e:
                if e.errno == errno.ENAMETOOLONG:
                    return None
                raise
            return FileSource(f, offset, length)
        return deferToThread(open_)

    def open_write(self, bucket: str, key: str, size: Optional[int] = None,
                   hint=None) -> defer.Deferred:
        def open_():
            target = self._path(bucket, key)
            if any(len(p.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES
                   for p in key.split("/")):
                raise NameTooLong(key)
            if not os.path.isdir(self._objects_dir(bucket)):
                raise BucketMissing(bucket)
            directory = os.path.dirname(target)
            try:
                os.makedirs(directory, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                raise KeyConflict(f"a parent of {key!r} is an object") from None
            if os.path.isdir(target):
                raise KeyConflict(f"{key!r} is a prefix of other objects")
            temp = os.path.join(directory, f".dgtmp.{secrets.token_hex(8)}")
            return _FileWriter(target, temp, open(temp, "xb"))
        return deferToThread(open_)

    def discard(self, bucket: str, key: str) -> defer.Deferred:
        return self.delete(bucket, key)

    def delete(self, bucket: str, key: str) -> defer.Deferred:
        def delete():
            path = self._existing_path(bucket, key)
            if path is None:
                return False
            try:
                os.unlink(path)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                return False
            self._prune(bucket, os.path.dirname(path))
            return True
        return deferToThread(delete)

    def _prune(self, bucket: str, directory: str) -> None:
        """Remove now-empty directories up to (not including) deltaspaces/."""
        stop = self._objects_dir(bucket)
        while directory != stop and directory.startswith(stop + os.sep):
            try:
                os.rmdir(directory)
            except OSError:
                return
            directory = os.path.dirname(directory)

    def list(self, bucket: str, prefix: str, delimiter: Optional[str],
             start_after: Optional[str] = None, more=None) -> defer.Deferred:
        return deferToThread(self._list, bucket, prefix, delimiter, start_after, more)

    def _list(self, bucket: str, prefix: str, delimiter: Optional[str],
              start_after: Optional[str] = None, more=None):
        """Names first (cheap), then, in key order, the stat and metadata read
        of each (what costs), in batches, until C{more} wants no more."""
        base = self._objects_dir(bucket)
        if not os.path.isdir(base):
            raise BucketMissing(bucket)
        dir_part, _, _ = prefix.rpartition("/")
        parts = [p for p in dir_part.split("/") if p] if dir_part else []
        if any(p in (".", "..") for p in parts):
            return [], []
        start = os.path.join(base, *parts)
        objects: list[StoredObject] = []
        prefixes: list[str] = []
        if not os.path.isdir(start):
            return objects, prefixes
        rel_start = "/".join(parts)
        names: list[tuple[str, str, bool]] = []  # (key, path, is a directory)
        if delimiter == "/":
            try:
                entries = list(os.scandir(start))
            except (FileNotFoundError, NotADirectoryError):
                # Its last object was deleted (and the directory pruned) just now.
                return objects, prefixes
            for entry in entries:
                key = f"{rel_start}/{entry.name}" if rel_start else entry.name
                if not key.startswith(prefix):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    if not (key == ".dg" and not rel_start):
                        names.append((key + "/", entry.path, True))
                elif (entry.is_file(follow_symlinks=False) and not is_temp_name(entry.name)
                      and entry.name != PROBE_NAME):
                    names.append((key, entry.path, False))
        else:
            for dirpath, dirs, files in os.walk(start):
                if dirpath == base:
                    dirs[:] = [d for d in dirs if d != ".dg"]  # internal state
                rel = os.path.relpath(dirpath, base)
                rel = "" if rel == "." else rel.replace(os.sep, "/")
                for name in files:
                    if is_temp_name(name) or name == PROBE_NAME:
                        continue
                    key = f"{rel}/{name}" if rel else name
                    if key.startswith(prefix):
                        names.append((key, os.path.join(dirpath, name), False))
        names.sort(key=lambda n: n[0].encode("utf-8"))
        if start_after is not None:
            names = [n for n in names if n[0] > start_after]
        for i, (key, path, is_dir) in enumerate(names, 1):
            if is_dir:
                if self._has_visible(path):
                    prefixes.append(key)
            else:
                obj = self._stat_path(key, path)
                if obj is not None:
                    objects.append(obj)
            if (more is not None and i % LIST_BATCH == 0 and i < len(names)
                    and more(objects, prefixes) <= 0):
                break
        return objects, prefixes

    def _has_visible(self, directory: str) -> bool:
        for dirpath, _dirs, files in os.walk(directory):
            if any(not _is_hidden(f) for f in files):
                return True
        return False
