"""Routing locality of the demo model on held-out text, against uniform random routing.

    python -m bench locality [--max-windows N] [--capacities 8,16,24] [--json FILE]

For every MoE layer, on the held-out test plays (tokens in text order, routed by the
model's own top-k through transformers):
- overlap: the share of a token's top-k that was also in the previous token's top-k;
- LRU hit rate of a per-layer cache of C experts (a token's k experts are looked up
  against the cache as the previous token left it, then become most recent);
- the same for uniform random routing, analytically (overlap k/E, hit rate C/E: with every
  expert equally likely and requests independent of the cache, any full cache of C hits
  C/E) and simulated with a fixed seed as a check;
- "static": hit rate of the C experts with the highest load on this very text, a cache
  that knows the popularity in advance but uses no recency; LRU beating it means the
  routing has temporal locality, not only skew.
A causal model routes a token the same whether it is decoded or scored in a batch, so this
is the routing a decode of this text would present to the cache.
"""

from __future__ import annotations

import argparse
import sys
from collections import OrderedDict
from pathlib import Path

import torch
from transformers import AutoConfig

from bench import _provenance

# Legend: T tokens, K experts per token, E experts per layer, L MoE layers, C cache capacity.


def consecutive_overlap(topk: torch.Tensor) -> float:
    """[T, K] -> mean share of token t's experts that token t-1 also used."""
    shared = (topk[1:, :, None] == topk[:-1, None, :]).any(dim=-1)  # [T-1, K]
    return shared.float().mean().item()


def lru_hit_rate(topk: torch.Tensor, capacity: int) -> float:
    """[T, K] -> hits / lookups of an LRU cache of `capacity` experts (cold start included)."""
    assert capacity >= topk.shape[1], "a token's experts must fit in the cache together"
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for experts in topk.tolist():
        hits += sum(expert in cache for expert in experts)  # looked up before this token's inserts
        for expert in experts:
            cache[expert] = None
            cache.move_to_end(expert)
        while len(cache) > capacity:
            cache.popitem(last=False)
    return hits / topk.numel()


def static_hit_rate(topk: torch.Tensor, num_experts: int, capacity: int) -> float:
    """[T, K] -> hit rate of a fixed cache holding the `capacity` most used experts of this text."""
    counts = torch.bincount(topk.flatten(), minlength=num_experts)  # [E]
    return counts.topk(capacity).values.sum().item() / counts.sum().item()


def uniform_random_topk(num_tokens: int, num_experts: int, top_k: int, seed: int) -> torch.Tensor:
    """[T, K]: each token a uniformly random set of k distinct experts."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(num_tokens, num_experts, generator=generator).topk(top_k, dim=-1).indices  # [T, K]


def measure(topk: torch.Tensor, num_experts: int, capacities: list[int], seed: int) -> list[dict]:
    """[L, T, K] routing -> one row per layer: model, random (simulated) and analytic figures."""
    num_layers, num_tokens, top_k = topk.shape
    rows = []
    for layer in range(num_layers):
        random_topk = uniform_random_topk(num_tokens, num_experts, top_k, seed + layer)
        row = {
            "layer": layer,
            "overlap": consecutive_overlap(topk[layer]),
            "overlap_random": consecutive_overlap(random_topk),
            "overlap_analytic": top_k / num_experts,
        }
        for capacity in capacities:
            row[f"lru{capacity}"] = lru_hit_rate(topk[layer], capacity)
            row[f"lru{capacity}_random"] = lru_hit_rate(random_topk, capacity)
            row[f"lru{capacity}_analytic"] = capacity / num_experts
            row[f"static{capacity}"] = static_hit_rate(topk[layer], num_experts, capacity)
        rows.append(row)
    return rows


def mean_row(rows: list[dict]) -> dict:
    keys = [key for key in rows[0] if key != "layer"]
    return {"layer": "mean", **{key: sum(row[key] for row in rows) / len(rows) for key in keys}}


def print_table(rows: list[dict], capacities: list[int]) -> None:
    header = "layer  overlap (random sim/analytic)" + "".join(
        f" | LRU C={c}: model  random sim/analytic  static" for c in capacities)
    print(header)
    for row in rows + [mean_row(rows)]:
        line = f"{str(row['layer']):>5}  {row['overlap']:.3f} ({row['overlap_random']:.3f}/{row['overlap_analytic']:.3f})"
        for c in capacities:
            line += (f" | {row[f'lru{c}']:.3f}  {row[f'lru{c}_random']:.3f}/{row[f'lru{c}_analytic']:.3f}"
                     f"  {row[f'static{c}']:.3f}")
        print(line)


def parse_args(argv):
    from models.demo import CHECKPOINT_DIR, HELDOUT_TEST_TEXT

    parser = argparse.ArgumentParser(prog="python -m bench locality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT_DIR)
    parser.add_argument("--text", type=Path, default=HELDOUT_TEST_TEXT)
    parser.add_argument("--max-windows", type=int, default=None, help="at most this many 512-token windows")
    parser.add_argument("--capacities", default="8,16,24", help="per-layer LRU cache sizes, in experts")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated random routing")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    load_before = _provenance.load_average()
    from models.demo.analyze import heldout_windows, load_model
    from models.demo.evaluate import route_topk

    for path in (args.checkpoint / "config.json", args.text):
        if not path.is_file():
            print(f"error: {path}: no such file", file=sys.stderr)
            return 2
    try:
        capacities = [int(c) for c in args.capacities.split(",")]
    except ValueError:
        print(f"error: --capacities {args.capacities!r}: expected integers like 8,16,24", file=sys.stderr)
        return 2
    config = AutoConfig.from_pretrained(args.checkpoint)
    num_experts, top_k = config.num_experts, config.num_experts_per_tok
    if not all(top_k <= c <= num_experts for c in capacities):
        print(f"error: --capacities {args.capacities}: each must be in [{top_k}, {num_experts}]", file=sys.stderr)
        return 2
    model, tokenizer = load_model(args.checkpoint)
    windows = heldout_windows(tokenizer, args.text, model.config.max_position_embeddings, args.max_windows)
    topk = route_topk(model, windows)  # [L, T, K]
    print(f"{args.checkpoint.name}: {topk.shape[0]} MoE layers, top-{top_k} of {num_experts}; "
          f"{topk.shape[1]:,} held-out tokens of {args.text.name}; random routing seed {args.seed}")
    rows = measure(topk, num_experts, capacities, args.seed)
    print_table(rows, capacities)
    if args.json:
        _provenance.write(args.json, "locality", argv, rows + [mean_row(rows)], load_before, tokens=topk.shape[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
