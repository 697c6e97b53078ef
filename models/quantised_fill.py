"""Quantised experts into dense device slots, a batch of misses at a time.

A store whose experts are quantised (FP8 block-scaled, MXFP4) keeps them so in the host tier,
and a miss copies the quantised bytes; the device dequantises (models/expert_format.py).
Done one expert at a time that is ~25 CUDA calls a miss (six copies, each weight's
dequantisation kernels, three slot copies): on the H200 at full depth, 2.2 ms of host time
per MoE layer of a decode step, three times the dense store's (bench decode, fp8-full).

Here a batch of misses costs one copy each (a host-tier entry's tensors are contiguous, in
the shard's order, so its bytes land in one row of a device staging buffer), then one
dequantisation of gate and up together (adjacent in the shard, so one [n, 2I, H] view) and
one of down for the whole batch, and one indexed copy into the slots each:

    staging [n, entry bytes]  --view-->  gate_up [n,2I,H] q + scales, down [n,H,I] q + scales
    dense = dequantize(...)   --index_copy_-->  cache.gate_up[slots], cache.down[slots]

The arithmetic is expert_format's (transformers' own) over a leading batch dimension, so
a slot holds the same bits as before. Batches are cut so that the staging rows and the
dequantisation's temporaries stay under DEQUANT_WORKSPACE_BYTES, which the memory plan
reserves for a quantised store (models/memory_plan.workspace_bytes).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

from extractor.formats import SCALE_SUFFIX
from .expert_format import dequantize

DEQUANT_WORKSPACE_BYTES = 256 << 20
# per dense element of a batch: float32 and int32 temporaries of the dequantisation, and
# the dense result (at most 8 + 2 bytes), beside the staged quantised bytes
TEMPORARY_BYTES_PER_ELEMENT = 10


def experts_per_batch(entry_bytes: int, dense_elements: int) -> int:
    """Experts one dequantisation batch holds within DEQUANT_WORKSPACE_BYTES (at least one)."""
    return max(1, DEQUANT_WORKSPACE_BYTES // (entry_bytes + TEMPORARY_BYTES_PER_ELEMENT * dense_elements))


@dataclass(frozen=True)
class _Part:
    """One shard tensor's place in a staging row."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offset in the row

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape)


class QuantisedFill:
    """fill(slots, entries): dequantise quantised shards (dicts of the shard's tensors, in the
    format's order) into the dense slot buffers, queued on the current stream."""

    def __init__(self, fmt: dict, dtype: torch.dtype, gate_up: torch.Tensor, down: torch.Tensor,
                 gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None):
        self.weights, self.names, self.dtype = fmt["weights"], list(fmt["tensors"]), dtype
        self.scale = SCALE_SUFFIX[self.weights]
        self.gate_up, self.down = gate_up, down  # [S,2I,H], [S,H,I]
        self.gate_up_bias, self.down_bias = gate_up_bias, down_bias  # [S,2I], [S,H] or None
        self.device = gate_up.device
        self.layout: dict[str, _Part] = {}  # learnt from the first entry
        self.batch = 1
        self._staging: torch.Tensor | None = None  # uint8 [batch, row_bytes], on the device
        # host-tier entries seen: first tensor's address -> the entry's bytes (entries never
        # move, and the view keeps its buffer alive, so no other tensor lands at that address)
        self._whole: dict[int, torch.Tensor] = {}
        # The staging rows are shared: one batch's copies, dequantisation and slot writes are
        # queued together (loader threads fill slots too).
        self._lock = threading.Lock()

    def fill(self, slots: list[int], entries: list[dict[str, torch.Tensor]], non_blocking: bool) -> None:
        if not slots:
            return
        with self._lock:
            self._learn(entries[0])
            for first in range(0, len(slots), self.batch):
                self._fill_batch(slots[first:first + self.batch], entries[first:first + self.batch], non_blocking)

    # --- layout -----------------------------------------------------------------------------
    def _learn(self, entry: dict[str, torch.Tensor]) -> None:
        if self.layout:
            return
        start = 0
        for name in self.names:  # the shard's order: gate, up, down, their scales, their biases
            tensor = entry[name]
            start = -(-start // tensor.element_size()) * tensor.element_size()
            self.layout[name] = _Part(name, tensor.dtype, tuple(tensor.shape), start)
            start += tensor.nbytes
        row_bytes = -(-start // 16) * 16
        self.batch = experts_per_batch(row_bytes, self.gate_up[0].numel() + self.down[0].numel())
        with torch.inference_mode(False):
            self._staging = torch.empty((self.batch, row_bytes), dtype=torch.uint8, device=self.device)

    # --- one batch ----------------------------------------------------------------------------
    def _fill_batch(self, slots: list[int], entries: list[dict[str, torch.Tensor]], non_blocking: bool) -> None:
        rows = self._staging[:len(slots)]
        for row, entry in zip(rows, entries):
            whole = self._whole.get(entry[self.names[0]].data_ptr())
            if whole is None and (whole := self._contiguous_bytes(entry)) is not None:
                self._whole[whole.data_ptr()] = whole
            if whole is not None:  # a host-tier entry: one copy
                row[:whole.numel()].copy_(whole, non_blocking=non_blocking)
            else:
                for part in self.layout.values():
                    _view(row.unsqueeze(0), part, 1)[0].copy_(entry[part.name], non_blocking=non_blocking)
        index = _device_index(slots, self.device)
        self.gate_up.index_copy_(0, index, self._dequantised(rows, "gate_proj", 2))  # gate and up: adjacent
        self.down.index_copy_(0, index, self._dequantised(rows, "down_proj", 1))
        if self.gate_up_bias is not None:
            self.gate_up_bias.index_copy_(0, index, _view(rows, self.layout["gate_proj_bias"], 2).to(self.dtype))
            self.down_bias.index_copy_(0, index, _view(rows, self.layout["down_proj_bias"], 1).to(self.dtype))

    def _dequantised(self, rows: torch.Tensor, name: str, count: int) -> torch.Tensor:
        """`count` adjacent projections from `name` on, dequantised as one [n, count*O, ...] tensor."""
        weight = _view(rows, self.layout[name], count)
        scale = _view(rows, self.layout[name + self.scale], count)
        return dequantize(self.weights, weight, scale, self.dtype)

    def _contiguous_bytes(self, entry: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The entry's bytes as one uint8 tensor when its tensors lie back to back in one buffer
        exactly as a staging row holds them (a host-tier entry does); else None."""
        first = entry[self.names[0]]
        base = first.data_ptr()
        for part in self.layout.values():
            tensor = entry[part.name]
            if (tensor.data_ptr() != base + part.start or not tensor.is_contiguous()
                    or tensor.dtype != part.dtype or tuple(tensor.shape) != part.shape
                    or tensor.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()):
                return None
        end = max(part.start + part.nbytes for part in self.layout.values())
        flat = first.view(-1).view(torch.uint8)
        if flat.storage_offset() + end > first.untyped_storage().nbytes():
            return None
        return flat.as_strided((end,), (1,))


def _view(rows: torch.Tensor, part: _Part, count: int) -> torch.Tensor:
    """Rows [n, row bytes] as `count` adjacent copies of `part` stacked on its first dimension:
    [n, count*shape[0], *shape[1:]] of its dtype (the parts are equal in shape and dtype)."""
    data = rows[:, part.start:part.start + count * part.nbytes].view(part.dtype)
    return data.unflatten(1, (count * part.shape[0], *part.shape[1:]))


def _device_index(slots: list[int], device: torch.device) -> torch.Tensor:
    """Slot numbers on the device: from pinned memory on CUDA, so the copy does not wait on the host."""
    if device.type != "cuda":
        return torch.tensor(slots, dtype=torch.long)
    return torch.tensor(slots, dtype=torch.long, pin_memory=True).to(device, non_blocking=True)

