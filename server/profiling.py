"""A sampling profiler of the server's own threads, behind `--enable-profiling`:
`POST /debug/profile?seconds=10` returns where every thread was, as collapsed stacks (one line
a stack, root first, frames `file:function:line` joined by `;`, then its sample count: the input
of flamegraph.pl and speedscope), the way Go's pprof endpoint or vLLM's `/start_profile` let an
operator look inside a live server.

A thread of this module reads `sys._current_frames()` at `interval`. It needs the GIL to do so,
so a sample lands when the sampled threads let go of it (a CUDA wait, I/O, a C call that
releases it); a thread that holds the GIL throughout is seen at its release points. An
external sampler (py-spy) has no such bias but needs ptrace, which containers often refuse.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import Counter

MAX_SECONDS = 60.0


def sample_stacks(seconds: float, interval: float = 0.005) -> Counter:
    """Collapsed stacks of every other thread, sampled every `interval` for `seconds`."""
    me = threading.get_ident()
    stacks: Counter = Counter()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        names = {t.ident: t.name for t in threading.enumerate()}
        for ident, frame in sys._current_frames().items():
            if ident != me:
                stacks[_collapsed(names.get(ident, f"thread {ident}"), frame)] += 1
        time.sleep(interval)
    return stacks


def _collapsed(thread: str, frame) -> str:
    frames = []
    while frame is not None:
        code = frame.f_code
        frames.append(f"{_short(code.co_filename)}:{code.co_name}:{frame.f_lineno}")
        frame = frame.f_back
    return ";".join([thread, *reversed(frames)])


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_STDLIB = os.path.dirname(os.__file__) + os.sep


def _short(path: str) -> str:
    """A path from its package on: site-packages/torch/... -> torch/..., the standard library's
    and this repository's from their roots."""
    for marker in ("site-packages" + os.sep, "dist-packages" + os.sep):
        if marker in path:
            return path.split(marker, 1)[1]
    for root in (_ROOT, _STDLIB):
        if path.startswith(root):
            return path[len(root):]
    return path


def render(stacks: Counter) -> str:
    return "".join(f"{stack} {count}\n" for stack, count in stacks.most_common())
