"""Held-out analysis of the shipped demo model: loss, expert utilisation, greedy samples.

    python -m models.demo.analyze [--out models/demo]

Runs the checkpoint through transformers on the held-out test plays, writes
OUT/expert_usage.png (share of each layer's top-k slots per expert, layer x expert) and
OUT/analysis.json, and prints the per-layer load table and the samples.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from . import CHECKPOINT_DIR, HELDOUT_TEST_TEXT
from .evaluate import expert_load, greedy_samples, heldout_pass, perplexity, token_windows


def load_model(checkpoint: Path):
    """The checkpoint in float32 (CPU matmuls are faster and exact enough in fp32), eval mode."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(checkpoint)


def heldout_windows(tokenizer, text_path: Path, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    ids = torch.tensor(tokenizer(text_path.read_text(encoding="utf-8")).input_ids)  # [T]
    return token_windows(ids, seq_len, max_windows)  # [W, S]


def usage_table(load: torch.Tensor) -> list[dict]:
    """Per layer: experts used, and the least and most loaded expert as multiples of uniform."""
    num_experts = load.shape[1]
    rows = []
    for layer, shares in enumerate(load):  # shares: [E]
        rows.append({
            "layer": layer,
            "experts_used": int((shares > 0).sum()),
            "min_load": float(shares.min() * num_experts),
            "max_load": float(shares.max() * num_experts),
            "max_over_min": float(shares.max() / shares.min()) if shares.min() > 0 else float("inf"),
        })
    return rows


def plot_usage(load: torch.Tensor, path: Path, tokens: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_layers, num_experts = load.shape
    fig, ax = plt.subplots(figsize=(9, 3.4))
    image = ax.imshow((load * num_experts).numpy(), aspect="auto", cmap="viridis", vmin=0)
    ax.set(xlabel="expert", ylabel="layer", xticks=range(0, num_experts, 4), yticks=range(num_layers),
           title=f"Expert load on held-out text ({tokens:,} tokens, top-4 of {num_experts}); 1.0 = uniform")
    fig.colorbar(image, ax=ax, label="load / uniform", fraction=0.03, pad=0.02)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.demo.analyze", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT_DIR)
    parser.add_argument("--text", type=Path, default=HELDOUT_TEST_TEXT, help="held-out text to evaluate on")
    parser.add_argument("--max-windows", type=int, default=None, help="evaluate at most this many 512-token windows")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args(argv)
    for path in (args.checkpoint / "config.json", args.text):
        if not path.is_file():
            print(f"error: {path}: no such file", file=sys.stderr)
            return 2

    model, tokenizer = load_model(args.checkpoint)
    windows = heldout_windows(tokenizer, args.text, model.config.max_position_embeddings, args.max_windows)
    result = heldout_pass(model, windows, batch_size=8, with_routing=True)
    load = expert_load(result.topk, model.config.num_experts)  # [L, E]
    table = usage_table(load)
    samples = greedy_samples(model, tokenizer)
    analysis = {
        "checkpoint": os.path.relpath(args.checkpoint), "text": args.text.name, "tokens": windows.numel(),
        "nll": result.nll, "ppl": perplexity(result.nll),
        "every_expert_used": all(row["experts_used"] == model.config.num_experts for row in table),
        "usage": table, "samples": samples,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    plot_usage(load, args.out / "expert_usage.png", windows.numel())
    (args.out / "analysis.json").write_text(json.dumps(analysis, indent=1) + "\n")

    print(f"held-out {args.text.name}: {windows.numel()} tokens, nll {result.nll:.4f}, ppl {analysis['ppl']:.2f}")
    print("layer  used  min/uniform  max/uniform  max/min")
    for row in table:
        print(f"{row['layer']:5d}  {row['experts_used']:4d}  {row['min_load']:11.2f}  {row['max_load']:11.2f}  "
              f"{row['max_over_min']:7.1f}")
    for sample in samples:
        print(f"--- {sample['prompt']!r}\n{sample['prompt']}{sample['completion']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
