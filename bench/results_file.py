"""The provenance header for benches that assemble their own record (soak, lmeval, guidellm_run):
the same fields, from the same code, as bench._provenance.write gives the others."""

from __future__ import annotations

import datetime

from bench._provenance import command as _command
from bench._provenance import commit, load_average, machine

__all__ = ["header", "load_average"]


def header(argv: list[str]) -> dict:
    """argv = ["python", "-m", "bench", NAME, *args] -> {command, commit, machine, date}."""
    return {"command": _command(argv[3], argv[4:]), "commit": commit(), "machine": machine(),
            "date": datetime.date.today().isoformat()}
