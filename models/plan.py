"""python -m models.plan SOURCE --gpu-memory 24GiB [...]: the memory plan for a store or a
config.json, printed as its one line; nothing is loaded or allocated (models/memory_plan.py)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Print the plan for a store or a config.json (a dry run: nothing is loaded or allocated).
    Sizes given in bytes or GiB plan for that device even on a machine without it."""
    import argparse
    import json
    import sys
    from pathlib import Path

    import torch

    from .footprint import facts_from_config, facts_from_store
    from .memory_plan import MemoryInfo, PlanRequest, device_memory, host_memory, plan_memory

    p = argparse.ArgumentParser(prog="python -m models.plan", description=main.__doc__)
    p.add_argument("source", help="an expert store directory or a config.json (e.g. bench/configs/qwen3-30b-a3b.json)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--gpu-memory", required=True)
    p.add_argument("--host-memory", default="32GiB")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--max-concurrency", type=int)
    p.add_argument("--server", action="store_true", help="the server's defaults: 16 slots, 512-token batches")
    p.add_argument("--slot-rows", action="store_true", help="the decoder engine: a whole KV row per request")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    try:
        source = Path(args.source)
        if source.is_dir():
            from extractor.store import ExpertStore

            facts = facts_from_store(ExpertStore.open(source), dtype)
        else:
            facts = facts_from_config(json.loads(source.read_text()), dtype)
        server = {"default_concurrency": 16, "max_batch_tokens": 512} if args.server else {}
        request = PlanRequest(device=args.device, gpu_memory=args.gpu_memory, host_memory=args.host_memory,
                              max_model_len=args.max_model_len, max_concurrency=args.max_concurrency,
                              slot_rows=args.slot_rows, **server)
        here = device_memory(args.device) if args.device == "cpu" or torch.cuda.is_available() else MemoryInfo(0, 0)
        plan = plan_memory(facts, request, here, host_memory())
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"python -m models.plan: {exc}", file=sys.stderr)
        return 2
    print(plan.describe())
    for note in plan.notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
