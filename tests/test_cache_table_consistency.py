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


@pytest.fixture()
def store(store_factory):
    return ExpertStore.open(store_factory("qwen3_moe")[1])


def make_cache(store, slots):
    return ExpertCache(store, capacity_bytes=slots * expert_bytes(store, store.dtype), host_tier=True,
                       host_capacity_bytes=None)


def assert_table_matches(cache):
    for slot in list(cache._slots.values()):  # store reads still on the loader threads land first
        if slot.future is not None:
            slot.future.result()
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
    cache = make_cache(store, slots=4)
    deep = [(layers[-1], e) for e in range(4)]
    for layer, expert in deep:  # resident and oldest: LRU picks these first
        cache.release(cache.acquire(layer, [expert]))
    cache.release(cache.acquire(layers[0], [0, 1]))  # evicts two of them; the host tier keeps them
    cache.prefetch([(layers[0], 2), *deep])
    assert_table_matches(cache)
    assert set(deep[2:]) <= set(cache.resident())  # the two left resident stay: room came from layer 0
    cache.release(cache.acquire(layers[0], [3]))
    assert_table_matches(cache)


def test_random_acquires_and_prefetches_keep_the_table(store):
    rng = random.Random(0)
    layers, experts = store.moe_layers, store.num_experts
    cache = make_cache(store, slots=6)
    for _ in range(300):
        layer = rng.choice(layers)
        cache.release(cache.acquire(layer, rng.sample(range(experts), 2)))
        deeper = [l for l in layers if l > layer]
        cache.prefetch([(l, e) for l in deeper for e in rng.sample(range(experts), 2)])
        cache.flush_writebacks()
        assert_table_matches(cache)
