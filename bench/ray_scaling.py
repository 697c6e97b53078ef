"""Throughput of cadre on Ray Serve, one replica against N, each router, in one run:

    python -m bench ray_scaling --model qwen3-30b-a3b-8l --device cuda --replicas 2 --gpus-per-replica 1
    python -m bench ray_scaling --replicas 2 --clients 8 --max-tokens 16       # demo model, CPU (a smoke run)

The same workload as `python -m bench affinity` (four sources, each client sticking to one),
against 1 replica and then against --replicas replicas under each router; rows report
aggregate tok/s (and its ratio to the 1-replica row), p50/p99 latency, hit rate and loads
per token. --model qwen3-30b-a3b-8l is Qwen3-30B-A3B's shapes cut to 8 layers with random
weights (bench/decode.py builds it; no weights leave the machine), given the demo model's
tokenizer so that text prompts work; its store is extracted once before the replicas start.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from .affinity import (add_common_args, build_profile_for, chosen_routers, deploy, fmt, measure, result_record,
                       workload)
from .serve import free_port


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench ray_scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="demo, qwen3-30b-a3b-8l (random weights) or a checkpoint dir")
    p.add_argument("--dtype", default="bfloat16", help="of a built random checkpoint")
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("CADRE_CACHE_DIR") or "/tmp/cadre-bench"))
    add_common_args(p)
    p.set_defaults(clients=16, requests=128, warmup=32, max_tokens=32, profile_device=None)
    return p.parse_args(argv)


def prepare_store(args) -> str | None:
    """The store to serve (None: the demo model's, which the replicas build themselves)."""
    if args.model == "demo":
        return None
    import torch

    from extractor import extract_store

    from .decode import build_checkpoint

    checkpoint = build_checkpoint(args.model, args.workdir, args.device, getattr(torch, args.dtype))
    if not any((checkpoint / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")):
        from models.demo import CHECKPOINT_DIR

        for name in ("tokenizer.json", "tokenizer_config.json"):  # ids < 8192 fit any vocabulary here
            shutil.copy(CHECKPOINT_DIR / name, checkpoint / name)
    store = args.workdir / f"{checkpoint.name}-store"
    extract_store(checkpoint, store, quiet=True)
    return str(store)


def main(argv) -> int:
    args = parse_args(argv)
    routers = chosen_routers(args)
    if routers is None:
        return 2
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.store = prepare_store(args)
    args.profile_device = args.profile_device or args.device
    prompts, calibration = workload(args.prompt_chars)
    profile = build_profile_for(args, calibration, args.workdir) if "affinity" in routers else None
    from server.ray.cluster import start_local_cluster

    port = free_port()
    start_local_cluster(int(args.replicas * args.cpus_per_replica + 1.999),
                        num_gpus=int(args.replicas * args.gpus_per_replica + 0.999) or None)
    from ray import serve

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    load_before, rows = os.getloadavg()[0], []
    plan = [(1, routers[0])] + [(args.replicas, router) for router in routers]
    try:
        for replicas, router in plan:
            deploy(argparse.Namespace(**{**vars(args), "replicas": replicas}), router, profile, port)
            rows.append({"replicas": replicas, "router": router,
                         **measure(f"http://127.0.0.1:{port}", prompts, args)})
            print(f"  {replicas} replica(s), {router}: {rows[-1]['tok_s']:.1f} tok/s", file=sys.stderr)
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()
    one = rows[0]["tok_s"] or float("nan")
    description = (f"python -m bench ray_scaling: {args.model} on {args.device}, cache {args.cache_fraction:.0%} of "
                   f"experts, {args.clients} streaming clients over {len(prompts)} sources, {args.requests} requests "
                   f"per row after {args.warmup} warm-up, {args.max_tokens} new tokens, greedy; {os.cpu_count()} CPUs, "
                   f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"\n{description}")
    print(f"{'replicas':>8} {'router':>12} {'requests':>8} {'errors':>6} {'tok/s':>8} {'x 1 replica':>11} "
          f"{'p50 lat s':>9} {'p99 lat s':>9} {'hit rate':>8} {'loads/tok':>9}")
    for r in rows:
        print(f"{r['replicas']:>8} {r['router']:>12} {r['requests']:>8} {r['errors']:>6} {r['tok_s']:>8.1f} "
              f"{r['tok_s'] / one:>11.2f} {fmt(r['latency_p50'], '.2f'):>9} {fmt(r['latency_p99'], '.2f'):>9} "
              f"{fmt(r['hit_rate'], '.1%'):>8} {fmt(r['loads_per_token'], '.2f'):>9}")
    if args.json:
        import json

        summary = {f"{r['replicas']}x {r['router']}": r["tok_s"] / one for r in rows}
        record = result_record("ray_scaling", argv, rows, summary, description)
        args.json.write_text(json.dumps(record, indent=2))
    return 0 if all(r["errors_5xx"] == 0 for r in rows) else 1
