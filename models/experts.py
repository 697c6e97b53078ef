"""cadre's experts, plugged into transformers through its public `ExpertsInterface`.

transformers 5 decorates every family's experts class with `@use_experts_implementation`:
its forward dispatches to `ALL_EXPERTS_FUNCTIONS[config._experts_implementation]`. cadre
registers one implementation, "cadre". The family's own experts module stays in the model
(its gating function, activation and layout metadata), its weight parameters are removed
before weights load (models/loading.py), and `ExpertLayer` — attached to the module as
`module.cadre` — computes from the expert cache's slot buffers, looking experts up in the
cache's device table expert -> slot.

Legend: T tokens, K top-k, S = T*K (token, slot) rows, H hidden, I expert intermediate
size, G slots.

A layer whose every expert is resident for good (the budget holds the whole store) runs
with no host work at all: the table lookup happens on the device. Any other layer first
makes the experts its tokens chose resident (`ExpertCache.acquire`, which needs their ids
on the host: one synchronisation), then computes the same way. In a captured decode step
(models/decoder.py) that host work happens between graph replays, at `StepHooks.resident`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

import torch
from transformers.integrations.moe import ExpertsInterface

from router.exact import UNUSED

from .kernels import GATHER_ROWS, expert_mlp

if TYPE_CHECKING:
    from .cache import ExpertCache

EXPERTS_IMPLEMENTATION = "cadre"


def cadre_experts_forward(module: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    """The "cadre" entry of transformers' ExpertsInterface: [T,H], [T,K], [T,K] -> [T,H]."""
    layer = getattr(module, "cadre", None)
    if layer is None:
        raise RuntimeError(f"{type(module).__name__} runs the 'cadre' experts implementation but no expert cache "
                           "is bound to it (build models with models.loading.load_model)")
    return layer(module, hidden_states, top_k_index, top_k_weights)


ExpertsInterface.register(EXPERTS_IMPLEMENTATION, cadre_experts_forward)


class StepHooks:
    """What a forward does at a MoE layer that must first make its experts resident.

    `resident(layer, index, hidden)` returns a `Lease` of the cache pinning the experts
    of `index` [T,K], or as many as fit (the rest then streams through); the decoder
    overrides it to split a graph capture at this point instead.
    """

    def resident(self, layer: "ExpertLayer", index: torch.Tensor, hidden: torch.Tensor):
        return layer.acquire(layer.needed(index), hidden)

    def release(self, layer: "ExpertLayer", lease) -> None:
        layer.cache.release(lease)

    def route(self, layer: "ExpertLayer", index, weights, outcomes, stall) -> None:
        """The layer's routing of this forward, for the runtime's listeners."""
        if layer.on_route is not None:
            layer.on_route(layer.layer, index, weights, outcomes, stall)


EAGER = StepHooks()


def distinct_experts(ids) -> list[int]:
    """The distinct experts among top-k ids, sorted, UNUSED left out (de-duplicated in Python:
    a few ids, where torch.unique is several calls)."""
    return sorted(set(ids) - {UNUSED})


class ExpertLayer:
    """One MoE layer's experts, computed from the expert cache."""

    def __init__(self, layer: int):
        self.layer = layer
        self.cache: ExpertCache | None = None
        self.hooks: StepHooks = EAGER
        self.on_route: Callable | None = None  # (layer, index [T,K], weights [T,K], outcomes, stall_s)
        self.on_miss: Callable | None = None  # (layer, missed experts) -> None (full-depth prefetch)
        self.before: Callable | None = None  # (layer, hidden [T,H]) -> None (speculative prefetch)
        self.mlp = expert_mlp  # the experts' compute (models/compile.py may swap in a compiled one)
        self.gather_rows = GATHER_ROWS  # rows up to which a GPU step gathers weights (RuntimeConfig.gather_rows)
        self.outcomes: dict[int, str] | None = None  # of the last forward (None: resident for good)
        self.stall = 0.0  # seconds the last forward waited for experts to become resident
        # Set by a compiled decode step (models/decoder.py): the routing goes into these static
        # buffers (index [B,K], weights [B,K]) instead of to the hooks, so the compiled forward
        # has no Python call to break at; the decoder reports them after the step.
        self.route_buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        # Set by the decoder for a decode step: a complete layer's lookup goes here, and the
        # step counts its hits once for all layers (ExpertCache.count_step_hits).
        self.hit_sink: list | None = None
        # Set by the decoder for a prefill of several prompts: [T] False at padding tokens, which
        # then route to no expert (UNUSED, weight 0): padding loads nothing and adds nothing.
        self.token_mask: torch.Tensor | None = None

    def bind(self, cache: "ExpertCache", on_route=None, on_miss=None, before=None) -> None:
        self.cache, self.on_route, self.on_miss, self.before = cache, on_route, on_miss, before

    def __call__(self, module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor) -> torch.Tensor:
        assert self.cache is not None, "ExpertLayer used before the runtime bound a cache"
        if self.token_mask is not None:  # padding: UNUSED at weight 0, so it loads and adds nothing
            padding = ~self.token_mask.unsqueeze(-1)  # [T,1]
            top_k_index, top_k_weights = top_k_index.masked_fill(padding, UNUSED), top_k_weights.masked_fill(padding, 0)
        if self.cache.layer_is_complete(self.layer):  # nothing to load or to prefetch, ever
            self.outcomes, self.stall = None, 0.0
            if self.route_buffers is None:  # (a compiled step counts from its route buffers)
                if self.hit_sink is not None:
                    self.hit_sink.append((self.layer, top_k_index))
                else:
                    self.cache.count_table_hits(self.layer, top_k_index)
            out = self._compute(module, hidden, top_k_index, top_k_weights, self.cache.layer_slots(self.layer))
        else:
            self.outcomes, self.stall = {}, 0.0
            out = self._compute_resident(module, hidden, top_k_index, top_k_weights)
        if self.route_buffers is None:
            self.hooks.route(self, top_k_index, top_k_weights, self.outcomes, self.stall)
        else:
            rows = top_k_index.shape[0]
            self.route_buffers[0][:rows].copy_(top_k_index)
            self.route_buffers[1][:rows].copy_(top_k_weights)
        return out

    def _compute(self, module, hidden, top_k_index, top_k_weights, slot_range, reduce=True) -> torch.Tensor:
        first, end = slot_range
        slots = self.cache.lookup(self.layer, top_k_index, first)  # [T,K] slot - first
        cache = self.cache
        biases = (cache.gate_up_bias[first:end], cache.down_bias[first:end]) if cache.gate_up_bias is not None else None
        return self.mlp(module, hidden, slots, top_k_weights, cache.gate_up[first:end], cache.down[first:end],
                        reduce=reduce, biases=biases, gather_rows=self.gather_rows)

    def _compute_resident(self, module, hidden, top_k_index, top_k_weights) -> torch.Tensor:
        """Make the chosen experts resident, then compute. When the budget cannot pin them
        all at once, they stream through it: each lease computes only its own rows."""
        lease = self.hooks.resident(self, top_k_index, hidden)
        if lease.empty:
            self.hooks.release(self, lease)
            return torch.zeros_like(hidden)  # [T,H]
        if lease.complete:
            try:
                return self._compute(module, hidden, top_k_index, top_k_weights, lease.slot_range())
            finally:
                self.hooks.release(self, lease)
        num_tokens, top_k = top_k_index.shape
        out_dtype = torch.promote_types(hidden.dtype, top_k_weights.dtype)
        rows = hidden.new_zeros((num_tokens, top_k, hidden.shape[-1]), dtype=out_dtype)  # [T,K,H]
        while True:
            try:
                chunk = torch.tensor(sorted(lease.slots), device=top_k_index.device)
                in_chunk = torch.isin(top_k_index, chunk)  # [T,K] rows this lease computes
                index = top_k_index.masked_fill(~in_chunk, UNUSED)
                chunk_rows = self._compute(module, hidden, index, top_k_weights, self.cache.all_slots(),
                                           reduce=False)  # [T,K,H]
                rows = torch.where(in_chunk.unsqueeze(-1), chunk_rows, rows)
            finally:
                self.cache.release(lease)
            if not lease.missing:
                break
            lease = self.acquire(lease.missing, hidden)
        # sum over each token's K slots in slot order, as transformers does
        return rows.sum(dim=1).to(hidden.dtype)  # [T,H]

    # --- host side ----------------------------------------------------------------------------
    def needed(self, index: torch.Tensor) -> list[int]:
        """Distinct experts of `index` [T,K], sorted: the host synchronisation of a miss-capable
        layer."""
        return distinct_experts(index.reshape(-1).tolist())

    def acquire(self, experts: list[int], hidden: torch.Tensor, force: bool = False,
                defer_writebacks: bool = False, speculate: bool = True):
        """Pin `experts` (as many as fit unless `force`), loading misses; records outcomes,
        stall time and full-depth prefetches. `speculate=False` leaves the speculative
        prefetch to the caller (`speculate()`), which can queue this layer's compute first."""
        started = time.perf_counter()
        lease = self.cache.acquire(self.layer, experts, force=force, defer_writebacks=defer_writebacks)
        self.stall += time.perf_counter() - started
        if speculate and not self.outcomes:
            # Speculate only once this layer's first experts are pinned, so a prefetch for
            # deeper layers can never evict what is about to run; its loads then overlap
            # this layer's compute.
            self.speculate(hidden)
        self.outcomes.update(lease.outcomes)
        if self.on_miss is not None:
            missed = [e for e, outcome in lease.outcomes.items() if outcome == "miss"]
            if missed:
                self.on_miss(self.layer, missed)
        return lease

    def speculate(self, hidden: torch.Tensor) -> None:
        """Start loading what the routing policy predicts deeper layers will choose for
        `hidden` [T,H] (this layer's input); nothing without a speculative policy."""
        if self.before is not None:
            self.before(self.layer, hidden)
