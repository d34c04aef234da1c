"""Test artifacts shared by the e2e suites: deterministic release tarballs."""

from __future__ import annotations

import io
import tarfile


def make_tar(files: dict[str, bytes], root: str = "release") -> bytes:
    """An uncompressed tar of C{files} under C{root}/, byte-identical on every run."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(f"{root}/{name}")
            info.size = len(files[name])
            info.mtime = 1_700_000_000
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(files[name]))
    return buf.getvalue()
