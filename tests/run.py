"""Run the whole trial suite and print the plain `N passed, N failed` line CI reads."""

import os
import re
import subprocess
import sys


def main() -> int:
    venv_bin = os.path.dirname(os.path.abspath(sys.executable))
    env = dict(os.environ, PATH=venv_bin + os.pathsep + os.environ.get("PATH", ""))
    args = sys.argv[1:] or ["tests"]
    proc = subprocess.Popen([sys.executable, "-m", "twisted.trial", "--temp-directory=_trial_temp",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            text=True, bufsize=1)
    summary = ""
    for line in proc.stdout:
        sys.stdout.write(line)
        if line.startswith(("PASSED", "FAILED")):
            summary = line
    code = proc.wait()
    counts = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", summary)}
    passed = counts.get("successes", 0) + counts.get("expectedFailures", 0)
    failed = counts.get("failures", 0) + counts.get("errors", 0) + counts.get("unexpectedSuccesses", 0)
    skipped = counts.get("skips", 0)
    if not summary:
        failed = max(failed, 1)
    print(f"{passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""))
    if code == 0 and (failed or passed == 0):
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
