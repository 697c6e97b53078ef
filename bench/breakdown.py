"""Where a decoded token's time goes, from the profiler: compute, copies, host.

    python -m bench breakdown --model qwen3-30b-a3b-8l --device cuda --budget 0.25

Decodes --tokens greedy tokens with cadre's slot-cache decoder (CUDA graphs) and with
transformers' generate() over cadre's model (the eager path), under torch.profiler, and
prints per token: wall time, GPU kernel time (compute), host->device copy time (expert
loads), device->host copy time (write-backs into an exclusive host tier), and the rest of the
wall time, when the GPU neither computed nor copied (host work: Python, launches,
synchronisations).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.decode import PROMPT_LEN, all_experts, build_checkpoint, cadre_runtime, prompt_ids
from bench import _provenance


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench breakdown", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-30b-a3b-8l")
    p.add_argument("--store", type=Path, help="an expert store instead of --model (python -m bench synth-store's)")
    p.add_argument("--gpu-memory", help="a device budget instead of --budget (the memory plan sizes the slots)")
    p.add_argument("--host-memory", help="with --gpu-memory: the pinned host tier's cap")
    p.add_argument("--no-eager", action="store_true", help="only the slot-cache decoder")
    p.add_argument("--device", default="cuda")
    p.add_argument("--budget", type=float, default=0.25, help="cadre cache budget as a fraction of all experts")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--workdir", type=Path)
    p.add_argument("--host-profile", type=int, default=0, metavar="N",
                   help="then decode once more under cProfile and print the N functions with the most host time")
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def host_profile(generate, ids, tokens: int, top: int) -> None:
    """Where the host's time goes (Python and the CUDA calls it makes), by own time: the 'GPU
    idle' column says how much, this says in what."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    generate(ids, tokens)
    torch.cuda.synchronize()
    profiler.disable()
    print(f"\nhost time by function, one run of {tokens} tokens under cProfile (own time first):")
    pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(top)


def busy_intervals(events, predicate) -> list[tuple[float, float]]:
    return sorted((e.time_range.start, e.time_range.end) for e in events if predicate(e))


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in intervals:
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def measure(generate, ids, tokens: int) -> dict:
    generate(ids, tokens)  # warm-up: captures, first loads
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        generate(ids, tokens)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    copy_kind = lambda e, kind: "memcpy" in e.name.lower() and kind in e.name.lower().replace(" ", "")
    kernels = busy_intervals(events, lambda e: "memcpy" not in e.name.lower() and "memset" not in e.name.lower())
    copies = busy_intervals(events, lambda e: copy_kind(e, "htod"))
    writebacks = busy_intervals(events, lambda e: copy_kind(e, "dtoh"))
    gpu_busy = union_length(sorted(kernels + copies + writebacks))
    us = 1e6 / tokens  # microseconds per token
    return {"wall_us": wall * us, "compute_us": union_length(kernels) / 1e6 * us,
            "copy_us": union_length(copies) / 1e6 * us, "writeback_us": union_length(writebacks) / 1e6 * us,
            "idle_us": (wall - gpu_busy / 1e6) * us}


def main(argv) -> int:
    args = parse_args(argv)
    load_before = _provenance.load_average()
    from extractor import extract_store

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cadre-bench-"))
    if args.store:
        checkpoint = store = args.store
    else:
        checkpoint = build_checkpoint(args.model, workdir, args.device, torch.bfloat16)
        store = workdir / "store"
        extract_store(checkpoint, store, quiet=True)
    config = json.loads((checkpoint / "config.json").read_text())
    ids = prompt_ids(config.get("vocab_size", 512), 1)
    max_len = PROMPT_LEN + args.tokens + 8
    caps = (args.gpu_memory, args.host_memory) if args.gpu_memory else None
    runtime = cadre_runtime(store, args.device, "bfloat16", args.budget, caps, max_len, batch=1)
    decoder = runtime.decoder(max_batch=1, max_len=max_len)
    eager = lambda ids, tokens: runtime.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens)
    share = runtime.cache.num_slots / len(all_experts(runtime.store))
    label = f"cadre {share:.0%} of experts" + (f" ({args.gpu_memory} GPU)" if args.gpu_memory else "")
    systems = [("slot-cache decoder (CUDA graphs)", decoder.generate)]
    if not args.no_eager:
        systems.append(("transformers generate() (eager)", eager))
    moe_layers = len(runtime.store.moe_layers)
    rows = []
    for name, generate in systems:
        before = runtime.cache.stats()
        row = {"system": f"{label}, {name}", **measure(generate, ids, args.tokens)}
        after = runtime.cache.stats()
        row["loads_per_token"] = (sum(after.loads.values()) - sum(before.loads.values())) / (2 * args.tokens)
        row["idle_us_per_moe_layer"] = row["idle_us"] / moe_layers
        rows.append(row)
        if args.host_profile:
            host_profile(generate, ids, args.tokens, args.host_profile)
    model = args.store or args.model
    print(f"\nper-token time, batch 1, {args.tokens} tokens, {model} ({moe_layers} MoE layers) on "
          f"{torch.cuda.get_device_name()}")
    print(f"{'system':<62} {'wall us':>9} {'compute':>9} {'copies':>9} {'writeback':>9} {'GPU idle':>9} "
          f"{'idle/layer':>10} {'loads/tok':>10}")
    for r in rows:
        print(f"{r['system']:<62} {r['wall_us']:>9.0f} {r['compute_us']:>9.0f} {r['copy_us']:>9.0f} "
              f"{r['writeback_us']:>9.0f} {r['idle_us']:>9.0f} {r['idle_us_per_moe_layer']:>10.0f} "
              f"{r['loads_per_token']:>10.2f}")
    if args.json:
        _provenance.write(args.json, "breakdown", argv, rows, load_before, budget=args.budget, tokens=args.tokens,
                          model=str(model), gpu_memory=args.gpu_memory, host_memory=args.host_memory)
    runtime.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
