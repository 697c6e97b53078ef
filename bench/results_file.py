"""bench/results/<name>.json: the command, commit, machine and date beside a benchmark's rows."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def header(command: list[str]) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    machine = f"{platform.node() or 'host'}: {os.cpu_count()} CPUs, {platform.machine()}, {platform.system()}"
    return {"command": " ".join(command), "commit": commit, "machine": machine,
            "date": datetime.date.today().isoformat()}


def load_average() -> float:
    return round(os.getloadavg()[0], 2)
