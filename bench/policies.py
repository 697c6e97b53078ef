"""Eviction and prefetch policies against LRU, on the demo model decoding held-out text.

    python -m bench policies [--tokens 128] [--budgets 0.125,0.25,0.5] [--batch 1] [--json F]

Every run decodes the same held-out tokens one forward per token (teacher forcing, KV
cache on), from a cold cache, with exact routing, so every run produces the same logits
and only the cache's behaviour differs. `--batch B` decodes B held-out streams side by
side, as a server's batch does (each forward routes B tokens). For each budget (share of
all experts resident) and each eviction policy (lru, salience, layer-lru), without and
with speculative prefetch (the next MoE layer's gate applied to this layer's hidden
state, widened by Surprise):
  hit rate          demand queries served by a resident expert (prefetched ones count)
  loads/token       experts copied into the cache per decoded token (demand + prefetch)
  MB moved/token    loads x expert bytes
  tokens/s          decoded tokens (all streams) per second of wall clock (CPU here: loads are safetensors reads)
  prefetch precision  prefetched experts later used / prefetches issued
  prefetch recall     demand fetches covered by a prefetch / all demand fetches that were not plain hits
The reference row is transformers with every expert in memory, decoding the same tokens.
A second table isolates Surprise: at 25% with lru, prefetch never widened, widened by 2
experts when the router shift passes its threshold, and always widened.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench import _provenance

DTYPE = "float32"
WIDENING = {  # ExactPolicy prefetch settings: how Surprise widens the predicted set
    "top-k only": {"widen": 0},
    "top-k + 2 when Surprise > 0.5": {"widen": 2, "surprise_threshold": 0.5},
    "top-k + 2 always": {"widen": 2, "surprise_threshold": float("-inf")},
}


@dataclass
class Result:
    batch: int
    budget: float
    eviction: str
    prefetch: bool
    hit_rate: float
    loads_per_token: float
    mb_per_token: float
    tokens_per_s: float
    precision: float | None
    recall: float | None


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench policies", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128, help="held-out tokens to decode per run (default 128)")
    parser.add_argument("--budgets", default="0.125,0.25,0.5", help="cache budgets, shares of all experts")
    parser.add_argument("--batch", type=int, default=1, help="held-out streams decoded side by side (default 1)")
    parser.add_argument("--evictions", default="lru,salience,layer-lru", help="eviction policies to compare")
    parser.add_argument("--store", type=Path, default=Path(".cache/bench/quality/store-all"),
                        help="demo store with every expert (built if missing)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--json", type=Path, help="write the results as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv or [])
    load_before = _provenance.load_average()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from extractor import extract_store
    from models.demo import CHECKPOINT_DIR, HELDOUT_TEST_TEXT

    extract_store(CHECKPOINT_DIR, args.store, quiet=True)
    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT_DIR)
    text = tokenizer(HELDOUT_TEST_TEXT.read_text(), return_tensors="pt").input_ids[0]
    starts = [2000 + i * args.tokens for i in range(args.batch)]
    if starts[-1] + args.tokens > text.numel():
        raise SystemExit(f"held-out text has {text.numel()} tokens: too few for --batch {args.batch} x {args.tokens}")
    ids = torch.stack([text[start: start + args.tokens] for start in starts]).to(args.device)  # [B,T]
    reference = AutoModelForCausalLM.from_pretrained(CHECKPOINT_DIR, dtype=torch.float32).to(args.device).eval()
    ref_seconds = decode(reference, ids)
    print(f"reference: transformers, every expert in memory: {ids.numel() / ref_seconds:.1f} tokens/s "
          f"({args.batch} x {args.tokens} tokens)")
    results = []
    for budget in map(float, args.budgets.split(",")):
        for eviction in args.evictions.split(","):
            for prefetch in (False, True):
                results.append(run(args.store, ids, budget, eviction, prefetch, args.device))
                print_result(results[-1])
    print_table(results, ids.numel() / ref_seconds)
    widening = {name: run(args.store, ids, 0.25, "lru", True, args.device, **settings)
                for name, settings in WIDENING.items()}
    print("\nSurprise-widened prefetch, 25% budget, lru:\n| prefetch width | hit rate | loads/token | precision | recall |")
    print("|---|---|---|---|---|")
    for name, r in widening.items():
        print(f"| {name} | {r.hit_rate:.2%} | {r.loads_per_token:.2f} | {r.precision:.1%} | {r.recall:.1%} |")
    if args.json:
        _provenance.write(args.json, "policies", argv or [], [asdict(r) for r in results], load_before,
                          tokens=args.tokens, batch=args.batch, reference_tokens_per_s=ids.numel() / ref_seconds,
                          widening=[{"name": n, **asdict(r)} for n, r in widening.items()])
    return 0


@torch.inference_mode()
def decode(model, ids: torch.Tensor) -> float:
    """Seconds to run `ids` [B,T] through `model` one position per forward, with the KV cache."""
    from models.loading import cache_keyword, cache_of

    past = None
    started = time.perf_counter()
    for t in range(ids.shape[1]):
        out = model(input_ids=ids[:, t: t + 1], use_cache=True, **{cache_keyword(model): past})
        past = cache_of(out)
        out.logits[:, -1].argmax(-1).tolist()  # a decoder reads its tokens every step: include the sync
    return time.perf_counter() - started


def run(store: Path, ids: torch.Tensor, budget: float, eviction: str, prefetch: bool, device: str,
        **prefetch_settings) -> Result:
    from models import Runtime, RuntimeConfig
    from router.policy import ExactPolicy

    policy = ExactPolicy(prefetch_layers=1, **(prefetch_settings or {"widen": 2})) if prefetch else ExactPolicy()
    runtime = Runtime.from_store(store, RuntimeConfig(device=device, dtype=DTYPE, cache_fraction=budget,
                                                     eviction=eviction),
                                 policy=policy)
    outcomes = {"hit": 0, "miss": 0, "prefetched": 0}

    def count(event):
        for outcome in event.outcomes.values():
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

    runtime.add_routing_listener(count)
    seconds = decode(runtime.model, ids)  # includes waiting for every load: outputs are read each step
    stats, tokens = runtime.cache.stats(), ids.numel()
    runtime.close()
    loads = sum(stats.loads.values())
    issued = stats.prefetch["issued"]
    not_hits = outcomes["prefetched"] + outcomes["miss"]
    return Result(ids.shape[0], budget, eviction, prefetch, stats.hit_rate, loads / tokens,
                  loads * runtime.cache.slot_bytes / tokens / 1e6, tokens / seconds,
                  stats.prefetch["used"] / issued if prefetch and issued else None,
                  outcomes["prefetched"] / not_hits if prefetch and not_hits else None)


def print_result(r: Result) -> None:
    print(f"  batch {r.batch} {r.budget:.1%} {r.eviction:9s} prefetch={'on ' if r.prefetch else 'off'}: hit rate {r.hit_rate:.2%}, "
          f"{r.loads_per_token:.2f} loads/token, {r.tokens_per_s:.1f} tokens/s", flush=True)


def print_table(results: list[Result], ref_tps: float) -> None:
    def pct(value):
        return "-" if value is None else f"{value:.1%}"

    print(f"\nbatch {results[0].batch}; reference: transformers, every expert in memory: {ref_tps:.1f} tokens/s")
    print("| budget | eviction | prefetch | hit rate | loads/token | MB moved/token | tokens/s | prefetch precision "
          "| prefetch recall |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r.budget:.1%} | {r.eviction} | {'speculative' if r.prefetch else 'off'} | {r.hit_rate:.2%} | "
              f"{r.loads_per_token:.2f} | {r.mb_per_token:.3f} | {r.tokens_per_s:.1f} | {pct(r.precision)} | "
              f"{pct(r.recall)} |")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
