"""The device table (layer, expert) -> slot must match the cache's own map after every call.
A GPU run caught it drifting: a prefetch that evicted an expert it was itself about to
prefetch reloaded it from the host tier, and the load's table entry was queued before the
eviction's -1, so a resident expert read as absent (wrong weights for the graph pieces that
look experts up on the device; the server's batched greedy tokens left their solo ones).
Here with a host tier on the CPU (unpinned), so reloads come from memory as on CUDA."""

import random

import pytest
import torch

from extractor.store import ExpertStore
from models.cache import ExpertCache
from models.runtime import expert_bytes

from test_cache_deferred_writebacks import host_entries_match
from test_host_tier_exclusive import make_cache, weights_match


@pytest.fixture()
def store(store_factory):
    return ExpertStore.open(store_factory("qwen3_moe")[1])


def assert_table_matches(cache):
    for slot in list(cache._slots.values()):  # store reads still on the loader threads land first
        if slot.future is not None:
            slot.future.result()
    assert all(slot.ready for slot in cache._slots.values())
    want = torch.full_like(cache.table[:, :-1], -1)
    for (layer, expert), slot in cache._slots.items():
        want[layer, expert] = slot.index
    mismatched = (cache.table[:, :-1] != want).nonzero().tolist()
    assert not mismatched, [(l, e, int(cache.table[l, e]), int(want[l, e])) for l, e in mismatched[:5]]


def test_a_prefetch_keeps_its_own_keys_and_the_table(store):
    """The deeper layer's experts are the least recently used: a prefetch of them plus one more
    must not evict the ones further down its own list to make room (an evict-and-reload churn,
    and the case whose table entry went stale)."""
    layers = store.moe_layers
    cache = make_cache(store, slots=4, host_entries=None)
    deep = [(layers[-1], e) for e in range(4)]
    for layer, expert in deep:  # resident and oldest: LRU picks these first
        cache.release(cache.acquire(layer, [expert]))
    cache.release(cache.acquire(layers[0], [0, 1]))  # evicts two of them; the host tier keeps them
    cache.prefetch([(layers[0], 2), *deep])
    assert_table_matches(cache)
    assert set(deep[2:]) <= set(cache.resident())  # the two left resident stay: room came from layer 0
    cache.release(cache.acquire(layers[0], [3]))
    assert_table_matches(cache)


TIERS = {
    "no host tier": lambda store: ExpertCache(store, capacity_bytes=6 * expert_bytes(store, store.dtype),
                                              host_tier=False),
    "inclusive host tier": lambda store: make_cache(store, slots=6, host_entries=None),
    "exclusive host tier, deferred write-backs": lambda store: exclusive_cache(store),
}


def exclusive_cache(store):
    """Capped below the store, with the GPU's spare slots switched on (test_cache_deferred_writebacks)."""
    total = sum(len(store.experts_present(layer)) for layer in store.moe_layers)
    cache = make_cache(store, 2 * store.top_k, max(1, total // 2))
    cache._spare_slots = store.top_k
    return cache


@pytest.mark.parametrize("tier", list(TIERS))
def test_random_acquires_and_prefetches_keep_table_slots_and_host_entries_true(store, tier):
    """Acquires (some forced, some deferring their write-backs), releases, prefetches of deeper
    layers and flushes in a random order: after each round the table maps exactly the resident
    experts, every slot and host entry holds its own expert's weights."""
    rng = random.Random(0)
    layers = store.moe_layers
    cache = TIERS[tier](store)
    for _ in range(150):
        layer = rng.choice(layers)
        experts = rng.sample(store.experts_present(layer), store.top_k)
        lease = cache.acquire(layer, experts, force=True, defer_writebacks=rng.random() < 0.5)
        for expert, slot in lease.slots.items():
            assert weights_match(cache, store, layer, expert, slot), (tier, layer, expert, lease.outcomes)
        cache.release(lease)
        deeper = [l for l in layers if l > layer]
        cache.prefetch([(l, e) for l in deeper for e in rng.sample(store.experts_present(l), 2)])
        if rng.random() < 0.7:
            cache.flush_writebacks()
        assert_table_matches(cache)
        if cache.host is not None:
            assert host_entries_match(cache, store), tier
