"""Where a decode step's host time goes, from a py-spy profile of a bench run:

    py-spy record --idle --threads --nonblocking -r 200 -f raw -o spy.txt -- python -m bench decode ...
    python -m bench spy-report spy.txt [--depth 4]

(`scripts/gpu_h200.sh spy-full24` records one at full depth.) Reads py-spy's collapsed stacks
("frame;frame;... count" a line), keeps the decoding thread's samples under Decoder._replay
(the replayed decode steps: waits included, since --idle samples a thread wherever it is), and
prints the share of each step of the replay loop, of each innermost function, and of each path
`--depth` frames deep; then what the cache's loader and reader threads spent their busy samples
on. A sampling profiler, unlike cProfile, does not inflate Python calls: its shares are the
step's own.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

REPLAY = "Decoder._replay"
WORKERS = ("cadre-loader", "cadre-reader", "cadre-host-read")  # the cache's pools (models/cache.py)
IDLE_LEAVES = ("_worker", "Condition.wait", "Event.wait")  # a pool thread with nothing to do


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench spy-report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("profile", type=Path, help="py-spy record -f raw output")
    p.add_argument("--depth", type=int, default=4, help="frames below _replay in the path table")
    p.add_argument("--top", type=int, default=15)
    return p.parse_args(argv)


def stacks(path: Path):
    """(thread name, [function names, outermost first], samples) for each line of the profile."""
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        thread = next((f for f in frames if f.startswith("thread (")), "")
        functions = [f.split(" (")[0] + _line(f) for f in frames if not f.startswith(("process ", "thread ("))]
        yield thread.split(": ", 1)[-1], functions, int(count)


def _line(frame: str) -> str:
    """':N' for a frame of _replay (which step of its loop), '' for the rest."""
    return ":" + frame.rsplit(":", 1)[-1].rstrip(")") if frame.startswith(REPLAY + " (") else ""


def summarise(path: Path, depth: int) -> dict[str, Counter]:
    tables = {name: Counter() for name in ("step", "leaf", "path", "workers")}
    for thread, frames, count in stacks(path):
        if thread.startswith(WORKERS):
            if frames and frames[-1] not in IDLE_LEAVES:
                tables["workers"][f"{thread.split('_')[0]}: " + " > ".join(frames[-3:])] += count
            continue
        replay = [i for i, f in enumerate(frames) if f.startswith(REPLAY + ":")]
        if thread != "MainThread" or not replay:
            continue
        below = frames[replay[-1] + 1:]
        tables["step"][f"{frames[replay[-1]]} {below[0] if below else '(own)'}"] += count
        tables["leaf"][frames[-1]] += count
        tables["path"][" > ".join(below[:depth]) or "(own)"] += count
    return tables


def render(tables: dict[str, Counter], top: int) -> str:
    lines = []
    total = sum(tables["step"].values())
    titles = {"step": "decoding thread under Decoder._replay, by step of its loop (line: call)",
              "leaf": "by innermost function", "path": "by path below _replay",
              "workers": "loader and reader threads, busy samples (idle waits left out)"}
    for name, title in titles.items():
        table = tables[name]
        base = total if name != "workers" else sum(table.values())
        lines.append(f"{title}: {sum(table.values())} samples")
        lines += [f"  {n:7d} {100 * n / max(1, base):5.1f}%  {key}" for key, n in table.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if not args.profile.is_file():
        print(f"spy-report: {args.profile}: no such file", file=sys.stderr)
        return 2
    tables = summarise(args.profile, args.depth)
    if not tables["step"]:
        print(f"spy-report: {args.profile}: no samples of Decoder._replay on the main thread", file=sys.stderr)
        return 2
    print(render(tables, args.top))
    return 0
