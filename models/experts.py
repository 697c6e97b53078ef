"""The on-demand experts module that replaces each MoE block's `experts`.

Legend: T tokens, K top-k, S = T*K (token, slot) rows, R rows of one chunk, H hidden,
I expert intermediate size, G cache slots.

It computes what transformers' `grouped_mm` experts path computes, in the same order:
rows sorted by expert, one grouped matmul over the experts' weights (here: the cache's
slot buffers), gate/up split, down projection, routing weight, then a sum over the K
slots of each token. So with every expert resident the result is the same as
transformers' (bit-identical where the grouped kernel is). There is no per-token or
per-expert Python loop; the host only learns *which* experts are needed, so that the
cache can make them resident.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn
from transformers.activations import ACT2FN

from router.exact import UNUSED

if TYPE_CHECKING:
    from .cache import ExpertCache, Lease


# On a GPU, up to this many (token, slot) rows, gathering the experts' weights for a bmm
# is cheaper than a grouped matmul over every slot; on CPU the grouped kernel wins
# (bench/decode.py: transformers grouped_mm 36 tok/s vs batched_mm 15 on the demo model).
BATCHED_ROWS = 32


class OnDemandExperts(nn.Module):
    """forward(hidden [T,H], top_k_index [T,K], top_k_weights [T,K]) -> [T,H]."""

    def __init__(self, layer: int, hidden_act: str):
        super().__init__()  # no parameters: built on the meta device, bound after loading
        self.layer = layer
        self.act_fn = ACT2FN[hidden_act]
        self.cache: ExpertCache | None = None
        self.on_route: Callable | None = None  # (layer, index [T,K], weights [T,K], outcomes, stall_s)
        self.on_miss: Callable | None = None  # (layer, missed experts) -> None (full-depth prefetch)
        self.before: Callable | None = None  # (layer, hidden [T,H]) -> None (speculative prefetch)

    def bind(self, cache: "ExpertCache", on_route=None, on_miss=None, before=None) -> None:
        self.cache, self.on_route, self.on_miss, self.before = cache, on_route, on_miss, before

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        assert self.cache is not None, "OnDemandExperts used before the runtime bound a cache"
        num_tokens, top_k = top_k_index.shape
        table = self.cache.slot_table(self.layer)
        if table is not None:
            if self.before is not None:
                self.before(self.layer, hidden)
            return self._forward_resident(table, hidden, top_k_index, top_k_weights)
        index_cpu = top_k_index.reshape(-1).cpu()  # [S] the one host sync: which experts to load
        needed = [e for e in torch.unique(index_cpu).tolist() if e != UNUSED]
        out_dtype = torch.promote_types(hidden.dtype, top_k_weights.dtype)
        rows_out = hidden.new_zeros((num_tokens * top_k, hidden.shape[-1]), dtype=out_dtype)  # [S,H]
        outcomes: dict[int, str] = {}
        stall = 0.0  # seconds this forward waited for experts to become resident
        speculated = self.before is None
        while needed:  # one pass when the working set fits; otherwise experts stream through
            started = time.perf_counter()
            lease = self.cache.acquire(self.layer, needed)
            stall += time.perf_counter() - started
            if not speculated:
                # Speculate only once this layer's first experts are pinned, so a
                # prefetch for deeper layers can never evict what is about to run;
                # its loads then overlap this layer's compute.
                self.before(self.layer, hidden)
                speculated = True
            try:
                self._compute(lease, hidden, index_cpu, top_k, top_k_weights.reshape(-1), rows_out)
            finally:
                self.cache.release(lease)
            outcomes.update(lease.outcomes)
            needed = [e for e in needed if e not in lease.slots]
            if self.on_miss is not None:
                missed = [e for e, outcome in lease.outcomes.items() if outcome == "miss"]
                if missed:
                    self.on_miss(self.layer, missed)
        if self.on_route is not None:
            self.on_route(self.layer, top_k_index, top_k_weights, outcomes, stall)
        # sum over each token's K slots in slot order, as transformers' grouped path does
        return rows_out.view(num_tokens, top_k, -1).sum(dim=1).to(hidden.dtype)  # [T,H]

    def _forward_resident(self, table, hidden, top_k_index, top_k_weights) -> torch.Tensor:
        """Every expert of this layer is resident for good: look slots up on the device,
        so the host never waits for the GPU (no sync), as in transformers' own paths."""
        num_tokens, top_k = top_k_index.shape
        self.cache.record_table_hits(top_k_index)
        table, first, end = table
        slots = table[top_k_index].reshape(-1)  # [S] relative to `first` (-1 -> slot 0, weight 0)
        weights = top_k_weights.reshape(-1, 1)  # [S,1]
        gate_up, down = self.cache._gate_up[first:end], self.cache._down[first:end]  # [G',2I,H], [G',H,I]
        groups = end - first
        if hidden.is_cuda and slots.shape[0] <= BATCHED_ROWS:  # GPU decode: gather the few experts, one bmm
            x = hidden.repeat_interleave(top_k, dim=0).to(gate_up.dtype)  # [S,H]
            proj = torch.bmm(gate_up[slots], x.unsqueeze(-1)).squeeze(-1)  # [S,2I]
            gate, up = proj.chunk(2, dim=-1)
            y = torch.bmm(down[slots], (self.act_fn(gate) * up).unsqueeze(-1)).squeeze(-1)  # [S,H]
            rows = y * weights  # [S,H]
        else:  # CPU, or GPU prefill: rows sorted by slot, grouped matmul, offsets computed on the device
            order = torch.argsort(slots, stable=True)
            counts = torch.histc(slots.float(), bins=groups, min=0, max=groups - 1)
            offsets = torch.cumsum(counts, 0).to(torch.int32)  # [G]
            x = hidden[order // top_k].to(gate_up.dtype)  # [S,H]
            proj = _grouped_mm(x, gate_up.transpose(-2, -1), offsets)  # [S,2I]
            gate, up = proj.chunk(2, dim=-1)
            y = _grouped_mm(self.act_fn(gate) * up, down.transpose(-2, -1), offsets)  # [S,H]
            rows = torch.empty_like(y, dtype=torch.promote_types(y.dtype, weights.dtype))
            rows[order] = y * weights[order]
        if self.on_route is not None:
            self.on_route(self.layer, top_k_index, top_k_weights, None, 0.0)
        return rows.view(num_tokens, top_k, -1).sum(dim=1).to(hidden.dtype)  # [T,H]

    def _compute(self, lease: "Lease", hidden, index_cpu, top_k, weights, rows_out) -> None:
        first = min(lease.slots.values())
        end = max(lease.slots.values()) + 1
        relative = {expert: slot - first for expert, slot in lease.slots.items()}
        perm, offsets = _group_rows(index_cpu, relative, end - first)
        device = hidden.device
        perm = perm.to(device, non_blocking=True)  # [R] rows of this chunk, sorted by slot
        offsets = offsets.to(device, non_blocking=True)  # [G] int32 cumulative row counts
        x = hidden[perm // top_k]  # [R,H]
        gate_up, down = self.cache._gate_up[first:end], self.cache._down[first:end]  # [G',2I,H], [G',H,I]
        proj = _grouped_mm(x.to(gate_up.dtype), gate_up.transpose(-2, -1), offsets)  # [R,2I]
        gate, up = proj.chunk(2, dim=-1)  # [R,I] each
        y = _grouped_mm(self.act_fn(gate) * up, down.transpose(-2, -1), offsets)  # [R,H]
        rows_out[perm] = (y * weights[perm].unsqueeze(-1)).to(rows_out.dtype)


def _group_rows(index_cpu: torch.Tensor, slots: dict[int, int], num_slots: int):
    """Rows whose expert is in `slots`, ordered by slot, and cumulative counts per slot."""
    lut = torch.full((max(slots) + 2,), num_slots, dtype=torch.long)  # expert -> slot; num_slots = not here
    lut[torch.tensor(list(slots))] = torch.tensor(list(slots.values()))
    clipped = index_cpu.clamp(min=0, max=len(lut) - 1)
    row_slot = torch.where(index_cpu == UNUSED, num_slots, lut[clipped])  # [S]
    row_slot = torch.where(index_cpu > max(slots), num_slots, row_slot)
    order = torch.argsort(row_slot, stable=True)
    counts = torch.bincount(row_slot, minlength=num_slots + 1)[:num_slots]  # [G]
    kept = int(counts.sum())
    return order[:kept], torch.cumsum(counts, 0, dtype=torch.int32)


def _grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [R,in] @ grouped weight [G,in,out] -> [R,out], rows grouped by `offsets`."""
    grouped = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if grouped is not None:
        try:
            return grouped(x, weight, offs=offsets)
        except (RuntimeError, NotImplementedError):
            pass  # dtype/device without a grouped kernel: same products, one per group
    out = x.new_empty((x.shape[0], weight.shape[-1]))
    start = 0
    for group, end in enumerate(offsets.tolist()):
        if end > start:
            torch.mm(x[start:end], weight[group], out=out[start:end])
        start = end
    return out
