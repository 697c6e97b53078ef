"""Where a result came from: the command, the commit, the machine and the date.

Every results file under bench/results/ starts with these keys, so a figure can be traced
to the code and the run that produced it.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def provenance(machine: str) -> dict:
    return {
        "command": "python -m bench " + shlex.join(_bench_argv()),
        "commit": _commit(),
        "machine": f"{machine}; {platform.node() or 'unknown host'}, {platform.machine()}",
        "date": datetime.date.today().isoformat(),
    }


def _bench_argv() -> list[str]:
    argv = sys.argv[1:] if Path(sys.argv[0]).name in ("__main__.py", "bench") else sys.argv
    return list(argv)


def _commit() -> str:
    """HEAD (+ "-dirty"), or $CADRE_COMMIT where the checkout has no usable history (the
    GPU machine receives a copy of the working tree)."""
    if os.environ.get("CADRE_COMMIT"):
        return os.environ["CADRE_COMMIT"]
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")
