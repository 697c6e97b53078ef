"""A slot-indexed KV cache for transformers models: one row per sequence, static buffers.

transformers' StaticCache gives every row of a batch the same position, so sequences of
different lengths cannot decode together. Here each row (a sequence's slot) has its own
position: a forward writes row `rows[b]`'s new keys at `positions[b, :]` and attends over
the first `attend_len` positions of its rows, with a mask saying which of them are that
row's past. Buffers are allocated once (on the first forward), so a decode step has fixed
addresses and can be captured as a CUDA graph.

Legend: R rows, B rows in this forward, Q query tokens per row, N attended positions,
Hkv key/value heads, D head dim.

The cache only stores; `SlotCache.prepare` sets where a forward writes and what it reads,
and `attention_mask` builds the matching 4D mask (transformers uses a 4D mask as given).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class SlotLayer(CacheLayerMixin):
    is_compileable = True
    is_sliding = False

    def __init__(self, owner: "SlotCache"):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        rows, length = self.owner.num_rows, self.owner.max_len
        heads = key_states.shape[1]
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = torch.zeros((rows, heads, length, key_states.shape[-1]), dtype=self.dtype,
                                device=self.device)  # [R,Hkv,L,Dk]
        self.values = torch.zeros((rows, heads, length, value_states.shape[-1]), dtype=self.dtype,
                                  device=self.device)  # [R,Hkv,L,Dv]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key/value_states [B,Hkv,Q,D] -> this forward's rows of the cache, [B,Hkv,N,D]."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        owner = self.owner
        rows = owner.write_rows.unsqueeze(-1)  # [B,1]
        self.keys[rows, :, owner.positions] = key_states.transpose(1, 2)  # [B,Q,Hkv,D] at (row, position)
        self.values[rows, :, owner.positions] = value_states.transpose(1, 2)
        read = owner.read_rows
        return self.keys[read, :, : owner.attend_len], self.values[read, :, : owner.attend_len]

    def get_seq_length(self) -> int:
        return self.owner.attend_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.attend_len, 0

    def get_max_length(self) -> int:
        return self.owner.max_len


class SlotCache(Cache):
    """`num_rows` sequences of up to `max_len` tokens, for every attention layer."""

    def __init__(self, num_layers: int, num_rows: int, max_len: int, device: torch.device):
        self.num_rows, self.max_len = num_rows, max_len
        super().__init__(layers=[SlotLayer(self) for _ in range(num_layers)])
        self.write_rows = torch.zeros(1, dtype=torch.long, device=device)  # [B]
        self.positions = torch.zeros((1, 1), dtype=torch.long, device=device)  # [B,Q]
        self.read_rows: slice | torch.Tensor = slice(0, 1)
        self.attend_len = 1

    def prepare(self, write_rows: torch.Tensor, positions: torch.Tensor, read_rows: slice | torch.Tensor,
                attend_len: int) -> None:
        """Where the next forward writes (`write_rows` [B], `positions` [B,Q], device tensors)
        and which rows and lengths it attends: a contiguous slice, so reading is a view (a
        decode step's addresses stay fixed), or rows [B] (a prefill of scattered rows: a copy)."""
        assert attend_len <= self.max_len, f"attend_len {attend_len} > max_len {self.max_len}"
        self.write_rows, self.positions, self.read_rows, self.attend_len = write_rows, positions, read_rows, attend_len

    def attention_mask(self) -> torch.Tensor:
        """[B,1,Q,N] bool: a query at position p sees its row's keys at positions <= p."""
        keys = torch.arange(self.attend_len, device=self.positions.device)  # [N]
        return (keys <= self.positions.unsqueeze(-1)).unsqueeze(1)  # [B,1,Q,N]
