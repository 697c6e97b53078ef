"""The routing policy interface the runtime calls, and `exact`, the default.

A policy is bound once to a runtime (store, cache, MoE blocks) and then asked, per
MoE layer of every forward:

    before_experts(layer, hidden [T,H])      a hook to prefetch ahead (speculation)
    route(layer, logits [T,E], gate) -> (weights [T,K], indices [T,K], -1 = unused)

`ExactPolicy` is the model's own top-k masked to the store: token-identical to
transformers when every expert is present. Lossy policies subclass it and are
opt-in (see the README's "Router" section for their measured cost):

    cache-aware   substitute a resident expert when the Conflict margin is small (regret counted)
    dynamic-k     fewer experts per token when the router is confident (Arousal)

Any policy can also prefetch speculatively (`prefetch_layers=N`): the next N MoE
layers' gates applied to this layer's hidden state predict their experts, which the
cache starts loading while this layer computes (into device slots, or with the runtime's
`prefetch_tier="host"` only from the store into the host tier); a Surprise (router shift) above
`surprise_threshold` widens each prediction by `widen` experts.

Legend for shape comments: T tokens, E experts, H hidden, K top-k.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from . import signals
from .exact import SIGMOID_KINDS, UNUSED, RoutingSpec, route

if TYPE_CHECKING:
    from models.runtime import Runtime


class ExactPolicy:
    name = "exact"

    def __init__(self, prefetch_layers: int = 0, widen: int = 0, surprise_threshold: float = 0.5,
                 shift_decay: float = 0.9):
        self.prefetch_layers, self.widen = prefetch_layers, widen
        self.surprise_threshold, self.shift_decay = surprise_threshold, shift_decay
        self.widened = 0  # predictions widened by Surprise
        self._baseline: dict[int, torch.Tensor] = {}  # layer -> [E] EMA of router probabilities
        self._surprised = False

    @property
    def capturable(self) -> bool:
        """Whether route() is device work only, so a decode step can be captured as a CUDA
        graph (the Surprise signal reads the router's shift on the host)."""
        return not (self.prefetch_layers and self.widen)

    def bind(self, runtime: "Runtime", spec: RoutingSpec, absent: dict[int, torch.Tensor | None]) -> None:
        self.runtime, self.spec, self.absent = runtime, spec, absent
        self._gates: dict[int, torch.nn.Module] = {}
        self._next: dict[int, list[int]] = {}
        if self.prefetch_layers:
            from models.loading import keeps_own_router, moe_blocks, router_of

            blocks = moe_blocks(runtime.model)
            layers = sorted(blocks)
            # speculation reads a gate's linear weight: layers that keep their own router are not predicted
            self._gates = {layer: router_of(block) for layer, block in blocks.items()
                           if not keeps_own_router(block, spec)}
            self._next = {layer: [d for d in layers[i + 1:i + 1 + self.prefetch_layers] if d in self._gates]
                          for i, layer in enumerate(layers)}
        attach = getattr(runtime.cache.policy, "attach", None)
        if attach is not None:  # an eviction policy that learns from routing (router.eviction)
            attach(runtime)

    def before_experts(self, layer: int, hidden: torch.Tensor) -> None:
        for deeper in self._next.get(layer, ()):
            self.runtime.prefetch(self.predict(deeper, hidden))  # into device slots or the host tier

    def predict(self, layer: int, hidden: torch.Tensor) -> list[tuple[int, int]]:
        """(layer, expert) keys that `layer`'s gate would pick for `hidden` [T,H], most likely first."""
        probs = router_probs(self.spec, self._gate_logits(layer, hidden), self.absent[layer])  # [T,E]
        width = self.spec.top_k + (self.widen if self._surprised else 0)
        top = probs.topk(min(width, probs.shape[-1]), dim=-1)  # [T,W]
        mass = probs.new_zeros(probs.shape[-1]).index_add_(0, top.indices.flatten(), top.values.flatten())  # [E]
        ranked, order = mass.sort(descending=True, stable=True)  # [E] each
        # one transfer to the host, not a read per expert: on a GPU this runs at every MoE layer
        # of a decode step
        ranked = torch.stack([ranked, order.to(ranked.dtype)]).tolist()  # ids exact in float32 up to 2^24
        return [(layer, int(e)) for m, e in zip(*ranked) if m > 0]

    def predict_ahead(self, layer: int, hidden: torch.Tensor) -> tuple[list[int], torch.Tensor] | None:
        """The deeper layers predict() would prefetch for at `layer`, and each one's top-k experts
        for `hidden` [T,H] side by side, [T, layers*K], as device work only (no host read): a
        captured decode step computes them inside its graph, and the host reads them with this
        layer's own choice, one synchronisation for both (models/decoder.py). Ranked as predict()
        ranks a single token's (the order of its router's probabilities, absent experts last);
        None where this layer predicts nothing."""
        deeper = self._next.get(layer, [])
        if not deeper:
            return None
        columns = []
        for d in deeper:
            logits = self._gate_logits(d, hidden)  # [T,E]
            if self.absent[d] is not None:
                logits = logits.masked_fill(self.absent[d], float("-inf"))
            columns.append(logits.topk(min(self.spec.top_k, logits.shape[-1]), dim=-1).indices)  # [T,K]
        return deeper, torch.cat(columns, dim=-1)

    def _gate_logits(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """`layer`'s gate applied to `hidden` [..., H] as it would be to that layer's own input:
        [T,E] float32 logits."""
        gate = self._gates[layer]
        return F.linear(hidden.reshape(-1, gate.weight.shape[-1]).to(gate.weight.dtype), gate.weight).float()

    def route(self, layer: int, logits: torch.Tensor, gate, hidden_dtype: torch.dtype | None = None,
              bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """bias: a choice bias the family hands its router (LFM2's expert_bias); else the
        gate's own correction bias (DeepSeek-V3, GLM; ERNIE keeps it in gate.moe_statics), if any."""
        bias = bias if bias is not None else correction_bias(gate)
        weights, indices = route(self.spec, logits, self.absent[layer], bias, hidden_dtype)
        if self.prefetch_layers and self.widen:
            self._observe_shift(layer, logits)
        return weights, indices

    def _observe_shift(self, layer: int, logits: torch.Tensor) -> None:
        """Surprise of the router: KL of this layer's routing against its recent average."""
        probs = router_probs(self.spec, logits.float(), self.absent[layer]).detach().cpu()  # [T,E]
        baseline = self._baseline.get(layer)
        if baseline is not None:
            self._surprised = bool(signals.router_shift(probs, baseline).max() > self.surprise_threshold)
            self.widened += int(self._surprised)
            baseline = self.shift_decay * baseline + (1 - self.shift_decay) * probs.mean(dim=0)
        self._baseline[layer] = probs.mean(dim=0) if baseline is None else baseline


class CacheAwarePolicy(ExactPolicy):
    """Lossy: where a chosen expert is not resident and a resident one is almost as good
    (Conflict margin p(chosen) - p(alternative) < `threshold`), use the resident one.

    Every substitution is regret: `regret` counts them (exported as
    cadre_router_regret_total), `regret_mass` sums their probability margins.
    """

    name = "cache-aware"
    capturable = False  # reads the cache's residency on the host in route()

    def __init__(self, threshold: float = 0.1, **prefetch):
        super().__init__(**prefetch)
        self.threshold = threshold
        self.regret = 0
        self.regret_mass = 0.0

    def route(self, layer, logits, gate, **kwargs):
        weights, indices = super().route(layer, logits, gate, **kwargs)  # [T,K] each
        resident = self._resident_mask(layer, logits.device)  # [E]
        if resident.all() or not resident.any():
            return weights, indices
        probs = router_probs(self.spec, logits.float(), self.absent[layer])  # [T,E]
        margin, alternative = signals.conflict(probs, indices, resident)  # [T,K] each
        swap = margin < self.threshold  # [T,K]
        if not swap.any():
            return weights, indices
        self.regret += int(swap.sum())
        self.regret_mass += float(margin[swap].sum())
        indices = torch.where(swap, alternative, indices)
        return reweight(self.spec, logits, self.absent[layer], indices, weights.dtype), indices

    def _resident_mask(self, layer: int, device) -> torch.Tensor:
        resident = torch.zeros(self.spec.num_experts, dtype=torch.bool)
        experts = [e for l, e in self.runtime.cache.resident() if l == layer]
        resident[experts] = True
        return resident.to(device)


class DynamicKPolicy(ExactPolicy):
    """Lossy: a token keeps only as many of its top-k experts as it needs to cover
    `coverage` of their routing mass (at least `min_k`): a confident router (high
    Arousal) puts most mass on its first expert and so runs fewer.

    `skipped` counts dropped slots; `kept` counts slots run.
    """

    name = "dynamic-k"
    capturable = False  # counts its skips on the host in route()

    def __init__(self, coverage: float = 0.8, min_k: int = 1, **prefetch):
        super().__init__(**prefetch)
        self.coverage, self.min_k = coverage, min_k
        self.skipped = 0
        self.kept = 0

    def route(self, layer, logits, gate, **kwargs):
        weights, indices = super().route(layer, logits, gate, **kwargs)  # [T,K], sorted by weight for softmax families
        order = weights.float().argsort(dim=-1, descending=True)  # [T,K]
        w = weights.float().gather(1, order)  # [T,K] descending
        share = w.cumsum(dim=-1) / w.sum(dim=-1, keepdim=True).clamp_min(1e-20)  # [T,K]
        # slot j is needed if the slots before it cover less than `coverage`
        covered_before = torch.cat([torch.zeros_like(share[:, :1]), share[:, :-1]], dim=-1)  # [T,K]
        needed = (covered_before < self.coverage) | (torch.arange(w.shape[-1], device=w.device) < self.min_k)
        drop = torch.zeros_like(needed).scatter_(1, order, ~needed) & (indices != UNUSED)  # [T,K]
        self.skipped += int(drop.sum())
        self.kept += int(((indices != UNUSED) & ~drop).sum())
        if not drop.any():
            return weights, indices
        indices = indices.masked_fill(drop, UNUSED)
        return reweight(self.spec, logits, self.absent[layer], indices, weights.dtype), indices


def correction_bias(gate) -> torch.Tensor | None:
    bias = getattr(gate, "e_score_correction_bias", None)
    if bias is None:
        bias = getattr(getattr(gate, "moe_statics", None), "e_score_correction_bias", None)
    return bias


def router_probs(spec: RoutingSpec, logits: torch.Tensor, absent: torch.Tensor | None) -> torch.Tensor:
    """The router's distribution over present experts, [T,E] float32: softmax of the masked
    logits, or for sigmoid routers their scores normalised to sum to 1."""
    if absent is not None:
        logits = logits.masked_fill(absent, float("-inf"))
    if spec.kind not in SIGMOID_KINDS:
        return F.softmax(logits, dim=-1, dtype=torch.float)
    scores = logits.float().sigmoid()  # sigmoid(-inf) = 0: absent experts score nothing
    return scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)


def reweight(spec: RoutingSpec, logits: torch.Tensor, absent: torch.Tensor | None, indices: torch.Tensor,
             dtype) -> torch.Tensor:
    """Routing weights [T,K] for a changed expert choice, computed as the family computes
    them for its own choice (renormalised and scaled as the spec says); -1 slots weigh 0."""
    if spec.kind not in SIGMOID_KINDS:
        scores = router_probs(spec, logits, absent)  # [T,E]
    else:
        scores = logits.float().sigmoid()  # [T,E]
    used = indices != UNUSED
    weights = scores.gather(1, indices.clamp_min(0)).masked_fill(~used, 0.0)  # [T,K]
    if spec.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    weights = weights * spec.routed_scaling_factor
    return weights.to(dtype)


POLICIES: dict[str, type] = {"exact": ExactPolicy, "cache-aware": CacheAwarePolicy, "dynamic-k": DynamicKPolicy}


def policy_class(name: str) -> type:
    if name not in POLICIES:
        raise ValueError(f"unknown routing policy {name!r} (known: {', '.join(sorted(POLICIES))})")
    return POLICIES[name]


def make_policy(name: str, prefetch_layers: int = 0):
    """The policy `name`; prefetch_layers > 0 speculates that many MoE layers ahead."""
    return policy_class(name)(prefetch_layers=prefetch_layers)
