"""Routing analytics from traces: what the research notes measured, as a Python API.

Legend for shape comments: T tokens, K top-k slots, L MoE layers, E experts.

A trace is, per MoE layer, the [T,K] expert ids of the same T tokens (-1 = unused
slot), plus optionally the T token ids. `RoutingTrace` records one from a runtime's
routing events; every function below also takes plain tensors.

    purity_e      = 1 - H(token ids routed to e) / log(V_seen)   (1: e sees one token id)
    utilisation   = |experts used| / |experts present|
    entropy_L     = H(share of layer L's slots that went to each expert), nats
    pathway_t     = (top-1 expert of t in layer L for every L), its "global pathway"
"""

from __future__ import annotations

import math
from collections import Counter

import torch

from .exact import UNUSED


def _entropy(counts: torch.Tensor) -> float:
    p = counts.double() / counts.sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def token_purity(indices: torch.Tensor, token_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Per expert: 1 - H/H_max of the token ids routed to it (any slot), [E]; NaN if none.

    H_max = log of the number of distinct token ids in the trace, so experts compare on
    one scale. indices [T,K], token_ids [T].
    """
    tokens = token_ids.unsqueeze(-1).expand_as(indices)  # [T,K]
    distinct = int(token_ids.unique().numel())
    h_max = math.log(distinct) if distinct > 1 else 1.0
    purity = torch.full((num_experts,), float("nan"), dtype=torch.float64)
    for expert in indices[indices != UNUSED].unique().tolist():
        routed = tokens[indices == expert]
        purity[expert] = 1.0 - _entropy(torch.bincount(routed)) / h_max
    return purity


def utilisation(indices: torch.Tensor, present: list[int] | int) -> float:
    """Share of the present experts that received at least one token. indices [T,K]."""
    num_present = present if isinstance(present, int) else len(present)
    used = indices[indices != UNUSED].unique().numel()
    return used / num_present if num_present else 0.0


def routing_entropy(indices: torch.Tensor, num_experts: int) -> float:
    """Entropy (nats) of the layer's expert load; log(E) when perfectly balanced. indices [T,K]."""
    counts = torch.bincount(indices[indices != UNUSED].long(), minlength=num_experts)
    return _entropy(counts) if counts.sum() else 0.0


def pathways(per_layer: list[torch.Tensor]) -> list[tuple[int, ...]]:
    """Each token's global pathway: its top-1 expert in every layer. per_layer: L x [T,K]."""
    top1 = torch.stack([layer[:, 0] for layer in per_layer], dim=1)  # [T,L]
    return [tuple(row) for row in top1.tolist()]


def distinct_pathways(per_layer: list[torch.Tensor]) -> int:
    return len(set(pathways(per_layer)))


class RoutingTrace:
    """A runtime routing listener that keeps every layer's [T,K] choices in order.

    Slot 0 is the top-weighted expert: exact routing returns slots sorted by weight for
    softmax families, and the pathway uses it as the token's expert in that layer.
    """

    def __init__(self):
        self.layers: dict[int, list[torch.Tensor]] = {}
        self.token_ids: list[torch.Tensor] = []

    def __call__(self, event) -> None:
        order = event.weights.argsort(dim=-1, descending=True, stable=True)  # [T,K]
        self.layers.setdefault(event.layer, []).append(event.experts.gather(1, order))

    def add_tokens(self, ids: torch.Tensor) -> None:
        """Token ids of the forward just traced, flattened batch-major as the events are."""
        self.token_ids.append(ids.reshape(-1).cpu())

    def per_layer(self) -> dict[int, torch.Tensor]:
        return {layer: torch.cat(chunks) for layer, chunks in sorted(self.layers.items())}

    def summary(self, num_experts: int, present: dict[int, list[int]] | None = None) -> dict:
        per_layer = self.per_layer()
        out = {
            "entropy": {l: routing_entropy(ix, num_experts) for l, ix in per_layer.items()},
            "utilisation": {l: utilisation(ix, present[l] if present else num_experts) for l, ix in per_layer.items()},
            "distinct_pathways": distinct_pathways(list(per_layer.values())) if per_layer else 0,
        }
        if self.token_ids:
            ids = torch.cat(self.token_ids)
            out["purity"] = {l: token_purity(ix, ids, num_experts) for l, ix in per_layer.items()}
        return out
