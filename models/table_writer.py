"""Writes to the expert cache's device table: (layer, expert) -> slot, -1 when not resident.

On CUDA every write is queued on the copy stream, behind the copies it publishes (see
models.cache). A batch of entries is one small host-to-device copy and one indexed write. The
copy reads from a ring of pinned rows allocated once, written with numpy: building a pinned
tensor per write (torch.tensor(..., pin_memory=True) and .to()) cost the decoding thread
~150 us a write at full depth under 24 GiB, two writes a MoE layer (py-spy,
bench/results/spy_full24_host_summary.txt).
"""

from __future__ import annotations

import threading

import torch

RING_ROWS = 64  # a row is reused RING_ROWS writes later: its copy has long run (waited for if not)
ROW_ENTRIES = 512  # entries one row holds: a batch-16 step's loads and evictions in a layer; more are split


class TableWriter:
    def __init__(self, table: torch.Tensor, stream: "torch.cuda.Stream | None"):
        self.table, self.stream = table, stream  # [layers, E+1] long
        self._width = table.shape[1]
        self._lock = threading.Lock()  # loader threads and the decoding thread write at once
        if stream is None:
            return
        with torch.inference_mode(False):
            self._flat = table.view(-1)
            self._host = torch.empty((RING_ROWS, 2, ROW_ENTRIES), dtype=torch.long, pin_memory=True)
            self._device = torch.empty((2, ROW_ENTRIES), dtype=torch.long, device=table.device)
        self._host_numpy = self._host.numpy()
        self._events: list["torch.cuda.Event | None"] = [None] * RING_ROWS
        self._next_row = 0
        self._views: dict[tuple[int, int], tuple] = {}  # (row, n) -> the tensors one write uses

    def put(self, entries: list[tuple[tuple[int, int], int]]) -> None:
        """Set entries ((layer, expert), slot); where a key repeats, the last one wins."""
        if not entries:
            return
        if self.stream is None:
            for key, slot in entries:
                self.table[key] = slot
            return
        flat = {layer * self._width + expert: slot for (layer, expert), slot in entries}
        where, slots = list(flat), list(flat.values())
        with self._lock, torch.cuda.stream(self.stream):
            if len(where) == 1:  # one fill: no staging, no event
                self._flat[where[0]].fill_(slots[0])
                return
            for start in range(0, len(where), ROW_ENTRIES):
                self._write(where[start:start + ROW_ENTRIES], slots[start:start + ROW_ENTRIES])

    def _write(self, where: list[int], slots: list[int]) -> None:
        """One ring row's write, on the copy stream (current), with the lock held."""
        row, n = self._next_row, len(where)
        self._next_row = (row + 1) % RING_ROWS
        event = self._events[row]
        if event is not None:
            event.synchronize()  # the copy that last read this row (RING_ROWS writes ago) has run
        self._host_numpy[row, 0, :n] = where
        self._host_numpy[row, 1, :n] = slots
        host, device, device_where, device_slots = self._views_of(row, n)
        device.copy_(host, non_blocking=True)
        self._flat.index_put_((device_where,), device_slots)
        if event is None:
            event = self._events[row] = torch.cuda.Event()
        event.record(self.stream)

    def _views_of(self, row: int, n: int) -> tuple:
        views = self._views.get((row, n))
        if views is None:
            with torch.inference_mode(False):
                device = self._device[:, :n]
                views = self._views[(row, n)] = (self._host[row, :, :n], device, device[0], device[1])
        return views
