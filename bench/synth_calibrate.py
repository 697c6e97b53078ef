"""Calibrate the synthetic routers' spread against the demo model's routing on held-out text.

    python -m bench synth-calibrate --config qwen3-30b-a3b --layers 3 \
        --embed-std 0.02,0.5,1.0 --skew 0,0.5 [--windows 8] [--json FILE]

Builds the model of --config at its real dimensions (depth cut to --layers) on the CPU with
bench.synth_weights' weights, routes the demo's held-out text through it (the demo
tokenizer's ids, which every config's vocabulary contains), and prints, per spread and
beside the demo model on the same windows: the normalised routing entropy (load entropy /
log E, router.analytics), the overlap with the previous token's experts, and the LRU hit
rate of a per-layer cache of 25/50/75% of the layer's experts (bench.locality). The row
closest to the demo (squared differences of entropy and LRU curve) is marked; its spread is
what bench.synth_store uses by default.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch

from bench import _provenance
from bench.locality import consecutive_overlap, lru_hit_rate
from bench.synth_weights import Spread, expert_tensor, trunk_tensor

SHARES = (0.25, 0.5, 0.75)  # cache sizes as shares of a layer's experts
WINDOW = 512  # tokens per window: the demo model's context


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench synth-calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="qwen3-30b-a3b", help="a name in bench/configs or a config.json path")
    p.add_argument("--layers", type=int, default=3, help="decoder layers built (default 3)")
    p.add_argument("--embed-std", default="0.02,0.5,1.0", help="comma-separated values to try")
    p.add_argument("--skew", default="0,0.5", help="comma-separated values to try")
    p.add_argument("--gate-std", type=float, default=Spread.gate_std)
    p.add_argument("--windows", type=int, default=8, help=f"held-out windows of {WINDOW} tokens (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the rows here")
    return p.parse_args(argv)


def routing_stats(topk: torch.Tensor, num_experts: int) -> dict:
    """[L, T, K] -> mean over layers of normalised entropy, overlap and LRU hit rates at SHARES,
    and the same per layer under "layers"."""
    from router.analytics import routing_entropy

    rows = []
    for layer in topk:  # [T, K]
        row = {"entropy": routing_entropy(layer, num_experts) / math.log(num_experts),
               "overlap": consecutive_overlap(layer)}
        for share in SHARES:
            row[f"lru{int(share * 100)}"] = lru_hit_rate(layer, max(layer.shape[1], round(share * num_experts)))
        rows.append(row)
    return {**{key: sum(r[key] for r in rows) / len(rows) for key in rows[0]}, "layers": rows}


def distance(stats: dict, reference: dict) -> float:
    keys = ["entropy", *[f"lru{int(s * 100)}" for s in SHARES]]
    return sum((stats[k] - reference[k]) ** 2 for k in keys)


def demo_routing(windows: torch.Tensor) -> tuple[torch.Tensor, int]:
    from models.demo import CHECKPOINT_DIR
    from models.demo.analyze import load_model
    from models.demo.evaluate import route_topk

    model, _ = load_model(CHECKPOINT_DIR)
    return route_topk(model, windows), model.config.num_experts


def heldout(windows: int) -> torch.Tensor:
    from models.demo import CHECKPOINT_DIR, HELDOUT_TEST_TEXT
    from models.demo.analyze import heldout_windows
    from transformers import AutoTokenizer

    return heldout_windows(AutoTokenizer.from_pretrained(CHECKPOINT_DIR), HELDOUT_TEST_TEXT, WINDOW, windows)


def synthetic_model(config: dict, layers: int, vocab: int, seed: int):
    """The config's model at real width, `layers` deep, bf16 on the CPU, experts filled once."""
    from transformers import AutoModelForCausalLM

    from models.footprint import hf_config

    config = {**config, "num_hidden_layers": layers, "vocab_size": vocab}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(config), dtype=torch.bfloat16)
    model = model.to_empty(device="cpu").eval()
    _rebuild_rotary_buffers(model)
    init_std = getattr(model.config, "initializer_range", 0.02) or 0.02
    for name, module in model.named_modules():
        if name.endswith(".experts") and hasattr(module, "gate_up_proj"):
            _fill_experts(module, int(name.split(".")[-3]), seed, init_std, layers)
    return model


def _rebuild_rotary_buffers(model) -> None:
    """to_empty() leaves buffers uninitialised: recompute the rotary frequencies (garbage there
    makes every token's hidden state the same, and every token route alike)."""
    for module in model.modules():
        if hasattr(module, "inv_freq"):
            fresh = type(module)(config=getattr(module, "config", model.config.get_text_config()))
            with torch.no_grad():
                for name, buffer in fresh.named_buffers(recurse=False):
                    getattr(module, name).copy_(buffer)


def _fill_experts(module, layer: int, seed: int, init_std: float, layers: int) -> None:
    num_experts, two_inter, hidden = module.gate_up_proj.shape
    inter = two_inter // 2
    with torch.no_grad():
        for expert in range(num_experts):
            row = expert_tensor(layer, expert, inter, hidden, torch.bfloat16, seed=seed, init_std=init_std,
                                layers=layers)  # [3IH]
            module.gate_up_proj[expert].copy_(row[: 2 * inter * hidden].view(two_inter, hidden))  # gate rows first
            module.down_proj[expert].copy_(row[2 * inter * hidden:].view(hidden, inter))


def apply_spread(model, spread: Spread, seed: int, num_experts: int) -> None:
    """(Re)draw every trunk tensor for `spread` (experts stay as they are)."""
    init_std = getattr(model.config, "initializer_range", 0.02) or 0.02
    with torch.no_grad():
        for name, param in [*model.named_parameters(), *model.named_buffers()]:
            if ".experts." in name or name.endswith("inv_freq"):
                continue
            param.copy_(trunk_tensor(name, tuple(param.shape), param.dtype, seed=seed, spread=spread,
                                     init_std=init_std, num_experts=num_experts,
                                     layers=model.config.num_hidden_layers))


def route(model, windows: torch.Tensor, top_k: int) -> torch.Tensor:
    """[L, T, K] experts chosen by each router, read from the gates' own output (logits, weights, indices)."""
    picked: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, module in model.named_modules():
        if name.endswith("mlp.gate"):
            def hook(mod, args, out, name=name):
                logits = out[0] if isinstance(out, tuple) else out
                picked.setdefault(name, []).append(logits.float().topk(top_k, dim=-1).indices)
            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for window in windows:
                model.model(input_ids=window[None], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([torch.cat(chunks) for chunks in picked.values()])  # [L, T, K]


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from bench.synth_store import load_config

    try:
        config = load_config(args.config)
        grid = [Spread(embed_std=e, gate_std=args.gate_std, skew=s)
                for e, s in itertools.product(_floats(args.embed_std), _floats(args.skew))]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    windows = heldout(args.windows)
    demo_topk, demo_experts = demo_routing(windows)
    reference = routing_stats(demo_topk, demo_experts)
    started = time.perf_counter()
    model = synthetic_model(config, args.layers, vocab=int(windows.max()) + 1, seed=args.seed)
    num_experts = model.model.layers[-1].mlp.gate.weight.shape[0]
    top_k = model.config.num_experts_per_tok
    print(f"{args.config}: {args.layers} layers at real width, {num_experts} experts top-{top_k}; "
          f"{windows.numel():,} held-out tokens; built in {time.perf_counter() - started:.0f} s")
    rows = [{"system": "demo model", **reference, "distance": 0.0}]
    for spread in grid:
        apply_spread(model, spread, args.seed, num_experts)
        stats = routing_stats(route(model, windows, top_k), num_experts)
        rows.append({"system": f"embed_std={spread.embed_std} skew={spread.skew}", **spread.as_dict(), **stats,
                     "distance": distance(stats, reference)})
        print_row(rows[-1])
    best = min(rows[1:], key=lambda r: r["distance"])
    print_table(rows, best)
    print(f"per layer, {best['system']}: " + "; ".join(
        f"L{i} {r['entropy']:.3f} " + "/".join(f"{r[f'lru{int(s * 100)}']:.2f}" for s in SHARES)
        for i, r in enumerate(best["layers"])))
    if args.json:
        record = {**_provenance.header("synth-calibrate", argv), "config": args.config, "layers": args.layers,
                  "tokens": windows.numel(), "rows": rows, "best": best["system"]}
        args.json.write_text(json.dumps(record, indent=1))
    return 0


def print_row(row: dict) -> None:
    print(f"  {row['system']:<28} entropy {row['entropy']:.3f}  overlap {row['overlap']:.3f}  LRU "
          + " / ".join(f"{row[f'lru{int(s * 100)}']:.3f}" for s in SHARES) + f"  distance {row['distance']:.4f}",
          flush=True)


def print_table(rows: list[dict], best: dict) -> None:
    print("\nsystem                        entropy/logE  overlap  LRU 25% / 50% / 75% of E")
    for row in rows:
        mark = "  <- closest" if row is best else ""
        print(f"{row['system']:<30} {row['entropy']:.3f}        {row['overlap']:.3f}    "
              + " / ".join(f"{row[f'lru{int(s * 100)}']:.3f}" for s in SHARES) + mark)


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"{text!r}: expected comma-separated numbers") from None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
