"""The routing policy interface the runtime calls, and `exact`, the default.

A policy is bound once to a runtime (store, cache, MoE blocks) and then asked, per
MoE layer of every forward:

    before_experts(layer, hidden [T,H])      a hook to prefetch ahead (speculation)
    route(layer, logits [T,E], gate) -> (weights [T,K], indices [T,K], -1 = unused)

`ExactPolicy` is the model's own top-k masked to the store: token-identical to
transformers when every expert is present. Lossy policies subclass it and are
opt-in (see router/README section in the project README for their measured cost).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .exact import RoutingSpec, route

if TYPE_CHECKING:
    from models.runtime import Runtime


class ExactPolicy:
    name = "exact"

    def bind(self, runtime: "Runtime", spec: RoutingSpec, absent: dict[int, torch.Tensor | None]) -> None:
        self.runtime, self.spec, self.absent = runtime, spec, absent

    def before_experts(self, layer: int, hidden: torch.Tensor) -> None:
        pass

    def route(self, layer: int, logits: torch.Tensor, gate) -> tuple[torch.Tensor, torch.Tensor]:
        bias = getattr(gate, "e_score_correction_bias", None)
        return route(self.spec, logits, self.absent[layer], bias)


POLICIES: dict[str, type] = {"exact": ExactPolicy}


def make_policy(name: str):
    if name not in POLICIES:
        raise ValueError(f"unknown routing policy {name!r} (known: {', '.join(sorted(POLICIES))})")
    return POLICIES[name]()
