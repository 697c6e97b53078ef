"""The pinned host tier on a GPU: real page-locked chunks, copies queued on a side stream while
other threads evict and rewrite slots; every copy must still read the expert it was lent.

Marked `gpu`: run on the lent GPU machine with `python -m pytest -m gpu tests/test_host_tier_gpu.py`."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from models import Runtime, RuntimeConfig
from models.host_tier import HostTier, entries_within

pytestmark = pytest.mark.gpu


def test_copies_read_what_they_were_lent_while_slots_are_rewritten():
    inter, hidden = 512, 1024  # 6 MiB entries in float32: each copy takes long enough to overlap
    entry = 3 * inter * hidden * 4
    cap = 8 * entry
    stream = torch.cuda.Stream()
    tier = HostTier(cap, entry_bytes=entry, min_entries=4, copy_stream=stream, pin=True)
    assert entries_within(cap, entry) >= 4
    failures, lock = [], threading.Lock()

    def parts(expert):
        gate = torch.full((inter, hidden), float(expert))
        return {"gate_proj": gate, "up_proj": gate + 0.5, "down_proj": torch.full((hidden, inter), -float(expert))}

    def load(worker):
        generator = torch.Generator().manual_seed(worker)
        for _ in range(60):
            expert = int(torch.randint(0, 40, (1,), generator=generator))
            host = tier.get((0, expert)) or tier.put((0, expert), parts(expert))
            with torch.cuda.stream(stream):
                device = [host[name].to("cuda", non_blocking=True) for name in ("gate_proj", "up_proj", "down_proj")]
                done = torch.cuda.Event()
                done.record(stream)
            del host  # given back: the tier may rewrite the slot once this copy has finished
            done.synchronize()
            if not (device[0].eq(expert).all() and device[1].eq(expert + 0.5).all() and device[2].eq(-expert).all()):
                with lock:
                    failures.append(expert)

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(load, range(6)))  # a loader's exception is raised here
    stats = tier.stats()
    assert not failures, f"copies read a rewritten slot for experts {failures[:10]}"
    assert stats.peak_pinned_bytes <= cap and stats.evictions > 0 and stats.lent == 0


def test_generation_with_a_tiny_host_tier_matches_the_full_cache(store_factory):
    _, store = store_factory("qwen3_moe", dtype=torch.float32)
    ids = torch.randint(3, 120, (1, 12), generator=torch.Generator().manual_seed(3))
    full = Runtime.from_store(store, RuntimeConfig(device="cuda", cache_fraction=1.0))
    want = full.generate(ids.cuda(), max_new_tokens=24, min_new_tokens=24)
    full.close()
    entry = full.plan.slot_bytes
    small = Runtime.from_store(store, RuntimeConfig(device="cuda", cache_fraction=0.25,
                                                    host_memory=str(6 * entry)))  # a few entries, top_k 4
    try:
        assert small.plan.host_tier_experts < small.plan.total_experts // 4
        assert torch.equal(small.generate(ids.cuda(), max_new_tokens=24, min_new_tokens=24), want)
        tier = small.cache.host.stats()
        assert tier.peak_pinned_bytes <= small.plan.host_tier_bytes and tier.evictions > 0
    finally:
        small.close()


def slot_holds(cache, store, layer, expert, slot) -> bool:
    """The device slot holds the store's expert, in bfloat16 as served."""
    want = store.load_expert(layer, expert)
    gate_up, down = (w.cpu() for w in cache.weights(slot))
    return (torch.equal(gate_up, torch.cat([want["gate_proj"], want["up_proj"]]).bfloat16())
            and torch.equal(down, want["down_proj"].bfloat16()))


@pytest.mark.parametrize("slots", ["top-k", "most"])
def test_an_exclusive_tier_on_the_gpu_loads_the_stores_weights(store_factory, slots):
    """Write-backs (device -> pinned, on their own stream) and takes racing the refills of the same
    device slots: every acquired slot must hold the store's expert, in bfloat16 as served. With
    most experts on the device, spare slots are kept free and a batch's loads go first."""
    import random

    from extractor.store import ExpertStore
    from models.cache import ExpertCache, host_entry_bytes

    store = ExpertStore.open(store_factory("qwen3_moe")[1])
    entry = host_entry_bytes(store, torch.bfloat16)
    total = sum(len(store.experts_present(layer)) for layer in store.moe_layers)
    count = store.top_k if slots == "top-k" else total - 8
    cache = ExpertCache(store, device="cuda", dtype=torch.bfloat16, capacity_bytes=count * entry,
                        host_capacity_bytes=8 * entry)
    assert cache.exclusive and (cache._spare_slots > 0) == (slots == "most"), (total, cache._spare_slots)
    rng = random.Random(0)
    layers = store.moe_layers
    for _ in range(200):
        layer = rng.choice(layers)
        lease = cache.acquire(layer, rng.sample(store.experts_present(layer), store.top_k))
        for expert, slot in lease.slots.items():
            assert slot_holds(cache, store, layer, expert, slot), (layer, expert)
        cache.release(lease)
    stats = cache.stats()
    assert stats.writebacks > 0 and stats.loads["host"] > 0 and stats.loads["disk"] > 0
    cache.close()


def test_a_budget_of_every_expert_keeps_every_layer_complete_beside_an_exclusive_tier(store_factory):
    """The device holds every expert and the host tier is capped below the store (so it is
    exclusive): no spare slot may be kept free there, or preloading the last layers evicts the
    first ones and a decode step can no longer skip host work (nor be compiled whole)."""
    from extractor.store import ExpertStore
    from models.cache import ExpertCache, host_entry_bytes

    store = ExpertStore.open(store_factory("qwen3_moe")[1])
    entry = host_entry_bytes(store, torch.bfloat16)
    keys = [(layer, e) for layer in store.moe_layers for e in store.experts_present(layer)]
    cache = ExpertCache(store, device="cuda", dtype=torch.bfloat16, capacity_bytes=len(keys) * entry,
                        host_capacity_bytes=8 * entry)
    assert cache.holds_everything and cache.exclusive and cache._spare_slots == 0
    cache.preload(keys)
    assert all(cache.layer_is_complete(layer) for layer in store.moe_layers)
