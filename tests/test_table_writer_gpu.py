"""The expert cache's device table on a GPU: writes staged through a ring of pinned rows, and
host-tier entries given back under their borrower's event instead of one of their own.

Marked `gpu`: run on the lent GPU machine with `python -m pytest -m gpu tests/test_table_writer_gpu.py`."""

import random

import pytest
import torch

from models.host_tier import HostTier, mark_copied
from models.table_writer import RING_ROWS, ROW_ENTRIES, TableWriter

from test_host_tier_gpu import slot_holds

pytestmark = pytest.mark.gpu


def test_writes_land_in_order_across_the_ring_and_split_rows():
    """More writes than ring rows, batches larger than a row, keys repeated within a batch (the
    last wins): the table ends as a host mirror of every write says."""
    rng = random.Random(0)
    layers, experts = 48, 128
    table = torch.full((layers, experts + 1), -1, dtype=torch.long, device="cuda")
    stream = torch.cuda.Stream()
    writer, mirror = TableWriter(table, stream), {}
    for _ in range(3 * RING_ROWS):
        size = rng.choice([1, 2, 7, 40, ROW_ENTRIES + 3, 2 * ROW_ENTRIES])
        entries = [((rng.randrange(layers), rng.randrange(experts)), rng.randrange(-1, 5000)) for _ in range(size)]
        writer.put(entries)
        mirror.update(entries)
    stream.synchronize()
    want = torch.full_like(table, -1)
    for (layer, expert), slot in mirror.items():
        want[layer, expert] = slot
    assert torch.equal(table, want)


def test_an_entry_given_back_under_its_borrowers_event_waits_for_nothing_else():
    entry = 3 * 64 * 32 * 2
    stream = torch.cuda.Stream()
    tier = HostTier(8 * entry, entry_bytes=entry, copy_stream=stream, pin=True)
    parts = {name: torch.full((64, 32), 1.0, dtype=torch.bfloat16) for name in ("gate_proj", "up_proj", "down_proj")}
    lent = tier.put((0, 1), parts)
    assert lent.gate_up is not None and lent.gate_up.shape == (128, 32)  # gate and up adjacent: one copy
    with torch.cuda.stream(stream):
        on_device = lent.gate_up.to("cuda", non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
    mark_copied(lent, done)
    slot = tier._entries[(0, 1)]
    del lent
    assert slot.copied is done
    assert on_device.float().sum().item() == 128 * 32

    first, second = tier.get((0, 1)), tier.get((0, 1))  # lent twice at once: no one event covers both
    mark_copied(first, done)
    mark_copied(second, done)
    del first, second
    assert slot.copied is not None and slot.copied is not done


def test_random_acquires_on_the_gpu_keep_the_table_and_slots_true(store_factory):
    """The CPU test of the same name (test_cache_table_consistency) on CUDA, where the evictions'
    -1 entries go out in the same staged write as the loads' entries, behind their copies."""
    from extractor.store import ExpertStore
    from models.cache import ExpertCache, host_entry_bytes

    store = ExpertStore.open(store_factory("qwen3_moe")[1])
    entry = host_entry_bytes(store, torch.bfloat16)
    total = sum(len(store.experts_present(layer)) for layer in store.moe_layers)
    cache = ExpertCache(store, device="cuda", dtype=torch.bfloat16, capacity_bytes=2 * store.top_k * entry,
                        host_capacity_bytes=(total // 2) * entry)
    cache._spare_slots = store.top_k  # as at full depth: loads refill slots evicted batches ago
    assert cache.exclusive
    rng, layers = random.Random(0), store.moe_layers
    try:
        for _ in range(100):
            layer = rng.choice(layers)
            lease = cache.acquire(layer, rng.sample(store.experts_present(layer), store.top_k), force=True,
                                  defer_writebacks=rng.random() < 0.5)
            for expert, slot in lease.slots.items():
                assert slot_holds(cache, store, layer, expert, slot), (layer, expert)
            cache.release(lease)
            deeper = [l for l in layers if l > layer]
            cache.prefetch([(l, e) for l in deeper for e in rng.sample(store.experts_present(l), 2)])
            if rng.random() < 0.7:
                cache.flush_writebacks()
            for slot in list(cache._slots.values()):  # store reads on the loader threads land first
                if slot.future is not None:
                    slot.future.result()
            torch.cuda.synchronize()
            want = torch.full_like(cache.table[:, :-1], -1)
            for (l, e), slot in cache._slots.items():
                want[l, e] = slot.index
            assert torch.equal(cache.table[:, :-1], want)
    finally:
        cache.close()
