"""Where a decoded token's time goes, from the profiler: compute, copies, host.

    python -m bench breakdown --model qwen3-30b-a3b-8l --device cuda --budget 0.25

Decodes --tokens greedy tokens with cadre's slot-cache decoder (CUDA graphs) and with
transformers' generate() over cadre's model (the eager path), under torch.profiler, and
prints per token: wall time, GPU kernel time (compute), host->device copy time (expert
loads), device->host copy time (write-backs into an exclusive host tier), and the rest of the
wall time, when the GPU neither computed nor copied (host work: Python, launches,
synchronisations). --decode-only profiles from the first token on: the prompt's prefill (which
at a capped budget streams most of each layer's experts through the slots) is left out.
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
    p.add_argument("--decode-only", action="store_true",
                   help="profile from the first token on, leaving the prompt's prefill out (with --no-eager)")
    p.add_argument("--prefetch", type=int, default=0, metavar="N",
                   help="speculative prefetch of the next N MoE layers' experts (RuntimeConfig.prefetch_layers)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.decode_only and not args.no_eager:
        p.error("--decode-only times the slot-cache decoder's steps only: add --no-eager")
    return args


def host_profile(generate, ids, tokens: int, top: int, decode_only: bool = False) -> None:
    """Where the host's time goes (Python and the CUDA calls it makes), by own time: the 'GPU
    idle' column says how much, this says in what. With `decode_only`, from the first token on."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    if decode_only:
        generate(ids, tokens, on_prefilled=lambda _logits: profiler.enable())
    else:
        profiler.enable()
        generate(ids, tokens)
    _sync()
    profiler.disable()
    what = f"the {tokens - 1} decode steps" if decode_only else f"one run of {tokens} tokens"
    print(f"\nhost time by function, {what} under cProfile (own time first):")
    pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(top)


def _sync() -> None:
    if torch.cuda.is_available():  # (the measure's windowing also runs in a CPU test)
        torch.cuda.synchronize()


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


def measure(generate, ids, tokens: int, loads, decode_only: bool = False) -> dict:
    """Per token: wall, compute, copies, write-backs and GPU idle of one profiled run, and the
    expert loads it made (`loads()`: the cache's count so far). With `decode_only` the profile
    starts at the first token (generate's on_prefilled), so the tokens after it are timed."""
    generate(ids, tokens)  # warm-up: captures, first loads
    _sync()
    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else []))
    begun = {}

    def begin(_logits=None) -> None:
        _sync()
        begun["loads"] = loads()
        prof.start()
        begun["at"] = time.perf_counter()

    if decode_only:
        generate(ids, tokens, on_prefilled=begin)
    else:
        begin()
        generate(ids, tokens)
    _sync()
    wall = time.perf_counter() - begun["at"]
    prof.stop()
    measured = tokens - 1 if decode_only else tokens
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    copy_kind = lambda e, kind: "memcpy" in e.name.lower() and kind in e.name.lower().replace(" ", "")
    kernels = busy_intervals(events, lambda e: "memcpy" not in e.name.lower() and "memset" not in e.name.lower())
    copies = busy_intervals(events, lambda e: copy_kind(e, "htod"))
    writebacks = busy_intervals(events, lambda e: copy_kind(e, "dtoh"))
    gpu_busy = union_length(sorted(kernels + copies + writebacks))
    us = 1e6 / measured  # microseconds per token
    return {"wall_us": wall * us, "compute_us": union_length(kernels) / 1e6 * us,
            "copy_us": union_length(copies) / 1e6 * us, "writeback_us": union_length(writebacks) / 1e6 * us,
            "idle_us": (wall - gpu_busy / 1e6) * us, "loads_per_token": (loads() - begun["loads"]) / measured}


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
    runtime = cadre_runtime(store, args.device, "bfloat16", args.budget, caps, max_len, batch=1,
                            prefetch_layers=args.prefetch)
    decoder = runtime.decoder(max_batch=1, max_len=max_len)
    eager = lambda ids, tokens: runtime.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens)
    share = runtime.cache.num_slots / len(all_experts(runtime.store))
    label = f"cadre {share:.0%} of experts" + (f" ({args.gpu_memory} GPU)" if args.gpu_memory else "") \
        + (f", prefetch {args.prefetch} layer" + "s" * (args.prefetch > 1) if args.prefetch else "")
    systems = [("slot-cache decoder (CUDA graphs)", decoder.generate)]
    if not args.no_eager:
        systems.append(("transformers generate() (eager)", eager))
    moe_layers = len(runtime.store.moe_layers)
    loads = lambda: sum(runtime.cache.stats().loads.values())
    rows = []
    for name, generate in systems:
        name += ", decode steps only" if args.decode_only else ""
        row = {"system": f"{label}, {name}", **measure(generate, ids, args.tokens, loads, args.decode_only)}
        row["idle_us_per_moe_layer"] = row["idle_us"] / moe_layers
        rows.append(row)
        if args.host_profile:
            host_profile(generate, ids, args.tokens, args.host_profile, args.decode_only)
    model = args.store or args.model
    timed = f"the {args.tokens - 1} tokens after the first" if args.decode_only else f"{args.tokens} tokens"
    print(f"\nper-token time, batch 1, {timed}, {model} ({moe_layers} MoE layers) on "
          f"{torch.cuda.get_device_name()}")
    print(f"{'system':<62} {'wall us':>9} {'compute':>9} {'copies':>9} {'writeback':>9} {'GPU idle':>9} "
          f"{'idle/layer':>10} {'loads/tok':>10}")
    for r in rows:
        print(f"{r['system']:<62} {r['wall_us']:>9.0f} {r['compute_us']:>9.0f} {r['copy_us']:>9.0f} "
              f"{r['writeback_us']:>9.0f} {r['idle_us']:>9.0f} {r['idle_us_per_moe_layer']:>10.0f} "
              f"{r['loads_per_token']:>10.2f}")
    if args.json:
        _provenance.write(args.json, "breakdown", argv, rows, load_before, budget=args.budget, tokens=args.tokens,
                          model=str(model), gpu_memory=args.gpu_memory, host_memory=args.host_memory,
                          decode_only=args.decode_only)
    runtime.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
