"""What every results file records beside its rows (bench/results/<name>.json): the command
that printed them, the commit of the code measured, the machine, the date and how busy the
machine was. `python -m bench report` renders the docs' tables from these files."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# A run's own outputs (results files, plots) are not the code measured.
OUTPUTS = (":(exclude)bench/results", ":(exclude)bench/*.png")


def commit() -> str:
    """HEAD, with "-dirty" when tracked files other than a run's outputs differ from it (the
    figures are then of code that no commit holds: commit first, then measure). $CADRE_COMMIT
    where the checkout has no usable history: the GPU machine gets a copy of the working tree."""
    if os.environ.get("CADRE_COMMIT"):
        return os.environ["CADRE_COMMIT"]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    try:
        head = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", *OUTPUTS)
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + ("-dirty" if dirty else "")


def machine() -> str:
    """CPU model and count, and the GPU when torch sees one."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    described = f"{os.cpu_count()} x {cpu}, {platform.system()}"
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            described += f"; {torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
    else:  # a client (bench serve) never imports torch: ask the driver's tool, as a user would
        gpus = _nvidia_smi_gpus()
        if gpus:
            described += f"; {len(gpus)} x {gpus[0]}"
    return described


def _nvidia_smi_gpus() -> list[str]:
    """The GPUs' names from nvidia-smi, [] where it is absent or fails."""
    try:
        listed = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in listed.splitlines() if line.strip()]


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def without_outputs(argv: list[str]) -> list[str]:
    """argv less its --json/--plot output paths."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--json", "--plot"):
            skip = True
        elif not arg.startswith(("--json=", "--plot=")):
            kept.append(arg)
    return kept


def command(name: str, argv: list[str]) -> str:
    """The command line that reproduces the run (output paths left out)."""
    return " ".join(["python -m bench", name, *map(shlex.quote, without_outputs(argv))])


def header(name: str, argv: list[str]) -> dict:
    """{command, commit, machine, date}: what every bench/results record starts with."""
    return {"command": command(name, argv), "commit": commit(), "machine": machine(),
            "date": datetime.date.today().isoformat()}


def write(path: Path, name: str, argv: list[str], rows: list[dict], load_before: float, **extra) -> None:
    """bench/results/<name>.json: {command, commit, machine, date, load_average, rows, ...}."""
    record = {**header(name, argv), "load_average": {"before": load_before, "after": load_average()},
              "rows": rows, **extra}
    Path(path).write_text(json.dumps(record, indent=1) + "\n")
