"""The pinned host tier: page-locked copies of experts under a hard byte cap, LRU eviction.

A hit here costs a PCIe copy instead of a disk read; below it the memory-mapped store is
the disk tier (nothing is written back: the store is read-only).

Memory is pinned in chunks whose size is a power of two (torch's caching host allocator
rounds every pinned allocation up to one, so a chunk of any other size would pin more
than it counts), each holding whole entries; chunks are allocated as the tier fills and
reused after eviction, never freed while it lives. The cap is checked on chunks
*reserved*, before they are pinned, so concurrent loads can never pin past it:

    pinned_bytes <= capacity_bytes   at every moment (asserted)

An entry handed out by get()/put() is *lent*: the dict of its views is read by a copy that
may still be queued on a CUDA stream. A lent entry is never evicted, and its slot is not
rewritten until the copy queued from it has finished: when the borrower drops the dict
(after queuing its copy), an event is recorded on the copy stream, and the next writer
of that slot waits on it. A borrower keeps the dict, not single views, while it uses them.

Exclusive use (models.cache, when the cap is smaller than the store): the tier then holds
what the device does *not* — take() hands an entry to the device and drops it, adopt()
receives the device's evicted experts (a device-to-host copy queued on the write-back
stream, so it runs beside the host-to-device copies, on the other copy engine), and
stage() lends a slot outside the LRU for a disk read on its way to the device — so device
slots plus host entries hold that many distinct experts, not the larger of the two. A slot
last touched on one stream is used on the other only after a device-side wait on its event.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

Key = tuple[int, int]  # (layer, expert)
CHUNK_BYTES = 256 << 20  # largest pinned allocation: ~0.25 s of cudaHostAlloc, at most a few % unused


class HostTierError(ValueError):
    """A cap that cannot hold the working set, or an entry of the wrong size."""


def chunk_sizes(capacity: int | None, entry_bytes: int) -> list[int]:
    """The power-of-two chunks, largest first, that a cap of `capacity` bytes allows (None: endless)."""
    entry_bytes = entry_stride(entry_bytes)
    biggest = max(CHUNK_BYTES, _pow2_ceil(8 * entry_bytes))  # at least 8 entries a chunk: under 1/8 unused
    sizes, left = [], capacity
    while left is None or left >= entry_bytes:
        size = biggest if left is None else min(biggest, _pow2_floor(left))
        if size < entry_bytes:
            break
        sizes.append(size)
        if left is None:
            return sizes  # callers only ask how big the next one is
        left -= size
    return sizes


def tier_size(capacity: int, entry_bytes: int, max_entries: int) -> tuple[int, int]:
    """(bytes pinned, entries held) by a tier under `capacity` that never needs more than
    `max_entries`: the first chunks of chunk_sizes(capacity) that hold them. A HostTier capped at
    those bytes allocates exactly those chunks."""
    pinned = entries = 0
    entry_bytes = entry_stride(entry_bytes)
    for size in chunk_sizes(capacity, entry_bytes):
        if entries >= max_entries:
            break
        pinned, entries = pinned + size, entries + size // entry_bytes
    return pinned, min(entries, max_entries)


def entry_stride(entry_bytes: int) -> int:
    """Bytes an entry takes in a chunk: its parts, rounded up so every entry starts 16-byte aligned."""
    return -(-entry_bytes // 16) * 16


def entries_within(capacity: int | None, entry_bytes: int) -> int:
    """Entries of `entry_bytes` a tier capped at `capacity` can hold (whole entries per chunk)."""
    if capacity is None:
        raise ValueError("an unbounded tier holds any number of entries")
    return sum(size // entry_stride(entry_bytes) for size in chunk_sizes(capacity, entry_bytes))


@dataclass(frozen=True)
class HostTierStats:
    capacity_bytes: int | None
    pinned_bytes: int  # chunks reserved (allocated or being allocated)
    peak_pinned_bytes: int
    entries: int
    lent: int  # entries whose views are still held by a borrower
    evictions: int


@dataclass
class _Slot:
    chunk: torch.Tensor  # uint8 [chunk bytes]
    offset: int
    lent: int = 0  # lendings whose dict of views is still held
    views: "dict[str, torch.Tensor] | None" = None  # made once: the slot's parts, in the layout's order
    detached: bool = False  # lent outside the LRU (taken, or a staging read): freed when given back
    copied: "torch.cuda.Event | None" = None  # recorded after the last borrower queued its copy
    stream: "torch.cuda.Stream | None" = None  # where the borrower of the moment queues its copy
    shared: bool = False  # lent again while lent: no one borrower's event covers every copy
    gate_up: "torch.Tensor | None" = None  # gate and up as one [2I,H] view, where adjacent (_fused_gate_up)


class HostTier:
    """get(key) -> {name: tensor} or None; put(key, parts) -> the same names, pinned. Entries are a
    shard's tensors as models.cache.host_parts gives them (dense weights in the compute dtype, or
    quantised weights with their scales); every entry of a store has the same layout."""

    def __init__(self, capacity_bytes: int | None, *, entry_bytes: int | None = None, min_entries: int = 1,
                 copy_stream: "torch.cuda.Stream | None" = None, pin: bool | None = None):
        self.capacity_bytes = capacity_bytes
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.copy_stream = copy_stream  # host -> device copies read entries here
        self.writeback_stream: "torch.cuda.Stream | None" = None  # device -> host copies fill adopted ones
        self.min_entries = min_entries
        self._entry_bytes: int | None = None
        self._layout: list[tuple[str, torch.dtype, torch.Size, int]] = []  # per part: name, dtype, shape, offset
        self._entries: OrderedDict[Key, _Slot] = OrderedDict()  # LRU order: oldest first
        # Free slots, reused oldest first: the copy last queued from a slot freed long ago has
        # finished, so the next user seldom waits for it. Newest first chained every miss of an
        # exclusive tier: a write-back went into the slot the previous load was still reading,
        # so the two copy engines never ran at once.
        self._free: deque[_Slot] = deque()
        self._pinned = self._peak = self._evictions = 0
        self.max_entries: int | None = None  # exclusive use: entries kept below the slots (see keep_spares)
        self.spares = 0  # slots kept free in exclusive use: write-backs a caller may queue at once
        self._lock = threading.RLock()  # re-entrant: a view's finalizer may run while this thread holds it
        if entry_bytes is not None:
            self._set_entry_bytes(entry_bytes)

    # --- queries ------------------------------------------------------------------------
    @property
    def pinned_bytes(self) -> int:
        return self._pinned

    @property
    def has_layout(self) -> bool:
        """Whether entries' layout is known (define_layout, or a first put): read_in needs it."""
        return bool(self._layout)

    def stats(self) -> HostTierStats:
        with self._lock:
            lent = sum(1 for slot in self._entries.values() if slot.lent)
            return HostTierStats(self.capacity_bytes, self._pinned, self._peak, len(self._entries), lent,
                                 self._evictions)

    def __contains__(self, key: Key) -> bool:
        with self._lock:
            return key in self._entries

    # --- get / put ----------------------------------------------------------------------
    def get(self, key: Key) -> dict[str, torch.Tensor] | None:
        with self._lock:
            slot = self._entries.get(key)
            if slot is None:
                return None
            self._entries.move_to_end(key)
            self._after_last_copy(slot, self.copy_stream)
            return self._lend(slot)

    def put(self, key: Key, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Pinned copies of `parts` (held until evicted); `parts` themselves when the cap is full of
        lent entries (the caller copies from pageable memory, slower but correct)."""
        self._learn_layout(parts)
        with self._lock:
            slot = self._entries.get(key)
            if slot is not None:  # another loader put it first
                self._entries.move_to_end(key)
                return self._lend(slot)
            slot = self._take_slot()
        if slot is None:
            return parts
        self._wait_copied(slot)  # the last copy queued from this slot has read it
        views = self._views(slot)
        for name, view in views.items():
            view.copy_(parts[name])
        with self._lock:
            winner = self._entries.get(key)
            if winner is not None:  # another loader put the same expert meanwhile: keep theirs
                self._free.append(slot)
                return self._lend(winner)
            self._entries[key] = slot
            return self._lend(slot)

    # --- exclusive use (see the module docstring) ---------------------------------------
    def define_layout(self, parts: dict[str, torch.Tensor]) -> None:
        """Fix the entry layout up front from example parts (meta tensors do): stage() and
        adopt() hand out views before any put() has shown one."""
        self._learn_layout(parts)

    def keep_spares(self, spares: int) -> None:
        """Exclusive use: keep `spares` slots out of the LRU (as many as its cap allows while
        one layer's working set stays cached), for the copies a load has in flight. A write-back
        precedes the take or the staged read of the same load (the incoming expert refills the
        evicted one's device slot), so without spares each would evict a cached entry, and that
        entry's next use would read the store, and evict another: a cascade of disk reads."""
        if self.capacity_bytes is None or self._entry_bytes is None:
            raise HostTierError("spares need a capped tier of a known entry size")
        held = entries_within(self.capacity_bytes, self._entry_bytes)
        self.max_entries = max(self.min_entries, held - spares)
        self.spares = held - self.max_entries

    def pin_all(self) -> float:
        """Allocate every chunk the cap allows now; returns the seconds it took. For exclusive use,
        where the tier is sure to fill: allocated as it filled, the chunks were pinned during the
        first minutes of decoding, and each cudaHostAlloc held the driver's lock, stalling every
        thread's copies (at full depth under a 32 GiB tier: 14% of the decoding thread's time,
        py-spy, bench/results/spy_full24_summary.txt)."""
        started = time.perf_counter()
        with self._lock:
            while (slot := self._grow()) is not None:
                self._free.append(slot)
        return time.perf_counter() - started

    def take(self, key: Key) -> dict[str, torch.Tensor] | None:
        """The entry's views, and the entry leaves the tier: its slot is free again once the
        borrower has dropped the views (after queuing its copy)."""
        with self._lock:
            slot = self._entries.pop(key, None)
            if slot is None:
                return None
            slot.detached = True
            self._after_last_copy(slot, self.copy_stream)  # it may still be filling from the device
            return self._lend(slot)

    def stage(self) -> dict[str, torch.Tensor] | None:
        """Views of a slot outside the LRU to read a shard into (it is free again when the views
        are dropped), or None when every slot is lent (the caller reads into pageable memory)."""
        with self._lock:
            slot = self._take_slot()
            if slot is None:
                return None
            slot.detached = True
        self._wait_copied(slot)  # the CPU is about to write it
        return self._lend(slot)

    def adopt(self, key: Key) -> dict[str, torch.Tensor] | None:
        """Views of a new entry for `key` to copy the device's evicted expert into, or None when
        the tier is full of lent entries (the expert is then dropped: the store still has it).
        The entry is registered at once: whoever reads it queues its copy on the same copy
        stream, behind the one that fills it; a CPU writer of the slot after its eviction
        waits on the event recorded when these views are dropped."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return None
            if not self._make_room():
                return None
            slot = self._take_slot()
            if slot is None:
                return None
            self._entries[key] = slot
            stream = self.writeback_stream or self.copy_stream
            self._after_last_copy(slot, stream)  # a copy to the device may still be reading it
            return self._lend(slot, stream=stream)

    def read_in(self, key: Key, fill: Callable[[dict[str, torch.Tensor]], None]) -> bool:
        """Make `key` an entry by `fill(views)` writing it on the CPU (a store read ahead of need:
        models.cache.prefetch_host); False, and nothing changes, when it is already here or every
        slot is lent. The entry is registered only once filled, so no copy reads it half
        written; a fill that raises gives its slot back."""
        with self._lock:
            if key in self._entries:
                return False
            slot = self._take_slot()
            if slot is None:
                return False
        self._wait_copied(slot)  # the last copy queued from (or into) this slot is done
        try:
            fill(self._views(slot))
        except BaseException:
            with self._lock:
                self._free.append(slot)
            raise
        with self._lock:
            if key in self._entries or not self._make_room():  # written back meanwhile: keep that one;
                self._free.append(slot)  # or every entry lent: the spares stay spare
                return False
            self._entries[key] = slot
            return True

    @staticmethod
    def _after_last_copy(slot: _Slot, stream: "torch.cuda.Stream | None") -> None:
        """Order `stream`'s next copy after the last one queued from or into `slot` (on the
        device: the host does not wait)."""
        if stream is not None and slot.copied is not None:
            stream.wait_event(slot.copied)

    def _wait_copied(self, slot: _Slot) -> None:
        if slot.copied is not None:
            slot.copied.synchronize()  # the last copy queued from (or into) this slot is done
            slot.copied = None

    def warm(self, store, keys: Iterable[Key], dtype: torch.dtype) -> None:
        """Read `keys` from the store into the tier (bench: every expert in host RAM up front)."""
        from .cache import host_parts

        for key in keys:
            if self.get(key) is None:
                self.put(key, host_parts(store.load_expert(*key), store.expert_format, dtype))

    # --- slots (called with the lock held, except the allocation) ------------------------------
    def _take_slot(self) -> _Slot | None:
        if self._free:
            return self._free.popleft()
        slot = self._grow()
        return slot if slot is not None else self._evict_one()

    def _grow(self) -> _Slot | None:
        """Allocate the next chunk the cap allows: its first slot for the caller (other threads may
        take the rest while this one pins), the others onto the free list; None at the cap."""
        size = self._next_chunk()
        if size is None:
            return None
        self._pinned += size  # reserved before pinning: concurrent puts see it at once
        self._peak = max(self._peak, self._pinned)
        assert self.capacity_bytes is None or self._pinned <= self.capacity_bytes, "host tier over its cap"
        self._lock.release()
        try:
            chunk = _allocate(size, self.pin)
        except BaseException:
            with self._lock:
                self._pinned -= size
            raise
        finally:
            self._lock.acquire()
        slots = [_Slot(chunk, offset) for offset in range(0, size - self._entry_bytes + 1, self._entry_bytes)]
        self._free.extend(slots[1:])
        return slots[0]

    def _next_chunk(self) -> int | None:
        left = None if self.capacity_bytes is None else self.capacity_bytes - self._pinned
        sizes = chunk_sizes(left, self._entry_bytes)
        return sizes[0] if sizes else None

    def _make_room(self) -> bool:
        """Exclusive use: evict down to max_entries - 1 entries, for one more (lock held); False
        where every entry left is lent."""
        while self.max_entries is not None and len(self._entries) >= self.max_entries:
            victim = self._evict_one()
            if victim is None:
                return False
            self._free.append(victim)
        return True

    def _evict_one(self) -> _Slot | None:
        victim = next((key for key, slot in self._entries.items() if slot.lent == 0), None)
        if victim is None:
            return None
        self._evictions += 1
        return self._entries.pop(victim)

    # --- lending ------------------------------------------------------------------------
    def _lend(self, slot: _Slot, stream: "torch.cuda.Stream | None" = None) -> dict[str, torch.Tensor]:
        """The slot's views in a dict of their own, given back when the borrower drops it: one
        finalizer a lending (a miss lends twice: ~1/3 of its host work was per-view bookkeeping)."""
        lent = _Lent(self._views(slot))
        lent.gate_up, lent.copied = slot.gate_up, [None]
        slot.shared = slot.lent > 0
        slot.lent += 1
        slot.stream = stream or self.copy_stream
        weakref.finalize(lent, self._give_back, slot, lent.copied)
        return lent

    def _give_back(self, slot: _Slot, copied: list) -> None:
        with self._lock:
            slot.lent -= 1
            if slot.lent == 0 and slot.stream is not None:
                # the borrower has queued its copy by the time it drops the views: this event
                # completes after that copy, so whoever uses the slot next waits on it (the
                # borrower's own, where it said one covers its copies: two CUDA calls a copy less)
                slot.copied = None if slot.shared else copied[0]
                if slot.copied is None:
                    slot.copied = torch.cuda.Event()
                    slot.copied.record(slot.stream)
                slot.shared = False
            if slot.lent == 0 and slot.detached:
                slot.detached = False
                self._free.append(slot)

    def _views(self, slot: _Slot) -> dict[str, torch.Tensor]:
        if slot.views is None:  # the layout is fixed once learnt: a slot's views never change
            with torch.inference_mode(False):  # plain views, whatever mode the first caller runs in
                slot.views = {name: slot.chunk[slot.offset + start: slot.offset + start + _nbytes(dtype, shape)]
                              .view(dtype).view(shape) for name, dtype, shape, start in self._layout}
                slot.gate_up = _fused_gate_up(slot.views)
        return slot.views

    # --- layout -------------------------------------------------------------------------
    def _learn_layout(self, parts: dict[str, torch.Tensor]) -> None:
        layout, start = [], 0
        for name, part in parts.items():
            if start % part.element_size():
                raise HostTierError(f"part {name} would start at byte {start}, not a multiple of its item size")
            layout.append((name, part.dtype, part.shape, start))
            start += part.nbytes
        with self._lock:
            if not self._layout:
                if self._entry_bytes is not None and entry_stride(start) != self._entry_bytes:
                    raise HostTierError(f"entry of {start} bytes, the tier was sized for {self._entry_bytes}")
                self._set_entry_bytes(start)
                self._layout = layout
            elif layout != self._layout:
                raise HostTierError(f"entry layout {[(n, d, tuple(s)) for n, d, s, _ in layout]} differs from the "
                                    f"tier's {[(n, d, tuple(s)) for n, d, s, _ in self._layout]}")

    def _set_entry_bytes(self, entry_bytes: int) -> None:
        entry_bytes = entry_stride(entry_bytes)
        if self.capacity_bytes is not None:
            held = entries_within(self.capacity_bytes, entry_bytes)
            if held < self.min_entries:
                raise HostTierError(
                    f"host tier cap of {self.capacity_bytes} bytes holds {held} experts of {entry_bytes} bytes, "
                    f"fewer than one layer's working set of {self.min_entries}")
        self._entry_bytes = entry_bytes


class _Lent(dict):
    """A lent entry's views: a dict that can be watched for its end (a plain dict cannot), with
    the slot's fused gate_up view, and a cell where the borrower may leave an event recorded
    after all its copies from or into the entry (mark_copied)."""

    __slots__ = ("__weakref__", "gate_up", "copied")


def mark_copied(parts: dict[str, torch.Tensor], event: "torch.cuda.Event") -> None:
    """Tell the tier that `event`, recorded on the borrower's stream after every copy it queued
    from or into the lent entry `parts`, covers them: giving the entry back then records nothing
    (an event a copy was two CUDA calls on the decoding thread). Nothing for parts not lent."""
    if isinstance(parts, _Lent):
        parts.copied[0] = event


def fused_gate_up(parts: dict[str, torch.Tensor]) -> "torch.Tensor | None":
    """Gate and up as one [2I,H] tensor where `parts` holds them adjacent in one buffer (a tier
    entry, the shard's order): a copy of a slot's gate_up is then one CUDA call, not two."""
    if isinstance(parts, _Lent):
        return parts.gate_up
    return _fused_gate_up(parts)


def _fused_gate_up(parts: dict[str, torch.Tensor]) -> "torch.Tensor | None":
    gate, up = parts.get("gate_proj"), parts.get("up_proj")
    if (gate is None or up is None or gate.dtype != up.dtype or gate.shape != up.shape or gate.dim() != 2
            or not gate.is_contiguous() or not up.is_contiguous()
            or gate.untyped_storage().data_ptr() != up.untyped_storage().data_ptr()  # one buffer
            or up.data_ptr() != gate.data_ptr() + gate.nbytes):
        return None
    return gate.as_strided((2 * gate.shape[0], gate.shape[1]), (gate.shape[1], 1))  # [2I,H]


def _allocate(nbytes: int, pin: bool) -> torch.Tensor:
    """One chunk: page-locked when `pin` (what makes host->GPU copies asynchronous and fast)."""
    with torch.inference_mode(False):
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)


def _nbytes(dtype: torch.dtype, shape: torch.Size) -> int:
    return shape.numel() * dtype.itemsize


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1) if n > 0 else 0


def _pow2_ceil(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1
