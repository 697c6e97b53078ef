"""python -m models --store STORE --prompt "..." : one generation from the shell, with cache figures."""

from __future__ import annotations

import argparse
import sys
import time

from extractor.store import StoreError


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m models",
        description="Generate from an expert store through cadre's expert cache.",
        epilog='example: python -m models --store ./store --prompt "ROMEO:" --max-new-tokens 48 --cache-fraction 0.25',
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--store", help="expert store directory (made by python -m extractor)")
    source.add_argument("--model", help="checkpoint directory or Hub id org/name[@revision]: extracted into the "
                        "store cache ($CADRE_CACHE_DIR, default ~/.cache/cadre) first")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="tokens to generate (default 48)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--cache-bytes", type=int, help="expert cache budget in bytes")
    budget.add_argument("--cache-fraction", type=float, help="expert cache budget as a fraction of all experts")
    parser.add_argument("--gpu-memory", help="device memory budget: bytes, 24GiB, or a fraction of free memory "
                        "such as 0.9 (default: free memory less a safety margin; on CPU 70%% of available RAM)")
    parser.add_argument("--host-memory", help="pinned host tier budget on a GPU: bytes, 32GiB or a fraction of "
                        "available RAM (default: half of the available RAM)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="compute dtype (default: the store's)")
    parser.add_argument("--full-depth", action="store_true", help="a miss also prefetches the expert's deeper layers")
    parser.add_argument("--routing", default="exact", help="routing policy: exact (default), cache-aware, dynamic-k")
    parser.add_argument("--eviction", default="lru",
                        help="lru (default), layer-lru (per-layer shares: batches larger than the budget) or salience")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from models import Runtime, RuntimeConfig

    try:
        config = RuntimeConfig(device=args.device, dtype=args.dtype, cache_bytes=args.cache_bytes,
                               cache_fraction=args.cache_fraction, full_depth=args.full_depth,
                               routing=args.routing, eviction=args.eviction, gpu_memory=args.gpu_memory,
                               host_memory=args.host_memory)
        if args.store:  # both plan before loading: a PlanError is a ValueError
            runtime = Runtime.from_store(args.store, config)
        else:
            runtime = Runtime.from_checkpoint(args.model, config)
    except (StoreError, ValueError) as exc:
        print(f"python -m models: {exc}", file=sys.stderr)
        return 2
    if runtime.tokenizer is None:
        print(f"python -m models: {args.store or args.model}: store has no tokenizer to encode --prompt with",
              file=sys.stderr)
        runtime.close()
        return 2
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {}
    started = time.perf_counter()
    ids = runtime.generate(args.prompt, max_new_tokens=args.max_new_tokens, **sampling)
    seconds = time.perf_counter() - started
    print(runtime.plan.describe(), file=sys.stderr)
    print(runtime.tokenizer.decode(ids[0], skip_special_tokens=True))
    stats = runtime.cache.stats()
    new_tokens = ids.shape[1] - len(runtime.tokenizer(args.prompt).input_ids)
    print(f"[{new_tokens} tokens in {seconds:.2f}s, {new_tokens / seconds:.1f} tok/s; cache hit rate "
          f"{stats.hit_rate:.1%}, {sum(stats.loads.values())} loads, {stats.bytes / 2**20:.1f}/"
          f"{stats.capacity_bytes / 2**20:.1f} MiB]", file=sys.stderr)
    runtime.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
