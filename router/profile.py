"""Usage profiles: how often each layer's experts are routed to over a calibration text
(or live traffic), saved as JSON for `python -m extractor --experts auto:N --profile`.

    python -m router.profile --store STORE --text calibration.txt --out usage.json

Format (version 1):
    {"format": "cadre-usage-profile", "version": 1, "num_experts": E, "top_k": K,
     "tokens": routed tokens, "layers": {"<layer>": [uses of expert 0, 1, ...]},
     "weight": {"<layer>": [routing weight mass of expert 0, 1, ...]}}
The extractor ranks experts by "layers" (use counts), ties to the lower id.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .exact import UNUSED
from .signals import reward

FORMAT = "cadre-usage-profile"


class UsageProfile:
    """A routing listener that counts uses and weight mass per (layer, expert)."""

    def __init__(self, num_experts: int, top_k: int):
        self.num_experts, self.top_k = num_experts, top_k
        self.uses: dict[int, torch.Tensor] = {}  # layer -> [E] int64
        self.weight: dict[int, torch.Tensor] = {}  # layer -> [E] float
        self.tokens = 0

    def __call__(self, event) -> None:
        used = event.experts[event.experts != UNUSED].long()
        zeros = torch.zeros(self.num_experts)
        self.uses[event.layer] = self.uses.get(event.layer, zeros.long()) + torch.bincount(used, minlength=self.num_experts)
        self.weight[event.layer] = self.weight.get(event.layer, zeros) + reward(event.weights, event.experts, self.num_experts)
        if event.layer == min(self.uses):
            self.tokens += event.experts.shape[0]

    def top(self, n: int) -> dict[int, list[int]]:
        """{layer: the n most used experts, sorted}, ties to the lower id (as the extractor picks)."""
        return {layer: sorted(sorted(range(self.num_experts), key=lambda e: (-int(c[e]), e))[:n])
                for layer, c in self.uses.items()}

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": 1, "num_experts": self.num_experts, "top_k": self.top_k,
                "tokens": self.tokens,
                "layers": {str(l): c.tolist() for l, c in sorted(self.uses.items())},
                "weight": {str(l): [round(w, 6) for w in m.tolist()] for l, m in sorted(self.weight.items())}}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "UsageProfile":
        data = json.loads(Path(path).read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} file")
        profile = cls(data["num_experts"], data["top_k"])
        profile.tokens = data["tokens"]
        profile.uses = {int(l): torch.tensor(c) for l, c in data["layers"].items()}
        profile.weight = {int(l): torch.tensor(m) for l, m in data.get("weight", {}).items()}
        return profile


@torch.inference_mode()
def route_windows(runtime, ids: torch.Tensor, listener, window: int = 256, batch: int = 8, on_chunk=None) -> None:
    """Route token ids [N] through `runtime` in windows of `window` tokens, `listener` hearing
    every routing event; on_chunk(chunk [B, S]) runs before each forward."""
    runtime.add_routing_listener(listener)
    try:
        usable = ids.numel() // window * window or ids.numel()
        windows = ids[:usable].view(-1, min(window, usable))  # [W,S]
        for chunk in windows.split(batch):
            if on_chunk is not None:
                on_chunk(chunk)
            runtime.model(input_ids=chunk.to(runtime.device), use_cache=False)
    finally:
        runtime.remove_routing_listener(listener)


def record(runtime, ids: torch.Tensor, window: int = 256, batch: int = 8) -> UsageProfile:
    """Route the token ids [N] through `runtime` in windows of `window` tokens and count usage."""
    profile = UsageProfile(runtime.store.num_experts, runtime.store.top_k)
    route_windows(runtime, ids, profile, window, batch)
    return profile


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m router.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True, help="expert store (all experts, for an unbiased profile)")
    parser.add_argument("--text", required=True, help="calibration text file")
    parser.add_argument("--out", required=True, help="profile JSON to write")
    parser.add_argument("--max-tokens", type=int, default=None, help="profile only the first N tokens")
    args = parser.parse_args(argv)
    from extractor.store import StoreError
    from models import Runtime, RuntimeConfig

    try:
        text = Path(args.text).read_text()
        runtime = Runtime.from_store(args.store, RuntimeConfig())
    except (OSError, ValueError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if runtime.tokenizer is None:
        print(f"error: {args.store}: the store has no tokenizer to read --text with", file=sys.stderr)
        return 2
    ids = runtime.tokenizer(text, return_tensors="pt").input_ids[0][: args.max_tokens]
    profile = record(runtime, ids)
    profile.save(args.out)
    print(f"profiled {profile.tokens} tokens over {len(profile.uses)} MoE layers -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
