"""The pinned host tier: a hard cap at every moment (even with loads in flight), LRU over entries
nobody holds, lent entries never rewritten, a cap below one layer's working set refused.

On the CPU the tier allocates ordinary memory (pin=False); the accounting, the eviction and the
lending are the same code as on a GPU."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import models.host_tier as host_tier
from models.host_tier import HostTier, HostTierError, chunk_sizes, entries_within

INTER, HIDDEN = 16, 8
ENTRY = 3 * INTER * HIDDEN * 4  # float32 gate, up, down: 1536 bytes


def parts(value: float) -> dict:
    gate = torch.full((INTER, HIDDEN), float(value))
    return {"gate_proj": gate, "up_proj": gate + 0.5, "down_proj": torch.full((HIDDEN, INTER), -float(value))}


def test_chunks_are_powers_of_two_within_the_cap():
    for cap in (ENTRY, 10 * ENTRY, 12345678, 1 << 30):
        sizes = chunk_sizes(cap, ENTRY)
        assert sum(sizes) <= cap and all(size & (size - 1) == 0 and size >= ENTRY for size in sizes)
        assert cap - sum(sizes) < 2 * ENTRY or sum(sizes) == cap  # what is left over holds no entry
    assert entries_within(9 * 2**20 * 100, 9437184) >= 97  # Qwen3 experts: a few % lost to rounding


def test_lru_eviction_and_hits():
    cap = 4 * ENTRY  # chunks of 4096 + 2048 bytes: 3 whole entries
    assert entries_within(cap, ENTRY) == 3
    tier = HostTier(cap, pin=False)
    for expert in range(3):
        tier.put((0, expert), parts(expert))
    assert tier.get((0, 0)) is not None  # now most recent
    tier.put((0, 3), parts(3))  # evicts (0, 1), the least recently used
    assert (0, 1) not in tier and (0, 0) in tier and (0, 3) in tier
    got, want = tier.get((0, 3)), parts(3)
    assert all(torch.equal(got[name], want[name]) for name in want) and list(got) == list(want)
    assert tier.stats().evictions == 1 and tier.stats().pinned_bytes == 4096 + 2048 <= cap


def test_a_lent_entry_is_never_evicted_nor_rewritten():
    tier = HostTier(4096, pin=False)  # two entries
    held = tier.put((0, 0), parts(0.0))  # the borrower still holds these views
    tier.put((0, 1), parts(1.0))
    tier.put((0, 2), parts(2.0))  # the tier is full: (0, 1) goes, not the older but lent (0, 0)
    assert (0, 0) in tier and (0, 1) not in tier
    assert torch.equal(held["gate_proj"], parts(0.0)["gate_proj"])
    assert tier.put((0, 3), parts(3.0)) is not None
    both_lent = (tier.get((0, 0)), tier.get((0, 3)))
    spilled = parts(4.0)
    assert tier.put((0, 4), spilled) is spilled  # nothing evictable: served unpinned, not cached
    assert (0, 4) not in tier and torch.equal(both_lent[0]["gate_proj"], parts(0.0)["gate_proj"])
    del held, both_lent
    tier.put((0, 4), parts(4.0))  # given back: evictable again
    assert (0, 4) in tier


def test_free_slots_are_reused_oldest_first():
    """A taken entry's slot is free once its copy is queued; the next adopt() or staged read gets
    the slot freed longest ago, whose copy has had the most time to finish (on a GPU the newest
    would make a write-back wait for the load just queued from that slot)."""
    tier = HostTier(8 * ENTRY, entry_bytes=ENTRY, pin=False)
    tier.define_layout(parts(0.0))
    for expert in range(entries_within(8 * ENTRY, ENTRY)):  # full: every free slot is one given back
        views = tier.adopt((0, expert))
        views["gate_proj"].fill_(expert)
        del views
    addresses = {}
    for expert in range(4):  # taken up in this order, each freed when its views go
        taken = tier.take((0, expert))
        addresses[expert] = taken["gate_proj"].data_ptr()
        del taken
    reused = [tier.adopt((1, expert))["gate_proj"].data_ptr() for expert in range(4)]
    assert reused == [addresses[e] for e in range(4)]


def test_a_cap_below_one_layers_working_set_is_refused():
    with pytest.raises(HostTierError, match="fewer than one layer's working set of 8"):
        HostTier(8 * ENTRY, entry_bytes=ENTRY, min_entries=8, pin=False)  # 8 entries' bytes pin only 7
    HostTier(16384, entry_bytes=ENTRY, min_entries=8, pin=False)  # 10 entries
    tier = HostTier(4 * ENTRY, entry_bytes=ENTRY, pin=False)
    with pytest.raises(HostTierError, match="sized for"):
        tier.put((0, 0), {"gate_proj": torch.zeros(3)})


def test_the_cap_holds_at_every_moment_under_concurrent_loads(monkeypatch):
    """8 loader threads put and get 64 experts through a tier of 10 while a watcher samples
    the bytes actually allocated; allocation is slowed so loads overlap inside it."""
    cap = 10 * ENTRY
    allocated = [0]
    peak = [0]
    lock = threading.Lock()
    real_allocate = host_tier._allocate

    def slow_allocate(nbytes, pin):
        with lock:
            allocated[0] += nbytes
            peak[0] = max(peak[0], allocated[0])
        time.sleep(0.002)
        return real_allocate(nbytes, pin)

    monkeypatch.setattr(host_tier, "_allocate", slow_allocate)
    tier = HostTier(cap, entry_bytes=ENTRY, min_entries=4, pin=False)
    stop = threading.Event()
    seen, errors = [], []

    def watch():
        while not stop.is_set():
            stats = tier.stats()
            seen.append((stats.pinned_bytes, allocated[0]))
            if stats.pinned_bytes > cap or allocated[0] > cap:
                errors.append(stats)

    def load(worker: int):
        generator = torch.Generator().manual_seed(worker)
        for _ in range(300):
            expert = int(torch.randint(0, 64, (1,), generator=generator))
            got = tier.get((0, expert)) or tier.put((0, expert), parts(float(expert)))
            assert got["gate_proj"][0, 0].item() == float(expert) and got["down_proj"][0, 0].item() == -float(expert)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(load, range(8)))  # re-raises a loader's failed assertion here
    finally:
        stop.set()
        watcher.join()
    assert not errors, errors[:3]
    assert len(seen) > 100 and peak[0] <= cap
    stats = tier.stats()
    assert stats.peak_pinned_bytes <= cap and stats.entries <= entries_within(cap, ENTRY) and stats.lent == 0
    assert stats.evictions > 0


def test_a_tier_capped_at_the_plans_bytes_holds_the_plans_experts():
    from models.host_tier import tier_size

    for capacity, entry, experts in [(8 << 30, 9437184, 6144), (100 << 30, 9437184, 6144), (1 << 20, ENTRY, 40),
                                     (50 << 30, 352321536, 256)]:
        pinned, held = tier_size(capacity, entry, experts)
        assert pinned <= capacity and held <= experts
        assert entries_within(pinned, entry) == held or held == experts
        assert chunk_sizes(pinned, entry) == chunk_sizes(capacity, entry)[:len(chunk_sizes(pinned, entry))]
