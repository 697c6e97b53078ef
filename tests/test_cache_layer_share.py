"""layer-lru eviction: fair per-layer shares instead of one global LRU order.

A forward visits the MoE layers in a cycle; when a batch's working set over all layers
exceeds the budget, global LRU evicts what the next layers are about to use.
"""

import random

import torch

from extractor.store import ExpertStore
from models import Runtime, RuntimeConfig
from models.cache import ExpertCache
from models.runtime import expert_bytes
from router.eviction import EVICTION_POLICIES, LayerShareEviction


def decode_steps(cache, store, working_sets):
    """Every layer in turn acquires (streaming) its working set of each step."""
    for experts in working_sets:
        for layer in store.moe_layers:
            needed = sorted(experts)
            while needed:
                lease = cache.acquire(layer, needed)
                assert len(cache._slots) <= cache.num_slots
                cache.release(lease)
                needed = [e for e in needed if e not in lease.slots]
    return cache.stats()


def test_layer_shares_beat_global_lru_when_the_batch_overflows_the_budget(store_factory):
    store = ExpertStore.open(store_factory("qwen3_moe")[1])
    rng = random.Random(0)
    # a batch's skewed demand: 8 draws per layer from a few popular experts, as routers do
    steps = [{min(int(rng.expovariate(0.25)), 15) for _ in range(8)} for _ in range(60)]
    budget = 4 * len(store.moe_layers) * expert_bytes(store, store.dtype)  # a share of 4 experts per layer
    lru = decode_steps(ExpertCache(store, capacity_bytes=budget), store, steps)
    shared = decode_steps(ExpertCache(store, capacity_bytes=budget, policy=LayerShareEviction()), store, steps)
    assert lru.queries == shared.queries
    assert shared.hit_rate > 1.5 * lru.hit_rate  # seeded: 19.8% vs 10.3%, (shared.hit_rate, lru.hit_rate)


def test_layers_take_back_their_shares_and_overflow_streams_through_its_own(store_factory):
    store = ExpertStore.open(store_factory("qwen3_moe")[1])
    layers = store.moe_layers
    cache = ExpertCache(store, capacity_bytes=2 * len(layers) * expert_bytes(store, store.dtype),
                        policy=LayerShareEviction())
    share = cache.num_slots // len(layers)
    cache.release(cache.acquire(layers[0], list(range(cache.num_slots))))  # free slots: the first layer takes all
    assert cache.layer_count(layers[0]) == cache.num_slots
    stats = decode_steps(cache, store, [set(range(6))] * 3)  # each layer needs 6, three times its share
    assert [cache.layer_count(layer) for layer in layers] == [share] * len(layers)
    # each layer keeps its share across steps: `share` of its 6 experts hit in every later step
    assert stats.hits == cache.num_slots + 2 * share * len(layers), stats


def test_layer_lru_changes_no_token(store_factory):
    checkpoint, store = store_factory("qwen3_moe")
    assert "layer-lru" in EVICTION_POLICIES
    ids = torch.randint(0, 128, (4, 6), generator=torch.Generator().manual_seed(0))
    outputs = {}
    for eviction in ("lru", "layer-lru"):
        runtime = Runtime.from_store(store, RuntimeConfig(cache_fraction=0.25, eviction=eviction))
        outputs[eviction] = runtime.generate(ids, max_new_tokens=12, do_sample=False)
        runtime.close()
    assert torch.equal(outputs["lru"], outputs["layer-lru"])


def captured_steps(cache, store, working_sets):
    """Every layer in turn pins its whole working set of each step at once (force=True), as a
    replayed decode step must, then releases it."""
    for experts in working_sets:
        for layer in store.moe_layers:
            lease = cache.acquire(layer, sorted(experts), force=True)
            assert not lease.missing and len(cache._slots) <= cache.num_slots
            cache.release(lease)
    return cache.stats()


def test_a_captured_step_larger_than_a_share_takes_the_layer_just_done_not_the_one_ahead(store_factory):
    """A batch whose working set per layer is larger than its share must still be pinned whole.
    The slots come from the layer just computed, whose next use is a whole step away, so the other
    layers keep what they hold across steps (LRU's choice was the next layer's experts: a cascade
    round the cycle that left almost nothing resident, 4.6% hits at full depth with 16 clients)."""
    store = ExpertStore.open(store_factory("qwen3_moe")[1])
    layers, experts = store.moe_layers, store.num_experts
    rng = random.Random(0)
    width = min(experts, 3 * store.top_k)  # each layer's distinct experts per step
    steps = [set(rng.sample(range(experts), width)) for _ in range(40)]
    slots = 2 * width
    cache = ExpertCache(store, capacity_bytes=slots * expert_bytes(store, store.dtype), policy=LayerShareEviction())
    assert width > cache.num_slots // len(layers)
    stats = captured_steps(cache, store, steps)
    # The best any policy does: while one layer pins its `width`, the others share the rest evenly and
    # find that many of their next random `width` resident (seeded: 35.6%, the LRU fallback 23.5%)
    best = (slots - width) / (len(layers) - 1) / experts
    assert stats.hit_rate > 0.9 * best, (stats.hit_rate, best)


def test_under_its_share_with_no_layer_over_a_layer_takes_the_layer_just_done(store_factory):
    """A GPU's cache keeps spare slots free (write-backs then run beside the loads), so an eviction
    often leaves its layer under its share with no layer over. The slot then comes from another
    layer's most recently used expert, needed again only a forward later: the global LRU expert,
    taken before a9a1d69, is the next layer's, and round the cycle nothing hit (bench cache-host:
    0% at batch 16 at full depth's geometry)."""
    store = ExpertStore.open(store_factory("qwen3_moe")[1])
    first, second, third = store.moe_layers[:3]
    cache = ExpertCache(store, capacity_bytes=3 * 2 * expert_bytes(store, store.dtype), policy=LayerShareEviction())
    share = cache.num_slots // len(store.moe_layers)
    assert share == 2
    for layer in (third, second):  # a forward's order, the third layer left from the one before
        cache.release(cache.acquire(layer, [0, 1]))
    cache.release(cache.acquire(first, [0]))  # the first layer, under its share; no layer over
    with cache._lock:
        victim = cache.policy.victim(iter(cache._slots), cache, (first, 5))
    assert victim == (second, 1), "not the most recently used expert of another layer"


def test_layer_lru_finds_a_victim_without_scanning_the_lru_order(store_factory):
    """Its victim comes from per-layer counts and orders: the LRU order handed to it is not read
    (a scan of it cost ~0.5 us a key, ~2000 keys at full depth, at every eviction)."""
    store = ExpertStore.open(store_factory("qwen3_moe")[1])
    layers = store.moe_layers
    cache = ExpertCache(store, capacity_bytes=2 * len(layers) * expert_bytes(store, store.dtype),
                        policy=LayerShareEviction())
    cache.release(cache.acquire(layers[0], list(range(cache.num_slots))))  # layer 0 far over its share

    class Untouchable:
        def __iter__(self):
            raise AssertionError("the LRU order was scanned")

    with cache._lock:
        victim = cache.policy.victim(Untouchable(), cache, (layers[1], 0))
    assert victim is not None and victim[0] == layers[0]
