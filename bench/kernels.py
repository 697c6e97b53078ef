"""What a decoded token launches on the GPU: cadre's captured step beside transformers' compiled one.

    python -m bench kernels --model qwen3-30b-a3b-8l --workdir /tmp/bw

Decodes --tokens greedy tokens under torch.profiler with (1) transformers' static-cache
decode step compiled as gpt-fast does (the reference bench decode measures against) and
(2) cadre at 100% of experts, slot-cache decoder with the compiled step, both in this
process on the same checkpoint. Prints per token: kernels launched, GPU kernel time, wall
time, and the kernels that differ most in count or time between the two, so the gap
between the two rows of `bench decode` can be read kernel by kernel. Without the profiler
it also times the prefill (a generation of one token) and the decode steps apart (the rest
of a generation of --tokens, per token): bench decode's tok/s include one prefill each.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench import _provenance
from bench.decode import PROMPT_LEN, build_checkpoint, cadre_runtime, gptfast_generate, prompt_ids


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-30b-a3b-8l")
    p.add_argument("--impl", default="batched_mm", help="transformers' experts implementation for the reference")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--top", type=int, default=12, help="kernels listed")
    p.add_argument("--workdir", type=Path)
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def kernel_profile(generate, ids, tokens: int) -> dict:
    """Per token: wall µs, kernels, GPU kernel µs, and {kernel name: (count, µs)}."""
    for _ in range(2):  # warm-up: compile, captures, allocator
        generate(ids, tokens)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        generate(ids, tokens)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    per_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        entry = per_name[event.name[:90]]
        entry[0] += 1 / tokens
        entry[1] += event.device_time / tokens  # µs
    return {"wall_us": wall * 1e6 / tokens, "kernels": sum(c for c, _ in per_name.values()),
            "gpu_us": sum(t for _, t in per_name.values()), "by_kernel": {k: tuple(v) for k, v in per_name.items()}}


def prefill_and_step(generate, ids, tokens: int, repeats: int = 5) -> dict:
    """Median wall ms of a one-token generation (the prefill and its argmax) and µs per decode
    step (the rest of a --tokens generation, per token), unprofiled."""
    def timed(count):
        runs = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            generate(ids, count)
            torch.cuda.synchronize()
            runs.append(time.perf_counter() - start)
        return sorted(runs)[repeats // 2]
    one, full = timed(1), timed(tokens)
    return {"prefill_ms": one * 1e3, "step_us": (full - one) / (tokens - 1) * 1e6}


def print_diff(rows: dict[str, dict], top: int) -> None:
    (ref_name, ref), (cadre_name, cadre) = rows.items()
    print(f"\n{'system':<58} {'prefill ms':>10} {'step us':>8} {'wall us':>9} {'kernels':>8} {'GPU us':>9}")
    print(f"{'':<58} {'(unprofiled)':>19} {'(per token, profiled)':>28}")
    for name, row in rows.items():
        print(f"{name:<58} {row['prefill_ms']:>10.2f} {row['step_us']:>8.0f} {row['wall_us']:>9.0f} "
              f"{row['kernels']:>8.0f} {row['gpu_us']:>9.0f}")
    names = set(ref["by_kernel"]) | set(cadre["by_kernel"])
    diffs = sorted(names, key=lambda n: -abs(cadre["by_kernel"].get(n, (0, 0))[1] - ref["by_kernel"].get(n, (0, 0))[1]))
    print(f"\nkernels per token, most different GPU time first (reference = {ref_name})")
    print(f"{'kernel':<90} {'ref n':>6} {'ref us':>8} {'cadre n':>8} {'cadre us':>9}")
    for name in diffs[:top]:
        rn, rt = ref["by_kernel"].get(name, (0, 0.0))
        cn, ct = cadre["by_kernel"].get(name, (0, 0.0))
        print(f"{name:<90} {rn:>6.1f} {rt:>8.1f} {cn:>8.1f} {ct:>9.1f}")


def main(argv) -> int:
    args = parse_args(argv)
    load_before = _provenance.load_average()
    from transformers import AutoModelForCausalLM

    from extractor import extract_store

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cadre-bench-"))
    checkpoint = build_checkpoint(args.model, workdir, "cuda", torch.bfloat16)
    store = workdir / "store"
    if not (store / "manifest.json").exists():
        extract_store(checkpoint, store, quiet=True)
    config = json.loads((checkpoint / "config.json").read_text())
    ids = prompt_ids(config.get("vocab_size", 512), 1)
    max_len = PROMPT_LEN + args.tokens + 8
    rows = {}
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16,
                                                     experts_implementation=args.impl).to("cuda").eval()
    name = f"transformers {args.impl}, static cache, compiled decode step (gpt-fast)"
    generate = gptfast_generate(reference, max_len)
    rows[name] = kernel_profile(generate, ids.cuda(), args.tokens) | prefill_and_step(generate, ids.cuda(), args.tokens)
    del reference
    torch.cuda.empty_cache()
    runtime = cadre_runtime(store, "cuda", "bfloat16", 1.0, None, max_len, batch=1, compile_step=True)
    decoder = runtime.decoder(max_batch=1, max_len=max_len)
    rows["cadre 100% of experts, slot-cache decoder (CUDA graphs), compiled step"] = \
        kernel_profile(decoder.generate, ids, args.tokens) | prefill_and_step(decoder.generate, ids, args.tokens)
    runtime.close()
    print(f"\nbatch 1, {args.tokens} tokens, {args.model} on {torch.cuda.get_device_name()}")
    print_diff(rows, args.top)
    if args.json:
        _provenance.write(args.json, "kernels", argv, [{"system": n, **{k: v for k, v in r.items() if k != "by_kernel"},
                                                        "by_kernel": {k: list(v) for k, v in r["by_kernel"].items()}}
                                                       for n, r in rows.items()],
                          load_before, model=args.model, tokens=args.tokens, impl=args.impl)
    return 0
