"""Per-token expert profiles: a cheap prompt -> experts predictor built from routing traces.

    python -m router.token_profile --store STORE --text calibration.txt --out profile.safetensors

A token's profile at a MoE layer is the share of routing weight each expert got whenever
that token was routed there in the calibration text, shrunk toward the layer's average by
PRIOR_TOKENS pseudo-occurrences (a token seen once says little). A prompt's prediction is
the mean of its tokens' profiles (a token the text never had counts as the average): one
distribution over experts per profiled layer, what a replica serving the prompt will be
asked for. Routing depends on context, so this is an estimate; the first MoE layers see
little more than the token itself, which is why the profile covers them (--layers).

File (safetensors): token_ids [N] int32, experts [N, M, J] int32 and shares [N, M, J]
float16 (each token's J largest shares), mean [M, E] float32; metadata: format, version,
moe_layers (JSON), num_experts, tokens.

Legend: T tokens, K experts per token, E experts per layer, M profiled layers, N distinct
tokens, J shares kept per token and layer, V vocabulary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .exact import UNUSED
from .profile import route_windows

FORMAT = "cadre-token-profile"
VERSION = "1"
PRIOR_TOKENS = 1.0  # pseudo-occurrences of the layer average in every token's profile
DEFAULT_LAYERS = 4  # the first MoE layers: the most token-determined
DEFAULT_KEEP = 8  # shares kept per token and layer


class TokenProfileBuilder:
    """A routing listener accumulating routing weight per (token, layer, expert).

    Set `token_ids` to the flattened ids of a forward before running it: a routing event's
    rows are that forward's tokens in the same (batch-major) order.
    """

    def __init__(self, layers: list[int], num_experts: int):
        self.layers, self.num_experts = list(layers), num_experts
        self._layer_index = {layer: m for m, layer in enumerate(self.layers)}
        self._row_of: dict[int, int] = {}
        self.mass = torch.zeros(0, len(self.layers), num_experts)  # [N, M, E]
        self.occurrences = torch.zeros(0)  # [N]
        self.token_ids: torch.Tensor | None = None  # [T] ids of the forward being run
        self.tokens = 0

    def __call__(self, event) -> None:
        m = self._layer_index.get(event.layer)
        if m is None or self.token_ids is None:
            return
        rows = self._rows(self.token_ids)  # [T]
        used = event.experts != UNUSED  # [T, K]
        weights = event.weights.float() * used  # [T, K]
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-9)  # [T, K] each token's mass is 1
        per_token = torch.zeros(rows.numel(), self.num_experts).scatter_add_(
            1, event.experts.clamp_min(0).long(), weights)  # [T, E]
        self.mass[:, m].index_add_(0, rows, per_token)
        if m == 0:
            self.occurrences.index_add_(0, rows, torch.ones(rows.numel()))
            self.tokens += rows.numel()

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        new = [t for t in dict.fromkeys(ids.tolist()) if t not in self._row_of]
        if new:
            for t in new:
                self._row_of[t] = len(self._row_of)
            grow = len(new)
            self.mass = torch.cat([self.mass, torch.zeros(grow, *self.mass.shape[1:])])
            self.occurrences = torch.cat([self.occurrences, torch.zeros(grow)])
        return torch.tensor([self._row_of[t] for t in ids.tolist()])

    def build(self, keep: int = DEFAULT_KEEP) -> "TokenProfile":
        assert self.tokens > 0, "no token was routed through the profiled layers"
        mean = self.mass.sum(0) / self.occurrences.sum()  # [M, E]
        shares = (self.mass + PRIOR_TOKENS * mean) / (self.occurrences + PRIOR_TOKENS).view(-1, 1, 1)  # [N, M, E]
        top = shares.topk(min(keep, self.num_experts), dim=-1)  # [N, M, J]
        token_ids = torch.tensor(list(self._row_of), dtype=torch.int32)  # [N], in row order
        return TokenProfile(self.layers, self.num_experts, token_ids, top.indices.int(), top.values.half(), mean,
                            self.tokens)


class TokenProfile:
    """The predictor: prompt token ids -> per-layer expert distribution [M, E]."""

    def __init__(self, layers: list[int], num_experts: int, token_ids: torch.Tensor, experts: torch.Tensor,
                 shares: torch.Tensor, mean: torch.Tensor, tokens: int):
        self.layers, self.num_experts, self.tokens = list(layers), num_experts, tokens
        self.token_ids, self.experts, self.shares, self.mean = token_ids, experts, shares, mean
        self._row_of = {t: i for i, t in enumerate(token_ids.tolist())}

    def predict(self, ids: list[int]) -> list[list[float]]:
        """[M][E]: the mean profile of the prompt's tokens (rows sum to about 1)."""
        rows = [self._row_of.get(t, -1) for t in ids]
        known = torch.tensor([r for r in rows if r >= 0], dtype=torch.long)  # [k]
        unknown = len(rows) - known.numel()
        total = self.mean * unknown  # [M, E]
        if known.numel():
            kept = self.shares[known].float()  # [k, M, J]
            dense = torch.zeros(known.numel(), len(self.layers), self.num_experts)  # [k, M, E]
            dense.scatter_(2, self.experts[known].long(), kept)
            rest = (1.0 - kept.sum(-1, keepdim=True)).clamp_min(0)  # [k, M, 1] mass beyond the kept shares
            total = total + (dense + rest * self.mean).sum(0)  # [M, E]
        return (total / max(1, len(rows))).tolist()

    def save(self, path: str | Path) -> None:
        tensors = {"token_ids": self.token_ids, "experts": self.experts, "shares": self.shares, "mean": self.mean}
        metadata = {"format": FORMAT, "version": VERSION, "moe_layers": json.dumps(self.layers),
                    "num_experts": str(self.num_experts), "tokens": str(self.tokens)}
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> "TokenProfile":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError(f"{path}: not a {FORMAT} v{VERSION} file")
        t = load_file(str(path))
        return cls(json.loads(meta["moe_layers"]), int(meta["num_experts"]), t["token_ids"], t["experts"],
                   t["shares"], t["mean"], int(meta["tokens"]))


def record(runtime, ids: torch.Tensor, layers: int = DEFAULT_LAYERS, window: int = 256,
           batch: int = 8) -> TokenProfileBuilder:
    """Route token ids [T] through `runtime` in windows and accumulate the first `layers` MoE layers."""
    builder = TokenProfileBuilder(runtime.store.moe_layers[:layers], runtime.store.num_experts)

    def before_forward(chunk: torch.Tensor) -> None:
        builder.token_ids = chunk.flatten()  # [B*S]: the rows of this forward's routing events

    route_windows(runtime, ids, builder, window, batch, on_chunk=before_forward)
    return builder


def build_profile(store: str | Path, text: str, layers: int = DEFAULT_LAYERS, keep: int = DEFAULT_KEEP,
                  max_tokens: int | None = None, device: str = "cpu") -> TokenProfile:
    """Profile `text` on every expert of `store` (a full budget: the profile is what the model routes)."""
    from models import Runtime, RuntimeConfig

    runtime = Runtime.from_store(store, RuntimeConfig(device=device))
    try:
        if runtime.tokenizer is None:
            raise ValueError(f"{store}: the store has no tokenizer to read the text with")
        ids = runtime.tokenizer(text, return_tensors="pt").input_ids[0][:max_tokens]
        return record(runtime, ids, layers).build(keep)
    finally:
        runtime.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m router.token_profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True, help="expert store (every expert, for the model's own routing)")
    parser.add_argument("--text", required=True, help="calibration text file (like the traffic to be served)")
    parser.add_argument("--out", required=True, help="profile (.safetensors) to write")
    parser.add_argument("--layers", type=int, default=DEFAULT_LAYERS, help="profile the first N MoE layers")
    parser.add_argument("--keep", type=int, default=DEFAULT_KEEP, help="shares kept per token and layer")
    parser.add_argument("--max-tokens", type=int, default=None, help="profile only the first N tokens")
    parser.add_argument("--device", default="cpu", help="device to route the text on (every expert loaded)")
    args = parser.parse_args(argv)
    from extractor.store import StoreError

    if args.layers < 1 or args.keep < 1:
        print("error: --layers and --keep must be >= 1", file=sys.stderr)
        return 2
    try:
        text = Path(args.text).read_text()
        profile = build_profile(args.store, text, args.layers, args.keep, args.max_tokens, args.device)
    except (OSError, ValueError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    profile.save(args.out)
    print(f"profiled {profile.tokens} tokens ({len(profile.token_ids)} distinct) over MoE layers "
          f"{profile.layers} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
