"""The expert cache: (layer, expert) slots in a byte budget, tiers device <- host <- disk.

Every expert of a store has the same shapes, so the budget is a number of equal
*slots*, preallocated once on the device as two buffers:

    gate_up [S, 2I, H]   gate rows first, as transformers fuses them
    down    [S, H, I]

A resident expert is a slot index, and a device table maps (layer, expert) -> slot
(-1: not resident), so compute looks its experts up on the device and allocates
nothing. The table is written where the copy is queued (the side stream on CUDA), so
a compute that waits for a copy also sees the table entry it made. A load (hit in the host tier, or read from the store's
safetensors shard) copies into a reserved slot on a loader thread; on CUDA the copy
runs on a side stream and the compute stream waits on its event, so loads overlap
compute. In-flight loads hold their slot, so bytes never exceed the budget.

Verbs come in pairs: `acquire` pins resident experts (loading misses), `release`
unpins; `prefetch` starts loads without pinning; `evict` frees the policy's choice
among unpinned slots. A pinned slot is never evicted. `prefetch_host` reads predicted
experts from the store into the host tier only, never touching a device slot.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import Counter, OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from extractor.formats import DENSE
from extractor.store import ExpertStore, StoreError

from .quantised_fill import QuantisedFill
from .host_tier import HostTier, entries_within, fused_gate_up, mark_copied
from .table_writer import TableWriter

Key = tuple[int, int]  # (layer, expert)
log = logging.getLogger("cadre.cache")
HOST_READERS = 4  # threads reading predicted experts into the host tier, one read per tensor each
HOST_READS_IN_FLIGHT = 16  # at most this many such reads queued or running: two layers' top-8 at batch 1

@dataclass
class CacheStats:
    queries: int = 0
    hits: int = 0
    misses: int = 0
    loads: Counter = field(default_factory=Counter)  # tier -> count ("host", "disk")
    evictions: int = 0
    bytes: int = 0
    capacity_bytes: int = 0
    load_seconds: float = 0.0
    prefetch: Counter = field(default_factory=Counter)  # issued / used / wasted
    bytes_loaded: int = 0  # bytes a load moved into a slot, in the store's format (quantised stays so)
    writebacks: int = 0  # evicted experts copied down into an exclusive host tier

    def copy(self) -> "CacheStats":
        return CacheStats(self.queries, self.hits, self.misses, Counter(self.loads), self.evictions,
                          self.bytes, self.capacity_bytes, self.load_seconds, Counter(self.prefetch),
                          self.bytes_loaded, self.writebacks)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


@dataclass
class _Slot:
    index: int
    pins: int = 0
    ready: bool = False
    prefetched: bool = False  # loaded ahead and not yet used
    future: Future | None = None
    event: "torch.cuda.Event | None" = None  # copy done (CUDA)
    error: BaseException | None = None


@dataclass
class _Misses:
    """The device work of one acquire's (or prefetch's) misses: decided under the lock one miss at
    a time, queued together by _issue, with one stream switch, one event and one table update per
    kind of copy. Queued one miss at a time, a miss cost ~25 CUDA calls of host time: at full depth
    (~320 misses a token at 24 GiB) the host issued a miss more slowly than the GPU copied one,
    so the write-backs and the loads never overlapped."""

    unmapped: list[Key] = field(default_factory=list)  # evicted: their table entries go first
    writebacks: list[tuple[Key, "_Slot"]] = field(default_factory=list)  # evicted, copied down to the host tier
    from_memory: list[tuple[Key, "_Slot"]] = field(default_factory=list)  # loads from the host tier
    from_disk: list[tuple[Key, "_Slot"]] = field(default_factory=list)  # store reads, on the loader threads

    def __bool__(self) -> bool:
        return bool(self.unmapped or self.writebacks or self.from_memory or self.from_disk)


@dataclass
class Lease:
    """Experts of one layer pinned by one acquire: hand it back to release."""

    layer: int
    slots: dict[int, int] = field(default_factory=dict)  # expert -> slot index, ready
    outcomes: dict[int, str] = field(default_factory=dict)  # expert -> hit | miss | prefetched
    pinned: dict[int, "_Slot"] = field(default_factory=dict)
    missing: list[int] = field(default_factory=list)  # asked for but left out: no room now

    @property
    def complete(self) -> bool:
        return not self.missing

    @property
    def empty(self) -> bool:
        """Nothing to compute: every slot unused (a lossy policy dropped them all)."""
        return not self.slots and not self.missing

    def slot_range(self) -> tuple[int, int]:
        """[first, end) spanning the pinned slots."""
        return min(self.slots.values()), max(self.slots.values()) + 1


class LRUPolicy:
    """Evict the least recently used unpinned expert."""

    name = "lru"

    def victim(self, order: Iterable[Key], cache: "ExpertCache", incoming: Key) -> Key | None:
        return next(iter(order), None)


class ExpertCache:
    def __init__(self, store: ExpertStore, *, device: str | torch.device = "cpu",
                 capacity_bytes: int, dtype: torch.dtype | None = None,
                 host_capacity_bytes: int | None = None, policy=None,
                 on_load: Callable[[Key, str, float], None] | None = None, load_workers: int | None = None,
                 host_tier: bool | None = None):
        self.store = store
        self.device = torch.device(device)
        self.dtype = dtype or store.dtype
        self.format = store.expert_format  # shards' weight format: what the host tier and a miss move
        shapes = _expert_shapes(store)
        self.intermediate, self.hidden = shapes
        self.slot_bytes = slot_bytes(store, self.dtype)
        self.num_slots = capacity_bytes // self.slot_bytes
        if self.num_slots < 1:
            raise ValueError(f"cache budget {capacity_bytes} B is smaller than one expert ({self.slot_bytes} B)")
        self.capacity_bytes = self.num_slots * self.slot_bytes
        self.policy = policy or LRUPolicy()
        self.on_load = on_load
        # Slot buffers, allocated once: outside inference mode, so the loader thread may
        # copy into them whatever mode the caller generates in.
        with torch.inference_mode(False):
            self.gate_up = torch.empty((self.num_slots, 2 * self.intermediate, self.hidden),
                                        dtype=self.dtype, device=self.device)  # [G,2I,H]
            self.down = torch.empty((self.num_slots, self.hidden, self.intermediate),
                                     dtype=self.dtype, device=self.device)  # [G,H,I]
            has_bias = _has_bias(store)  # gpt-oss
            self.gate_up_bias = torch.empty((self.num_slots, 2 * self.intermediate), dtype=self.dtype,
                                            device=self.device) if has_bias else None  # [G,2I]
            self.down_bias = torch.empty((self.num_slots, self.hidden), dtype=self.dtype,
                                         device=self.device) if has_bias else None  # [G,H]
        self._views_of_slot: dict[int, dict[str, torch.Tensor]] = {}  # see _slot_views
        self._gate_up_of_slot: dict[int, torch.Tensor] = {}  # see _slot_gate_up
        self._quantised = None if self.format["weights"] == DENSE else QuantisedFill(
            self.format, self.dtype, self.gate_up, self.down, self.gate_up_bias, self.down_bias)
        # Free slots, refilled oldest first (see _spare_slots below)
        self._free: deque[int] = deque(range(self.num_slots))
        self._slots: OrderedDict[Key, _Slot] = OrderedDict()  # LRU order: oldest first
        self._by_layer: dict[int, OrderedDict[int, _Slot]] = {}  # the same, per layer (per-layer policies)
        self._keep: frozenset = frozenset()  # keys a prefetch is loading, while it asks the policy for a victim
        self._lock = threading.Condition()
        # Loader threads of one OpenMP thread each: a long-lived thread with a torch thread
        # team of its own makes every team sleep between parallel regions on a small CPU
        # (see server.app.in_passing_thread), and its copies are memory-bound anyway. On a
        # GPU several read store files at once (reading and copying release the GIL): with a
        # host tier smaller than the store, misses are file reads, one after another otherwise.
        self.load_workers = load_workers or default_load_workers(self.device)
        self._loader = ThreadPoolExecutor(max_workers=self.load_workers, thread_name_prefix="cadre-loader",
                                          initializer=torch.set_num_threads, initargs=(1,))
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # Pinned host tier (GPU only; host_tier=True builds an unpinned one on the CPU, for tests):
        # capped, LRU, refused below one layer's working set (models.host_tier)
        self.host = None
        if self.device.type == "cuda" if host_tier is None else host_tier:
            self.host = HostTier(host_capacity_bytes, entry_bytes=host_entry_bytes(store, self.dtype),
                                 min_entries=store.top_k, copy_stream=self._copy_stream)
        total = sum(len(store.experts_present(layer)) for layer in store.moe_layers)
        self.exclusive = self._host_is_exclusive(host_capacity_bytes, total)
        if self.exclusive and self.host.pin:
            seconds = self.host.pin_all()
            log.info("host tier: %.1f GiB pinned up front in %.1f s", self.host.pinned_bytes / 2**30, seconds)
        # Write-backs (device -> host) on a stream of their own: they run beside the loads'
        # host -> device copies on the other copy engine, where one stream queued each load
        # behind the write-back that frees its slot (a miss cost two copies, one after the other)
        self._writeback_stream = None
        if self.exclusive and self._copy_stream is not None:
            self._writeback_stream = self.host.writeback_stream = torch.cuda.Stream(self.device)
        # Threads that read one shard in parallel chunks into a staged host slot: a miss in every
        # memory tier is on its step's critical path, and one thread's page-cache copy is slow
        # (a pool of its own: a loader thread waits on these reads)
        self._readers = ThreadPoolExecutor(max_workers=self.load_workers, thread_name_prefix="cadre-reader") \
            if self.exclusive and self.load_workers > 1 else None
        self._written_back: dict[int, "torch.cuda.Event"] = {}  # slot index -> its write-back copied
        # Store reads into the host tier ahead of need (prefetch_host): a pool of their own, so a
        # loader thread may wait on one (the loaders' pool could be full of such waiters)
        self._host_readers: ThreadPoolExecutor | None = None
        self._host_reads: dict[Key, Future] = {}
        self._host_prefetched: set[Key] = set()  # read ahead and not yet used
        self._taken: dict[Key, dict[str, torch.Tensor]] = {}  # exclusive: taken up ahead of a write-back
        self._deferred: list[tuple[Key, _Slot]] = []  # write-backs left for flush_writebacks()
        self._deferred_slots: set[int] = set()  # their slots (free, not to be refilled before)
        self._stats = CacheStats(capacity_bytes=self.capacity_bytes)
        self._last_use: dict[int, "torch.cuda.Event"] = {}  # slot index -> last compute reading it
        # When the budget holds every expert nothing is ever evicted: a layer whose experts
        # are all resident then needs no host work at all (layer_is_complete).
        self.holds_everything = self.num_slots >= total
        # Slots kept free ahead of need when evictions are written back: a load then refills a
        # slot evicted some misses ago, whose write-back has finished, and the write-backs of
        # its own batch run beside it on the other copy engine (refilling the slot just evicted
        # made every load wait for the write-back before it). ~64 = eight layers' misses at
        # batch 1, under 4% of the slots. (Never where the budget holds every expert: a spare
        # kept free there evicts a resident expert, and a layer whose experts are all resident
        # for good is what lets a decode step skip host work and be compiled whole.)
        self._spare_slots = min(64, self.num_slots // 32) \
            if self._writeback_stream is not None and not self.holds_everything else 0
        self._complete: dict[int, tuple[int, int]] = {}  # layer -> its slots' range [first, end)
        with torch.inference_mode(False):
            # [num_layers, E+1] slot of (layer, expert), -1 = not resident; the last column
            # serves top-k index -1 (a slot that selects nothing, weight 0): any valid slot.
            self.table = torch.full((store.num_layers, store.num_experts + 1), -1, dtype=torch.long,
                                    device=self.device)
            self.table[:, -1] = 0
            # Lookups of complete layers are counted on the device (no sync in the forward):
            # distinct experts per forward and layer, read when stats() is asked for.
            self._table_queries = torch.zeros(store.num_layers, dtype=torch.long, device=self.device)
        self._table_writes = TableWriter(self.table, self._copy_stream)
        self._counted_table_queries = 0
        self._layer_id_tensors: dict[tuple[int, ...], torch.Tensor] = {}  # see count_step_hits

    def _host_is_exclusive(self, host_capacity_bytes: int | None, total: int) -> bool:
        """A capped host tier smaller than the store holds what the device does not (victim
        tier, see models.host_tier): device slots + host entries distinct experts, against the
        host tier alone when it keeps a copy of every expert it passes up (at 24 GiB GPU and
        32 GiB host for Qwen3-30B-A3B: ~96% of experts in memory, not ~58%). Dense experts
        only: a quantised entry cannot be rebuilt from a dequantised slot. A tier that holds
        the whole store keeps its copies: nothing then needs writing back."""
        if self.host is None or host_capacity_bytes is None or self.format["weights"] != DENSE:
            return False
        if entries_within(host_capacity_bytes, host_entry_bytes(self.store, self.dtype)) >= total:
            return False
        slot = self._slot_views(0)  # an entry has a slot's shapes, in the shard's tensor order
        self.host.define_layout({name: torch.empty_like(slot[name], device="meta") for name in self.format["tensors"]})
        self.host.keep_spares(self.load_workers + 1)  # staged reads in flight, and the take behind a write-back
        return True

    # --- queries -------------------------------------------------------------
    def stats(self) -> CacheStats:
        """A snapshot of the counters (reads the device's lookup counters: one sync)."""
        table_queries = int(self._table_queries.sum())
        with self._lock:
            new = table_queries - self._counted_table_queries
            self._counted_table_queries = table_queries
            self._stats.queries += new
            self._stats.hits += new
            snapshot = self._stats.copy()
            snapshot.bytes = len(self._slots) * self.slot_bytes
            return snapshot

    def resident(self) -> list[Key]:
        with self._lock:
            return [key for key, slot in self._slots.items() if slot.ready]

    def pinned(self) -> int:
        """Pins held now, over all slots: 0 whenever no forward is running (a leak check)."""
        with self._lock:
            return sum(slot.pins for slot in self._slots.values())

    def is_resident(self, key: Key) -> bool:
        with self._lock:
            slot = self._slots.get(key)
            return slot is not None and slot.ready

    def preload(self, keys: list[Key]) -> None:
        """Make `keys` resident now (blocking), as many as the budget holds."""
        by_layer: dict[int, list[int]] = {}
        for layer, expert in keys:
            by_layer.setdefault(layer, []).append(expert)
        for layer, experts in by_layer.items():
            while experts:
                lease = self.acquire(layer, experts)
                self.release(lease)
                experts = [e for e in experts if e not in lease.slots]

    # --- the device table -------------------------------------------------------------
    def layer_is_complete(self, layer: int) -> bool:
        """True once every expert of `layer` is resident for good (the budget holds the
        whole store): its forward then needs no host work."""
        if layer in self._complete:
            return True
        if not self.holds_everything:
            return False
        with self._lock:
            present = self.store.experts_present(layer)
            slots = [self._slots.get((layer, e)) for e in present]
            if not present or any(s is None or not s.ready for s in slots):
                return False
            for slot in slots:  # a copy still in flight must finish before lookups read it
                if slot.event is not None:
                    torch.cuda.current_stream(self.device).wait_event(slot.event)
            # Compute sees only this layer's slice of the buffers (a grouped matmul over
            # every slot of every layer is several times slower on CPU); index -1 -> its first.
            first, end = min(s.index for s in slots), max(s.index for s in slots) + 1
            self.table[layer, -1] = first
            self._complete[layer] = (first, end)
            return True

    def layer_slots(self, layer: int) -> tuple[int, int]:
        """[first, end): the slots of a complete layer."""
        return self._complete[layer]

    def all_slots(self) -> tuple[int, int]:
        return 0, self.num_slots

    def fits_layer(self, top_k_index: torch.Tensor) -> bool:
        """Whether any choice of `top_k_index` [T,K] fits the budget at once (known
        from shapes alone: no sync); if not, its experts may have to stream through."""
        return min(self.store.num_experts, top_k_index.numel()) <= self.num_slots

    def lookup(self, layer: int, top_k_index: torch.Tensor, first: int = 0) -> torch.Tensor:
        """Slots [T,K] (relative to `first`) of resident experts, looked up on the device."""
        slots = self.table[layer][top_k_index]  # [T,K]; index -1 -> the layer's first slot (complete layers)
        if not first:
            return slots
        # Elsewhere UNUSED (weight 0) maps to slot 0, which may lie below a lease's first: any slot
        # in range will do, but not a negative one (the grouped kernel's counts would drop it and
        # shift every later group onto the wrong rows). A complete layer needs no clamp (hot path).
        return slots - first if layer in self._complete else (slots - first).clamp_(min=0)

    def count_table_hits(self, layer: int, top_k_index: torch.Tensor) -> None:
        """Count a complete layer's lookup (every one a hit) on the device: no sync."""
        self._table_queries[layer] += self._distinct_experts(top_k_index.reshape(1, -1))[0]

    def count_step_hits(self, lookups: list[tuple[int, torch.Tensor]]) -> None:
        """Count the lookups of one decode step's complete layers [(layer, top_k_index [T,K])]
        together: five kernels a step where count_table_hits launches four a layer (in a
        captured step of 48 layers, ~190 launches and ~0.5 ms of an 8 ms token)."""
        if not lookups:
            return
        counts = self._distinct_experts(torch.stack([i.reshape(-1) for _, i in lookups]))  # [L']
        layers = self._layer_ids(tuple(layer for layer, _ in lookups))
        if layers is None:  # first seen inside a capture, where no index tensor can be copied up
            for row, (layer, _) in enumerate(lookups):
                self._table_queries[layer] += counts[row]
            return
        self._table_queries.index_add_(0, layers, counts)

    def _distinct_experts(self, index: torch.Tensor) -> torch.Tensor:
        """index [L',S] of top-k choices (-1: none) -> distinct experts per row [L'], on the device."""
        experts = self.store.num_experts
        used = torch.zeros((index.shape[0], experts + 1), dtype=torch.bool, device=index.device)
        used.scatter_(1, index % (experts + 1), True)  # index -1 lands in the last column
        return used[:, :-1].sum(dim=1)

    def _layer_ids(self, layers: tuple[int, ...]) -> torch.Tensor | None:
        """`layers` as a device index, made once per set of layers (outside any capture: the
        eager first step of a shape precedes its capture)."""
        ids = self._layer_id_tensors.get(layers)
        if ids is None and not (self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            with torch.inference_mode(False):
                ids = self._layer_id_tensors[layers] = torch.tensor(layers, dtype=torch.long, device=self.device)
        return ids

    # --- for eviction policies (called with the lock held) -------------------------
    def layer_count(self, layer: int) -> int:
        """Slots held (resident or loading) by `layer`."""
        return len(self._by_layer.get(layer, ()))

    def oldest_evictable(self, layer: int) -> Key | None:
        """`layer`'s least recently used expert that may be evicted now: resident, unpinned, and
        not one of the keys the prefetch in progress is loading."""
        for expert, slot in self._by_layer.get(layer, {}).items():
            if slot.pins == 0 and slot.ready and (layer, expert) not in self._keep:
                return layer, expert
        return None

    def layers_over(self, share: int) -> list[int]:
        """Layers holding more than `share` slots, the furthest over first (O(layers), where a
        scan of the LRU order for them is O(slots): ~2000 at full depth, per eviction)."""
        over = sorted(((len(held), layer) for layer, held in self._by_layer.items() if len(held) > share), reverse=True)
        return [layer for _, layer in over]

    def weights(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (gate_up [2I,H], down [H,I]) of a pinned slot."""
        return self.gate_up[slot], self.down[slot]

    # --- acquire / release ------------------------------------------------------
    def acquire(self, layer: int, experts: list[int], force: bool = False,
                defer_writebacks: bool = False) -> "Lease":
        """Pin as many of `experts` as free slots allow, loading misses.

        Returns a Lease: {expert: slot} for the pinned ones, ready to compute on, and
        {expert: outcome} with "hit", "miss" or "prefetched". Experts left out (the
        budget was full of other pinned experts, or the eviction policy keeps the other
        layers' slots) are in `missing`, for the caller's next call after it has released
        this lease: a budget smaller than a batch's working set streams experts through
        it instead of failing. `force` pins all of them, evicting the least recently used
        where the policy declines (a captured decode step cannot stream); the caller
        guarantees they fit the budget. `defer_writebacks` leaves this call's write-backs
        queued on the host until `flush_writebacks()` (see _issue): a caller that launches
        compute on the lease first keeps them off the path from routing to compute.
        """
        lease, misses = Lease(layer), _Misses()
        with self._lock:
            # Resident experts first: once they are pinned, a miss of this same call can
            # no longer evict one of them (in-order pinning made a working set one larger
            # than the budget miss on every expert, every step).
            ordered = sorted(experts, key=lambda e: (layer, e) not in self._slots)
            for i, expert in enumerate(ordered):
                slot = self._pin(lease, (layer, expert), misses, force)
                if slot is None:
                    lease.missing = ordered[i:]
                    break
            self._issue(misses, defer_writebacks)
        try:
            self._wait_all_ready(lease)
        except BaseException:
            self.release(lease)
            raise
        return lease

    def _pin(self, lease: "Lease", key: Key, misses: _Misses, force: bool = False) -> "_Slot | None":
        slot = self._slots.get(key)
        if slot is None:
            slot = self._reserve(key, misses, force)
            if slot is None:
                if lease.pinned and not force:
                    return None  # compute what is pinned first, then come back
                self._issue(misses)  # what this call decided goes out before it waits on others
                while (slot := self._reserve(key, misses, force)) is None:  # every slot pinned or loading: wait
                    self._lock.wait()
            self._start_load(key, slot, misses)
            lease.outcomes[key[1]] = "miss"
            self._stats.misses += 1
        else:
            lease.outcomes[key[1]] = "prefetched" if slot.prefetched else "hit"
            if slot.prefetched:
                self._stats.prefetch["used"] += 1
            slot.prefetched = False
            self._stats.hits += 1
            self._slots.move_to_end(key)
            self._by_layer[key[0]].move_to_end(key[1])
        self._stats.queries += 1
        slot.pins += 1
        lease.pinned[key[1]] = slot
        return slot

    def release(self, lease: "Lease") -> None:
        last_use = None
        if self._copy_stream is not None and lease.pinned:
            # a slot may be refilled by the copy stream once unpinned: that copy waits for
            # the kernels queued so far on this stream, which may still read it (one event
            # for the whole lease, not one per slot)
            last_use = torch.cuda.Event()
            last_use.record(torch.cuda.current_stream(self.device))
        with self._lock:
            for slot in lease.pinned.values():
                assert slot.pins > 0, f"release of an unpinned slot in layer {lease.layer}"
                slot.pins -= 1
                if last_use is not None:
                    self._last_use[slot.index] = last_use
            lease.pinned.clear()
            self._lock.notify_all()

    # --- prefetch ---------------------------------------------------------------
    def prefetch(self, keys: Iterable[Key]) -> int:
        """Start loading experts that are not resident, only into free slots or by
        evicting unpinned ones; never blocks. Returns how many loads it started."""
        started, misses, keys = 0, _Misses(), list(keys)
        keep = frozenset(keys)  # evicting one of its own keys to load another would only churn
        with self._lock:
            for key in keys:
                if key in self._slots or not self.store.has_expert(*key):
                    continue
                slot = self._reserve(key, misses, keep=keep)
                if slot is None:
                    break
                slot.prefetched = True
                self._stats.prefetch["issued"] += 1
                self._start_load(key, slot, misses)
                started += 1
            self._issue(misses)
        return started

    def prefetch_host(self, keys: Iterable[Key]) -> int:
        """Start store reads of predicted experts that no memory tier holds into the host tier,
        on threads of their own; never blocks, never touches the device. Returns how many it
        started. A miss in every memory tier waits on the step's critical path for its shard to
        be read (at full depth under 24 GiB GPU and 32 GiB host: 31% of the decoding thread's
        time, py-spy): read a layer or two ahead, the same miss is a host-tier hit, one copy.
        Unlike prefetch(), a wrong guess costs a host entry and a read, no device slot, no
        eviction from the device and no copy on the link the step's own loads use."""
        if self.host is None or not self.host.has_layout:
            return 0
        started = 0
        with self._lock:
            for key in keys:
                if len(self._host_reads) >= HOST_READS_IN_FLIGHT:
                    break
                if key in self._slots or key in self._host_reads or key in self._taken \
                        or not self.store.has_expert(*key) or key in self.host:
                    continue
                if self._host_readers is None:
                    self._host_readers = ThreadPoolExecutor(max_workers=HOST_READERS,
                                                            thread_name_prefix="cadre-host-read")
                future = self._host_readers.submit(self._read_into_host, key)
                self._host_reads[key] = future
                future.add_done_callback(lambda done, key=key: self._host_read_done(key, done))
                self._stats.prefetch["host_issued"] += 1
                started += 1
        return started

    def _read_into_host(self, key: Key) -> None:
        if self.host.read_in(key, lambda views: self._read_shard_into(key, views)):
            with self._lock:
                self._host_prefetched.add(key)

    def _read_shard_into(self, key: Key, views: dict[str, torch.Tensor]) -> None:
        """The shard of `key` into host views of the tier's layout: read straight in where the
        store holds the compute dtype, else read, cast and copied."""
        if self.store.dtype == self.dtype or self.format["weights"] != DENSE:
            # one read per tensor on this thread: off the critical path, chunks fanned out to
            # the readers only added GIL hand-offs beside the decoding thread's CUDA calls
            self.store.read_expert_into(*key, views)
        else:
            for name, part in host_parts(self.store.load_expert(*key), self.format, self.dtype).items():
                views[name].copy_(part)

    def _host_read_done(self, key: Key, future: Future) -> None:
        with self._lock:
            if self._host_reads.get(key) is future:
                del self._host_reads[key]
        if not future.cancelled() and future.exception() is not None:  # the demand load reports it
            log.debug("host-tier prefetch of expert %d of layer %d failed: %s", key[1], key[0], future.exception())

    def _await_host_read(self, key: Key) -> None:
        """A prefetch_host read of `key` under way: wait for it rather than read the shard twice
        (one not yet started is cancelled: the caller reads it itself)."""
        with self._lock:
            pending = self._host_reads.get(key)
        if pending is not None and not pending.cancel():
            wait([pending])  # a failed read leaves the store to the caller

    def _count_host_prefetch_use(self, key: Key) -> None:
        with self._lock:
            if key in self._host_prefetched:
                self._host_prefetched.discard(key)
                self._stats.prefetch["host_used"] += 1

    # --- internals (called with the lock held) ------------------------------------
    def _reserve(self, key: Key, misses: _Misses, force: bool = False, keep: frozenset = frozenset()) -> _Slot | None:
        if self._spare_slots:
            while len(self._free) <= self._spare_slots and self._evict_one(key, misses, keep=keep):
                pass
        if not self._free and not self._evict_one(key, misses, force, keep):
            return None
        slot = _Slot(index=self._free.popleft())
        if slot.index in self._deferred_slots:  # its old expert must reach the host tier first
            self._flush_deferred()
        self._slots[key] = slot
        self._by_layer.setdefault(key[0], OrderedDict())[key[1]] = slot
        assert len(self._slots) <= self.num_slots, "cache over its byte budget"
        return slot

    def _evict_one(self, incoming: Key, misses: _Misses, force: bool = False, keep: frozenset = frozenset()) -> bool:
        candidates = (k for k, s in self._slots.items() if s.pins == 0 and s.ready and k not in keep)
        self._keep = keep  # what oldest_evictable() leaves out, for the policy's call
        try:
            victim = self.policy.victim(candidates, self, incoming)
        finally:
            self._keep = frozenset()
        if victim is None and force:
            victim = self._forced_victim(incoming)
        if victim is None:
            return False
        slot = self._slots.pop(victim)
        del self._by_layer[victim[0]][victim[1]]
        misses.unmapped.append(victim)
        if self.exclusive:
            # the incoming expert leaves the host tier before the victim enters it: with the
            # tier full, the write-back would otherwise evict a cached entry to make room
            taken = self.host.take(incoming) if incoming not in self._taken else None
            if taken is not None:
                self._taken[incoming] = taken
            misses.writebacks.append((victim, slot))
        if slot.prefetched:
            self._stats.prefetch["wasted"] += 1
        self._stats.evictions += 1
        self._free.append(slot.index)
        return True

    def _forced_victim(self, incoming: Key) -> Key | None:
        """A slot for a pin the policy declined (layer-lru: the layer is at its share and all its
        slots are pinned), which a captured step must have: another layer's most recently used
        unpinned expert. A decode step visits the layers in a cycle, so that expert's next use is
        the furthest away (Belady's choice). The least recently used one, taken before, belonged
        to the layer just ahead, which then had to take the next layer's, and so on round the
        cycle: at full depth under 24 GiB with 16 clients, 4.6% hits at 47a1f4b (docs/memory-plan.md)."""
        other = self.most_recent_evictable(incoming[0])
        return other if other is not None else self.oldest_evictable(incoming[0])

    def most_recent_evictable(self, other_than: int) -> Key | None:
        """The most recently used expert that may be evicted now, of a layer other than `other_than`:
        in a forward, which visits the layers in a cycle, the one whose next use is the furthest
        away. Scans from the recent end, so it stops within the lease just pinned."""
        for key, slot in reversed(self._slots.items()):
            if key[0] != other_than and slot.pins == 0 and slot.ready and key not in self._keep:
                return key
        return None

    def _start_load(self, key: Key, slot: _Slot, misses: _Misses) -> None:
        if any(key == deferred for deferred, _ in self._deferred):  # evicted, on its way down: land it first
            self._flush_deferred()
        if self.host is not None and (key in self.host or key in self._taken):
            # pinned host -> device: the copy is queued on the side stream with the batch's
            # others, so a hand-off to the loader thread would only add latency
            misses.from_memory.append((key, slot))
        else:
            misses.from_disk.append((key, slot))

    def _issue(self, misses: _Misses, defer_writebacks: bool = False) -> None:
        """Queue a batch's device work (lock held), in the order its slots allow. First the loads
        into slots evicted by earlier batches (their write-backs long queued): they are what the
        compute waits for, and they give their host entries back for the write-backs to land in.
        The evicted experts leave the table in the same write as those loads enter it (on the
        copy stream, behind their copies; alone when there are none): before any load refills
        their slots, and with the last entry winning where this batch evicted an expert and
        brings it back (as a prefetch once did with a key further down its own list: it now
        keeps its own keys). Then the write-backs, each group followed by the loads that
        refill its slots (a group no larger than the host tier's spare slots: a larger one
        would evict cached entries to make room); store reads go to the loader threads last
        (each waits for its slot's write-back on the device). With `defer_writebacks` and no
        load refilling a slot evicted here, the write-backs wait on the host for
        flush_writebacks() (or the next batch that needs one of their slots or experts)."""
        if not misses:
            return
        evicted = {slot.index for _, slot in misses.writebacks}
        refills = {slot.index: (key, slot) for key, slot in misses.from_memory if slot.index in evicted}
        # one table write for those loads and the victims' entries (alone where there are no loads)
        self._load_batch([(key, slot) for key, slot in misses.from_memory if slot.index not in refills],
                         [(key, -1) for key in misses.unmapped])
        if defer_writebacks and not refills and not any(slot.index in evicted for _, slot in misses.from_disk):
            self._deferred.extend(misses.writebacks)
            self._deferred_slots.update(evicted)
        else:
            self._flush_deferred()
            self._write_back_groups(misses.writebacks, refills)
        for key, slot in misses.from_disk:
            slot.future = self._loader.submit(self._load, key, slot)
        misses.__init__()  # drained: a later _issue of the same call queues only what follows

    def _write_back_groups(self, writebacks: list[tuple[Key, _Slot]],
                           refills: dict[int, tuple[Key, _Slot]]) -> None:
        group = max(1, self.host.spares if self.exclusive else len(writebacks))
        for first in range(0, len(writebacks), group):
            batch = writebacks[first:first + group]
            self._write_back_all(batch)
            self._load_batch([refills[slot.index] for _, slot in batch if slot.index in refills])

    def flush_writebacks(self) -> None:
        """Queue the write-backs that acquire(defer_writebacks=True) left on the host."""
        with self._lock:
            self._flush_deferred()

    def _flush_deferred(self) -> None:
        if self._deferred:
            writebacks, self._deferred = self._deferred, []
            self._deferred_slots.clear()
            self._write_back_groups(writebacks, {})

    def _load_batch(self, loads: list[tuple[Key, _Slot]], unmapped: list[tuple[Key, int]] = ()) -> None:
        """Fetch experts (from the host tier, or the store on a loader thread) and copy them into
        their slots: one stream switch, event and table update for all, which also removes the
        `unmapped` entries (evicted experts: safe behind the copies, since no compute looks up
        an expert it has not pinned, and a pinned one is never evicted)."""
        if not loads:
            self._put_table(unmapped)
            return
        start, fetched = time.perf_counter(), []
        for key, slot in loads:
            try:
                fetched.append((key, slot, *self._fetch(key)))
            except BaseException as exc:  # surfaced to the acquirer, never lost
                self._fail(key, slot, exc)
        try:
            self._copy_all([(key, slot, parts) for key, slot, _, parts in fetched], unmapped)
        except BaseException as exc:
            self._put_table(unmapped)
            for key, slot, _, _ in fetched:
                self._fail(key, slot, exc)
            return
        done = [(key, slot, tier, sum(p.nbytes for p in parts.values())) for key, slot, tier, parts in fetched]
        del fetched  # the host entries are given back once their copies are queued
        self._loaded(done, (time.perf_counter() - start) / max(1, len(done)))

    # --- loader thread ------------------------------------------------------------
    def _load(self, key: Key, slot: _Slot) -> None:
        self._load_batch([(key, slot)])

    def _loaded(self, done: list[tuple[Key, _Slot, str, int]], seconds: float) -> None:
        """Mark loads ready (their copies queued) and count them; `seconds` each."""
        with self._lock:
            for _, slot, tier, nbytes in done:
                slot.ready = True
                self._stats.loads[tier] += 1
                self._stats.load_seconds += seconds
                self._stats.bytes_loaded += nbytes
            self._lock.notify_all()
        if self.on_load is not None:
            for key, _, tier, _ in done:
                self.on_load(key, tier, seconds)

    def _fail(self, key: Key, slot: _Slot, exc: BaseException) -> None:
        with self._lock:
            slot.error = exc
            if slot.pins == 0:  # a prefetch nobody waits for: free its slot now
                self._drop_failed(key, slot)
            self._lock.notify_all()

    def _fetch(self, key: Key) -> tuple[str, dict[str, torch.Tensor]]:
        """The shard's tensors from the host tier or the store: dense ones already in the
        compute dtype, quantised ones as stored (a miss then moves the quantised bytes)."""
        if self.exclusive:
            return self._fetch_exclusive(key)
        if self.host is not None:
            self._await_host_read(key)
            cached = self.host.get(key)
            if cached is not None:
                self._count_host_prefetch_use(key)
                return "host", cached
        parts = host_parts(self.store.load_expert(*key), self.format, self.dtype)
        if self.format["weights"] == DENSE:
            _check_shapes(self.store, key, parts, self.intermediate, self.hidden)
        if self.host is not None:
            parts = self.host.put(key, parts)
        return "disk", parts

    def _fetch_exclusive(self, key: Key) -> tuple[str, dict[str, torch.Tensor]]:
        """From the host tier, taking the entry out (the device now holds it); or read from the
        store straight into a staged host slot, which is free again once the copy is queued."""
        with self._lock:
            taken = self._taken.pop(key, None)
        if taken is None:
            self._await_host_read(key)
            taken = self.host.take(key)
        if taken is not None:
            self._count_host_prefetch_use(key)
            return "host", taken
        staged = self.host.stage()
        if staged is None:  # every slot lent: read as the inclusive path does
            return "disk", host_parts(self.store.load_expert(*key), self.format, self.dtype)
        if self.store.dtype == self.dtype:
            self.store.read_expert_into(*key, staged, readers=self._readers)
        else:  # a cast on the way: read, cast, copy
            for name, part in host_parts(self.store.load_expert(*key), self.format, self.dtype).items():
                staged[name].copy_(part)
        return "disk", staged

    def _write_back_all(self, writebacks: list[tuple[Key, _Slot]]) -> None:
        """Copy evicted experts down into the exclusive host tier (lock held), on the write-back
        stream, each behind the copy that filled its slot; one event for the batch, which a
        load refilling one of those slots waits for (_copy_all)."""
        if not writebacks:
            return
        # the tier is full of lent entries where adopt() gives None: the store still has it
        adopted = [(slot, views) for key, slot in writebacks
                   if key not in self.host and (views := self.host.adopt(key)) is not None]
        stream, copied = self._writeback_stream, [slot.index for slot, _ in adopted]
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            if stream is not None:
                for event in _distinct_events(slot.event for slot, _ in adopted):
                    stream.wait_event(event)
            for slot, views in adopted:
                for slot_view, host_view in self._copy_pairs(slot.index, views):
                    host_view.copy_(slot_view, non_blocking=stream is not None)
            if stream is not None and copied:
                done = torch.cuda.Event()
                done.record(stream)
                self._written_back.update(dict.fromkeys(copied, done))
                for _, views in adopted:
                    mark_copied(views, done)
        self._stats.writebacks += len(copied)
        del adopted  # given back after the copies are queued: each host slot's event is recorded behind them

    def _copy_all(self, loads: list[tuple[Key, _Slot, dict[str, torch.Tensor]]],
                  unmapped: list[tuple[Key, int]] = ()) -> None:
        """Fill slots from shards' tensors and publish them in the table. On CUDA on the side
        stream, so the copies overlap compute, after whatever last read or wrote the slots;
        one event for all, which orders the compute stream after them (_wait_all_ready) without
        a host-side synchronisation and covers the table entries written behind the copies."""
        entries = list(unmapped) + [(key, slot.index) for key, slot, _ in loads]
        if self._copy_stream is None:
            self._fill_slots(loads, non_blocking=False)
            self._put_table(entries)
            return
        before = _distinct_events(event for _, slot, _ in loads  # the last compute reading a slot, its write-back
                                  for event in (self._last_use.pop(slot.index, None),
                                                self._written_back.pop(slot.index, None)))
        with torch.cuda.stream(self._copy_stream):
            for event in before:
                self._copy_stream.wait_event(event)
            self._fill_slots(loads, non_blocking=True)
            self._put_table(entries)
            done = torch.cuda.Event()
            done.record(self._copy_stream)
        for _, slot, parts in loads:
            slot.event = done
            mark_copied(parts, done)  # a host-tier entry given back needs no event of its own

    def _fill_slots(self, loads: list[tuple[Key, _Slot, dict[str, torch.Tensor]]], non_blocking: bool) -> None:
        """Fill slots from shards' tensors: dense ones copied straight from the host, quantised
        ones copied as they are and dequantised on the device, a batch at a time
        (models/quantised_fill.py)."""
        if self._quantised is not None:
            self._quantised.fill([slot.index for _, slot, _ in loads], [parts for _, _, parts in loads], non_blocking)
            return
        for _, slot, parts in loads:
            for view, source in self._copy_pairs(slot.index, parts):
                view.copy_(source, non_blocking=non_blocking)

    def _copy_pairs(self, index: int, host: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(slot view, host tensor) pairs that copy a slot from or to `host` (a shard's tensors by
        name). Gate and up are one [2I,H] copy where the host holds them adjacent, as a host-tier
        entry does (the shard's order): two copies a load instead of three, each a CUDA call. A
        tier entry carries that view, made once per host slot: found by checking the tensors, it
        cost the decoding thread ~40 us a load at full depth (py-spy)."""
        views = self._slot_views(index)
        gate_up = fused_gate_up(host)
        if gate_up is not None:
            pairs = [(self._slot_gate_up(index), gate_up)]
            return pairs + [(views[name], host[name]) for name in views if name not in ("gate_proj", "up_proj")]
        return [(view, host[name]) for name, view in views.items()]

    def _slot_views(self, index: int) -> dict[str, torch.Tensor]:
        """A slot's buffers under the shard's tensor names, in their order: gate and up are the
        two halves of gate_up ([O,N] each), down its own, and the biases where the family has them.
        Made once per slot (every load and write-back asks; six tensor views cost ~7 us)."""
        views = self._views_of_slot.get(index)
        if views is None:
            with torch.inference_mode(False):  # plain views, whatever mode the caller runs in
                views = self._views_of_slot[index] = self._make_slot_views(index)
        return views

    def _slot_gate_up(self, index: int) -> torch.Tensor:
        """The slot's gate_up [2I,H], one view made once per slot (as _slot_views)."""
        view = self._gate_up_of_slot.get(index)
        if view is None:
            with torch.inference_mode(False):
                view = self._gate_up_of_slot[index] = self.gate_up[index]
        return view

    def _make_slot_views(self, index: int) -> dict[str, torch.Tensor]:
        i = self.intermediate
        views = {"gate_proj": self.gate_up[index, :i], "up_proj": self.gate_up[index, i:], "down_proj": self.down[index]}
        if self.gate_up_bias is not None:
            views |= {"gate_proj_bias": self.gate_up_bias[index, :i], "up_proj_bias": self.gate_up_bias[index, i:],
                      "down_proj_bias": self.down_bias[index]}
        return views

    def _put_table(self, entries: list[tuple[Key, int]]) -> None:
        """Set table entries (key -> slot, -1: gone). On CUDA queued on the copy stream: behind
        the copies they publish, and never between a compute stream's lookup and its use."""
        self._table_writes.put(entries)

    def _wait_all_ready(self, lease: Lease) -> None:
        """Wait for the lease's loads: the host for their copies to be queued, the compute stream
        (on the device, once per distinct event: a batch shares one) for the copies themselves."""
        for expert, slot in lease.pinned.items():
            key = (lease.layer, expert)
            with self._lock:
                self._lock.wait_for(lambda: slot.ready or slot.error is not None)
                if slot.error is not None:
                    self._drop_failed(key, slot)
                    raise _load_error(key, slot.error)
            lease.slots[expert] = slot.index
        events = _distinct_events(slot.event for slot in lease.pinned.values())
        if events:
            stream = torch.cuda.current_stream(self.device)
            for event in events:
                stream.wait_event(event)

    def _drop_failed(self, key: Key, slot: _Slot) -> None:
        """A failed load leaves the cache as if it had never been tried."""
        if self._slots.get(key) is slot:
            del self._slots[key]
            del self._by_layer[key[0]][key[1]]
            self._free.append(slot.index)
            self._put_table([(key, -1)])
        self._lock.notify_all()

    def close(self) -> None:
        if self._host_readers is not None:
            self._host_readers.shutdown(wait=True, cancel_futures=True)
        self._loader.shutdown(wait=True)
        if self._readers is not None:
            self._readers.shutdown(wait=True)


def _distinct_events(events: Iterable["torch.cuda.Event | None"]) -> list["torch.cuda.Event"]:
    """The events, each once and None left out (a batch's slots share one): one wait each."""
    return list({id(event): event for event in events if event is not None}.values())


def host_parts(tensors: dict[str, torch.Tensor], fmt: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """What the host tier keeps of a shard: dense weights cast to the compute dtype once, on
    the host; quantised weights and their scales as stored (dequantised on the device)."""
    if fmt["weights"] == DENSE:
        return {name: t.to(dtype) for name, t in tensors.items()}
    return dict(tensors)


def host_entry_bytes(store: ExpertStore, dtype: torch.dtype) -> int:
    """Bytes of one expert in the host tier, as host_parts leaves it: a dense slot's, or the
    quantised shard's tensors as stored."""
    if store.expert_format["weights"] == DENSE:
        return slot_bytes(store, dtype)
    layer = next(layer for layer in store.moe_layers if store.experts_present(layer))
    return store.expert_nbytes(layer, store.experts_present(layer)[0])


def _has_bias(store: ExpertStore) -> bool:
    return "gate_proj_bias" in store.expert_format["tensors"]


def slot_bytes(store: ExpertStore, dtype: torch.dtype) -> int:
    """Device bytes of one expert slot: its dense weights (and biases) in the compute dtype."""
    inter, hidden = _expert_shapes(store)
    biases = 2 * inter + hidden if _has_bias(store) else 0
    return (3 * inter * hidden + biases) * dtype.itemsize


def _expert_shapes(store: ExpertStore) -> tuple[int, int]:
    """(I, H) of the store's experts, read from the first shard's header (down_proj is [H, ...])."""
    for layer in store.moe_layers:
        present = store.experts_present(layer)
        if present:
            from safetensors import safe_open

            path = store.expert_path(layer, present[0])
            try:
                with safe_open(path, framework="pt") as f:
                    inter = f.get_slice("gate_proj").get_shape()[0]
                    hidden = f.get_slice("down_proj").get_shape()[0]
            except Exception as exc:
                raise StoreError(f"{path}: cannot read expert shard header: {exc}") from exc
            return int(inter), int(hidden)
    raise StoreError(f"{store.root}: the store holds no experts")


def _check_shapes(store, key, parts, inter, hidden) -> None:
    gate, up, down = (parts[name] for name in ("gate_proj", "up_proj", "down_proj"))
    if gate.shape != (inter, hidden) or up.shape != (inter, hidden) or down.shape != (hidden, inter):
        raise StoreError(f"{store.expert_path(*key)}: expert shapes {tuple(gate.shape)}, {tuple(up.shape)}, "
                         f"{tuple(down.shape)} do not match the store's ({inter}, {hidden})")


def default_load_workers(device: torch.device) -> int:
    """One loader on CPU (loads compete with the compute's cores), up to 8 on a GPU."""
    return 1 if device.type == "cpu" else max(1, min(8, (os.cpu_count() or 2) // 2))


def _load_error(key: Key, exc: BaseException) -> StoreError:
    if isinstance(exc, StoreError):
        return exc
    return StoreError(f"loading expert {key[1]} of layer {key[0]} failed: {exc}")
