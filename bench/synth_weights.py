"""Random weights of a model's real shapes, with a stated routing spread (bench synth-store).

Every tensor is drawn from its own seeded generator, so a tensor's values depend only on
(seed, name, device) and the trunk and the expert shards can be written in any order.

    norms                  ones (RMSNorm / LayerNorm weights), biases zeros
    token embeddings       normal(0, spread.embed_std)
    router rows (gate)     normal(0, spread.gate_std) x exp(spread.skew x z_e), z_e ~ N(0, 1) per layer
    residual outputs       normal(0, initializer_range / sqrt(2 x layers)): attention o_proj and every
                           MLP's down_proj, routed experts' included (GPT-2's scaled init)
    everything else        normal(0, initializer_range) (transformers' own init, 0.02)

Why a spread at all: with transformers' init, the attention output (a near-uniform average
over the context) dominates the residual stream, consecutive tokens get nearly the same
hidden state and route to nearly the same experts (a cache hits ~99%); a per-token router
with no skew routes nearly uniformly instead (the cache's worst case). `embed_std` sets how
much of the hidden state follows the current token (temporal locality), `skew` how unequal
the experts' popularity is, `gate_std` how peaked the routing weights are (top-k choices do
not depend on it). The residual outputs' 1/sqrt(2 x layers) keeps what the layers add to the
stream, summed over the whole depth, the same for any depth: a model cut to 4 layers for
calibration sees, at its layer n, the context a full-depth model sees at the same share of
its depth. The defaults are calibrated (python -m bench synth-calibrate) so that per-layer
routing entropy and the LRU hit-rate curve match the demo model on held-out text;
docs/memory-plan.md records the calibration.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import asdict, dataclass

import torch

ROUTER = re.compile(r"(?:^|\.)(?:mlp|block_sparse_moe|feed_forward)\.(?:gate|router)\.weight$")
RESIDUAL_OUT = ("o_proj.weight", "down_proj.weight", ".w2.weight")  # write into the residual stream


@dataclass(frozen=True)
class Spread:
    """The synthetic routers' knobs (see the module docstring)."""

    embed_std: float = 0.02
    gate_std: float = 0.02
    skew: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


# Calibrated (bench/results/synth_calibration_cpu.log): Qwen3-30B-A3B's width, 4 layers, the demo's
# held-out text: normalised routing entropy 0.967 and LRU hit rates 0.323 / 0.630 / 0.849 at 25 / 50 / 75%
# of a layer's experts, against the demo model's 0.977 and 0.364 / 0.613 / 0.841 on the same tokens.
DEFAULT_SPREAD = Spread(embed_std=0.7, gate_std=0.02, skew=0.0)
CALIBRATION = ("calibrated at Qwen3-30B-A3B's width: routing entropy/log E 0.967, LRU hit rate 0.323 / 0.630 / "
               "0.849 at 25 / 50 / 75% of a layer's experts; demo model 0.977, 0.364 / 0.613 / 0.841")


def generator(seed: int, name: str, device: str | torch.device) -> torch.Generator:
    """A generator seeded by (seed, name): every tensor reproducible on its own."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def residual_std(init_std: float, layers: int) -> float:
    return init_std / math.sqrt(2 * layers)


def trunk_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, *, seed: int, spread: Spread,
                 init_std: float, num_experts: int, layers: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """One trunk tensor of `shape` in `dtype`, drawn as the module docstring says."""
    if name.endswith(("norm.weight", "layernorm.weight")):
        return torch.ones(shape, dtype=dtype, device=device)
    if name.endswith(("bias", ".e_score_correction_bias")) or len(shape) < 2:
        return torch.zeros(shape, dtype=dtype, device=device)
    gen = generator(seed, name, device)
    if name.endswith("embed_tokens.weight"):
        return _normal(shape, spread.embed_std, dtype, gen, device)
    if ROUTER.search(name) and shape[0] == num_experts:
        rows = _normal(shape, spread.gate_std, torch.float32, gen, device)  # [E, H]
        skew = torch.randn((shape[0], 1), generator=gen, device=device) * spread.skew  # [E, 1]
        return (rows * skew.exp()).to(dtype)
    if name.endswith(RESIDUAL_OUT):
        return _normal(shape, residual_std(init_std, layers), dtype, gen, device)
    return _normal(shape, init_std, dtype, gen, device)


def expert_tensor(layer: int, expert: int, inter: int, hidden: int, dtype: torch.dtype, *, seed: int,
                  init_std: float, layers: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """[3*I*H]: one expert's gate_proj [I,H], up_proj [I,H], down_proj [H,I], flattened in that order."""
    gen = generator(seed, f"experts.{layer}.{expert}", device)
    weights = _normal((3 * inter * hidden,), init_std, dtype, gen, device)
    weights[2 * inter * hidden:].mul_(residual_std(init_std, layers) / init_std)  # down_proj: a residual output
    return weights


def expert_projections(weights: torch.Tensor, inter: int, hidden: int) -> dict[str, torch.Tensor]:
    """expert_tensor's [3*I*H] as views {gate_proj [I,H], up_proj [I,H], down_proj [H,I]} (what an
    FP8 store quantises one by one)."""
    size = inter * hidden
    return {"gate_proj": weights[:size].view(inter, hidden), "up_proj": weights[size:2 * size].view(inter, hidden),
            "down_proj": weights[2 * size:].view(hidden, inter)}


def _normal(shape, std: float, dtype: torch.dtype, gen: torch.Generator, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.normal_(0.0, std, generator=gen)
