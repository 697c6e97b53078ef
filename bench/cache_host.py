"""The expert cache's host time per MoE layer of a decode step, by eviction policy, at full depth's
geometry (python -m bench cache-host):

    python -m bench cache-host [--layers 48 --experts 128 --top-k 8 --batches 1,16] [--json FILE]

A tiny Qwen3-MoE checkpoint of Qwen3-30B-A3B's expert geometry (48 MoE layers of 128 experts,
top-8) with tiny experts, so the copies cost next to nothing and what is timed is the cache's own
work: the slots (37% of the experts, as 24 GiB holds of Qwen3-30B-A3B) and an exclusive host tier
(55%) with the spare slots a GPU keeps free, driven the way a replayed decode step drives them
(each layer in turn pins its batch's choice with force=True, releases it, and flushes the write-
backs). On the CPU, so no CUDA call is timed: this is the Python and locking a GPU's decoding
thread pays on top of its CUDA calls. Routing is uniform at random, as the synthetic stores' nearly
is (routing entropy 0.945). Each policy is timed on the same choices; LRU is the reference."""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

from bench import _provenance


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench cache-host", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--batches", default="1,16", help="decode batch sizes (comma-separated)")
    p.add_argument("--slots", type=float, default=0.37, help="device slots, as a fraction of all experts")
    p.add_argument("--host", type=float, default=0.55,
                   help="host tier entries, as a fraction of all experts (1: a tier that holds the store, as beside "
                        "bench decode's fraction rows)")
    p.add_argument("--steps", type=int, default=30, help="timed decode steps per row (after as many warm-up steps)")
    p.add_argument("--policies", default="lru,layer-lru")
    p.add_argument("--workdir", type=Path, default=None, help="where the tiny checkpoint and store go (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def build_store(workdir: Path, layers: int, experts: int, top_k: int) -> Path:
    """A tiny random Qwen3-MoE of this geometry, extracted (reused when already there)."""
    store = workdir / f"store-{layers}x{experts}"
    if not (store / "manifest.json").exists():
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        from extractor import extract_store

        config = Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                                num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                num_experts=experts, num_experts_per_tok=top_k, max_position_embeddings=64)
        checkpoint = workdir / f"checkpoint-{layers}x{experts}"
        Qwen3MoeForCausalLM(config).save_pretrained(checkpoint)
        extract_store(checkpoint, store, experts="all", quiet=True)
    return store


def measure(store_path: Path, policy: str, batch: int, args) -> dict:
    from extractor.store import ExpertStore
    from models.cache import ExpertCache, host_entry_bytes, slot_bytes
    from models.runtime import eviction_class

    store = ExpertStore.open(store_path)
    total = len(store.moe_layers) * store.num_experts
    cache = ExpertCache(store, capacity_bytes=int(args.slots * total) * slot_bytes(store, store.dtype),
                        host_capacity_bytes=None if args.host >= 1 else int(args.host * total) * host_entry_bytes(
                            store, store.dtype),  # >= 1: uncapped (a capped tier rounds to whole chunks)
                        host_tier=True, policy=eviction_class(policy)())
    if cache.exclusive:  # as ExpertCache keeps them beside a GPU's write-back stream (a tier that holds the store has none)
        cache._spare_slots = min(64, cache.num_slots // 32)
    rng = random.Random(0)
    width = min(store.num_experts, batch * store.top_k)

    def step():
        for layer in store.moe_layers:
            chosen = {e for _ in range(batch) for e in rng.sample(range(store.num_experts), store.top_k)}
            lease = cache.acquire(layer, sorted(chosen), force=True, defer_writebacks=True)
            cache.release(lease)
            cache.flush_writebacks()

    try:
        for _ in range(args.steps):
            step()
        before, started = cache.stats(), time.perf_counter()
        for _ in range(args.steps):
            step()
        seconds = time.perf_counter() - started
        after = cache.stats()
    finally:
        cache.close()
    layer_steps = args.steps * len(store.moe_layers)
    loads = sum(after.loads.values()) - sum(before.loads.values())
    queries = after.queries - before.queries
    return {"system": f"{policy}, batch {batch}", "policy": policy, "batch": batch, "max_distinct": width,
            "slots": cache.num_slots, "experts": total, "exclusive": cache.exclusive,
            "us_per_layer": 1e6 * seconds / layer_steps,
            "us_per_load": 1e6 * seconds / max(1, loads), "loads_per_layer": loads / layer_steps,
            "hit_rate": (after.hits - before.hits) / queries if queries else 0.0}


def main(argv) -> int:
    args = parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b]
    policies = [p for p in args.policies.split(",") if p]
    from models.runtime import eviction_class

    try:
        for policy in policies:
            eviction_class(policy)
    except ValueError as exc:
        print(f"error: --policies: {exc}", file=sys.stderr)
        return 2
    load_before = _provenance.load_average()
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        store = build_store(workdir, args.layers, args.experts, args.top_k)
        rows = [measure(store, policy, batch, args) for batch in batches for policy in policies]
    print(f"\ncache host time, {args.layers} layers x {args.experts} experts, top-{args.top_k}; slots "
          f"{rows[0]['slots']} of {rows[0]['experts']}, host tier {args.host:.0%} of the experts"
          f"{' (exclusive)' if rows[0]['exclusive'] else ''}; {args.steps} decode steps a row")
    print(f"{'policy, batch':<22} {'us / layer':>10} {'us / load':>10} {'loads / layer':>13} {'hit rate':>8}")
    for r in rows:
        print(f"{r['system']:<22} {r['us_per_layer']:>10.0f} {r['us_per_load']:>10.1f} {r['loads_per_layer']:>13.1f} "
              f"{r['hit_rate']:>8.1%}")
    if args.json:
        _provenance.write(args.json, "cache-host", argv, rows, load_before, layers=args.layers, experts=args.experts,
                          top_k=args.top_k, steps=args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
