"""Local scratch files for delta work: spooled bodies, materialised references,
reconstructions waiting for their checksum. Swept at start-up."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from typing import Optional

from dgproxy.streams import FileSource

PREFIX = "dgspool-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Spool:
    def __init__(self, directory: Optional[str] = None):
        self.directory = os.path.abspath(
            directory or os.path.join(tempfile.gettempdir(), "dgp-spool"))

    def prepare(self) -> int:
        """Create the directory and remove what dead processes left; returns the count.

        Spool files carry their process id, so instances sharing a spool
        directory never sweep each other's live files."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        swept = 0
        for name in os.listdir(self.directory):
            if not name.startswith(PREFIX):
                continue
            owner = name[len(PREFIX):].split("-", 1)[0]
            if owner.isdigit() and int(owner) != os.getpid() and _alive(int(owner)):
                continue
            try:
                os.unlink(os.path.join(self.directory, name))
                swept += 1
            except OSError:
                pass
        return swept

    def create(self, kind: str) -> "SpoolFile":
        name = f"{PREFIX}{os.getpid()}-{kind}-{secrets.token_hex(8)}"
        path = os.path.join(self.directory, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        return SpoolFile(path, os.fdopen(fd, "w+b"))

    def link(self, target: str, kind: str) -> Optional["SpoolFile"]:
        """A hard link to C{target} in the spool, or None (other filesystem,
        or the target is gone)."""
        name = f"{PREFIX}{os.getpid()}-{kind}-{secrets.token_hex(8)}"
        path = os.path.join(self.directory, name)
        try:
            os.link(target, path)
        except OSError:
            return None
        spool = SpoolFile(path, open(path, "rb"))
        spool.size = os.fstat(spool.file.fileno()).st_size
        return spool

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.directory).free


class SpoolFile:
    """A scratch file that is removed when released."""

    def __init__(self, path: str, fileobj):
        self.path = path
        self.file = fileobj
        self.size = 0

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.size += len(data)

    def flush(self) -> None:
        self.file.flush()

    def source(self, offset: int = 0, length: Optional[int] = None) -> FileSource:
        """A source over the contents that removes the file when closed."""
        self.file.flush()
        f = open(self.path, "rb")
        self.release()
        return FileSource(f, offset, length)

    def release(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
