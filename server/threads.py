"""Torch work off the event loop, in threads that end with it."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor


async def in_passing_thread(fn, *args, torch_threads: int | None = None):
    """fn(*args) in a thread of its own that ends with it, off the event loop.

    Why not asyncio.to_thread: a long-lived thread that has run a parallel torch op keeps
    an OpenMP team alive, and with more OpenMP threads alive than cores every team waits
    by sleeping instead of spinning: one GET /v1/experts on the event loop cut the demo
    model's 16-client throughput from ~600 to ~240 tok/s for good (2-core VM). A thread
    that ends takes its team with it; torch_threads=1 keeps it from making one at all.
    """
    def call():
        if torch_threads is not None:
            import torch

            torch.set_num_threads(torch_threads)  # this thread's OpenMP setting only
        return fn(*args)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cadre-aside") as pool:
        return await asyncio.wrap_future(pool.submit(call))
