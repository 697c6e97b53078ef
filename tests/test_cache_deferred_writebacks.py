"""A replayed decode step asks the cache to leave a layer's write-backs on the host until the
next piece is queued (acquire(defer_writebacks=True), then flush_writebacks()): the loads and
the compute go out first. Deferred, an evicted expert is still owed to the host tier, so
whatever needs it or its slot before the flush lands it first. On the CPU, with the GPU's
spare slots switched on (without them each load refills the slot its own batch evicts, and
nothing can be deferred); the bookkeeping is the code a GPU runs."""

import random

import pytest
import torch

from extractor.store import ExpertStore

from test_host_tier_exclusive import make_cache, weights_match


@pytest.fixture()
def store(store_factory):
    return ExpertStore.open(store_factory("qwen3_moe")[1])


def spare_cache(store):
    layer = store.moe_layers[0]
    total = len(store.experts_present(layer))
    cache = make_cache(store, 2 * store.top_k, max(1, total - 2 * store.top_k - 1))
    cache._spare_slots = store.top_k  # as on a GPU with a write-back stream
    return cache, layer, store.experts_present(layer)


def test_deferred_writebacks_wait_for_the_flush_and_then_keep_the_tier_exclusive(store):
    cache, layer, experts = spare_cache(store)
    rng, deferred_seen = random.Random(0), 0
    for _ in range(40):
        lease = cache.acquire(layer, rng.sample(experts, store.top_k), force=True, defer_writebacks=True)
        for expert, slot in lease.slots.items():
            assert weights_match(cache, store, layer, expert, slot), (expert, lease.outcomes)
        owed = {key for key, _ in cache._deferred}
        deferred_seen += len(owed)
        assert not owed & {key for key in owed if key in cache.host}, "deferred, yet already in the host tier"
        before = cache.stats().writebacks
        cache.release(lease)
        cache.flush_writebacks()
        assert cache.stats().writebacks == before + len(owed) and not cache._deferred
        assert all(key in cache.host for key in owed)
        resident = set(cache.resident())
        assert not {key for key in resident if key in cache.host}, "an expert held twice"
    assert deferred_seen > 0


def test_an_expert_needed_before_its_flush_is_landed_in_the_host_tier_first(store):
    cache, layer, experts = spare_cache(store)
    rng = random.Random(1)
    for _ in range(10):  # fill the tiers
        cache.release(cache.acquire(layer, rng.sample(experts, store.top_k), force=True))
    owed = []
    while not owed:
        lease = cache.acquire(layer, rng.sample(experts, store.top_k), force=True, defer_writebacks=True)
        cache.release(lease)
        owed = [key for key, _ in cache._deferred]
    from_disk = cache.stats().loads["disk"]
    _, expert = owed[0]
    lease = cache.acquire(layer, [expert], force=True, defer_writebacks=True)  # before the flush
    assert lease.outcomes[expert] == "miss"
    assert cache.stats().loads["disk"] == from_disk, "read from the store: the write-back was not landed first"
    assert weights_match(cache, store, layer, expert, lease.slots[expert])
    cache.release(lease)


def host_entries_match(cache, store) -> bool:
    """Every entry of the host tier holds its own expert's weights."""
    for (layer, expert), slot in list(cache.host._entries.items()):
        views, shard = cache.host._views(slot), store.load_expert(layer, expert)
        if not all(torch.equal(views[name], shard[name]) for name in views):
            return False
    return True


def test_a_slot_owed_a_writeback_is_written_back_before_it_is_refilled(store):
    cache, layer, experts = spare_cache(store)
    rng, refilled = random.Random(2), 0
    for _ in range(30):  # never flushed: the free slots run down to those still owed
        owed = {slot.index for _, slot in cache._deferred}
        lease = cache.acquire(layer, rng.sample(experts, store.top_k), force=True, defer_writebacks=True)
        refilled += len(owed & set(lease.slots.values()))
        for expert, slot in lease.slots.items():
            assert weights_match(cache, store, layer, expert, slot)
        cache.release(lease)
        assert host_entries_match(cache, store), "a write-back copied a slot already refilled"
    cache.flush_writebacks()
    assert host_entries_match(cache, store), "a write-back copied a slot already refilled"
    assert refilled > 0
