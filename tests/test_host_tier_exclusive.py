"""A host tier capped below the store is exclusive of the device slots: an expert lives in one of
them, evicted slots are written down into the tier, a host hit takes the entry up, and a disk
read goes straight into a staged host slot. Together they hold slots + entries distinct experts
(an inclusive tier holds only its own entries), and every load still computes with the store's
weights. On the CPU the tier is unpinned and the copies synchronous; the bookkeeping is the
same code as on a GPU."""

import random

import pytest
import torch

from extractor.store import ExpertStore, StoreError
from models.cache import ExpertCache, host_entry_bytes
from models.host_tier import entries_within
from models.runtime import expert_bytes


@pytest.fixture()
def store(store_factory):
    return ExpertStore.open(store_factory("qwen3_moe")[1])


def host_cap_for(store, entries: int) -> int:
    """The smallest cap whose chunks hold at least `entries` entries."""
    entry = host_entry_bytes(store, store.dtype)
    cap = entries * entry
    while entries_within(cap, entry) < entries:
        cap += entry
    return cap


def make_cache(store, slots: int, host_entries: int | None, **options) -> ExpertCache:
    cap = None if host_entries is None else host_cap_for(store, host_entries)
    return ExpertCache(store, capacity_bytes=slots * expert_bytes(store, store.dtype), host_capacity_bytes=cap,
                       host_tier=True, **options)


def weights_match(cache, store, layer, expert, slot) -> bool:
    t = store.load_expert(layer, expert)
    gate_up, down = cache.weights(slot)
    return torch.equal(gate_up, torch.cat([t["gate_proj"], t["up_proj"]])) and torch.equal(down, t["down_proj"])


def run_pattern(cache, store, steps: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    layer = store.moe_layers[0]
    experts = store.experts_present(layer)
    for _ in range(steps):
        chosen = rng.sample(experts, store.top_k)
        lease = cache.acquire(layer, chosen)
        for expert, slot in lease.slots.items():
            assert weights_match(cache, store, layer, expert, slot), (expert, lease.outcomes)
        cache.release(lease)
        resident = set(cache.resident())
        hosted = {key for key in resident | {(layer, e) for e in experts} if key in cache.host}
        assert not resident & hosted, "an expert held twice: the host tier is not exclusive"


def test_a_small_tier_is_exclusive_and_every_load_has_the_stores_weights(store):
    layer = store.moe_layers[0]
    total = len(store.experts_present(layer))
    slots, entries = store.top_k, max(1, total - store.top_k - 1)
    cache = make_cache(store, slots, entries)
    assert cache.exclusive
    run_pattern(cache, store, steps=40)
    stats = cache.stats()
    assert stats.writebacks > 0 and stats.loads["host"] > 0
    held = len(cache.resident()) + sum(1 for e in store.experts_present(layer) if (layer, e) in cache.host)
    assert cache.host.max_entries < entries_within(cache.host.capacity_bytes, host_entry_bytes(store, store.dtype))
    assert held == min(total, slots + cache.host.max_entries)  # both tiers full, spares aside


def test_exclusive_reads_the_store_less_than_an_inclusive_tier_of_the_same_size(store):
    layer = store.moe_layers[0]
    total = len(store.experts_present(layer))
    slots, entries = store.top_k, total - store.top_k + 2  # + the spares of one loader (its read, a take)
    exclusive = make_cache(store, slots, entries)
    assert slots + exclusive.host.max_entries >= total
    run_pattern(exclusive, store, steps=60)
    inclusive = make_cache(store, slots, entries)
    inclusive.exclusive = False  # the same tier, used the old way: a copy of everything it passed up
    run_pattern_inclusive(inclusive, store, steps=60)
    # together the exclusive tiers hold the whole layer: after the first pass nothing is read again
    assert exclusive.stats().loads["disk"] == total
    assert inclusive.stats().loads["disk"] > exclusive.stats().loads["disk"]


def run_pattern_inclusive(cache, store, steps: int) -> None:
    rng = random.Random(0)
    layer = store.moe_layers[0]
    experts = store.experts_present(layer)
    for _ in range(steps):
        lease = cache.acquire(layer, rng.sample(experts, store.top_k))
        cache.release(lease)


def test_a_tier_that_holds_the_store_keeps_its_copies(store):
    total = sum(len(store.experts_present(layer)) for layer in store.moe_layers)
    assert not make_cache(store, store.top_k, total).exclusive
    assert not make_cache(store, store.top_k, None).exclusive  # unbounded


def test_a_lent_out_tier_falls_back_to_pageable_reads(store):
    cache = make_cache(store, store.top_k, store.top_k)
    layer = store.moe_layers[0]
    held = []
    while (views := cache.host.stage()) is not None:  # lend every host slot
        held.append(views)
    assert len(held) == entries_within(cache.host.capacity_bytes, host_entry_bytes(store, store.dtype))
    lease = cache.acquire(layer, list(range(store.top_k)))
    assert all(weights_match(cache, store, layer, e, s) for e, s in lease.slots.items())
    cache.release(lease)
    cache.release(cache.acquire(layer, [store.top_k]))  # evicts: nowhere to write back, the store keeps it
    assert cache.stats().writebacks == 0
    del held


def test_read_expert_into_refuses_a_destination_of_another_shape(store):
    layer = store.moe_layers[0]
    parts = store.load_expert(layer, 0)
    out = {name: torch.empty_like(t) for name, t in parts.items()}
    store.read_expert_into(layer, 0, out)
    assert all(torch.equal(out[name], parts[name]) for name in parts)
    wrong = {"gate_proj": torch.empty(parts["gate_proj"].shape[0] + 1, parts["gate_proj"].shape[1],
                                      dtype=parts["gate_proj"].dtype)}
    with pytest.raises(StoreError, match="expert_000.safetensors.*gate_proj"):
        store.read_expert_into(layer, 0, wrong)


def test_a_tier_entry_moves_gate_and_up_as_one_copy(store):
    """A host-tier entry holds gate, up and down adjacent, in the shard's order, so a load or a
    write-back copies gate and up as one [2I,H] block into or out of the slot's gate_up: two
    copies, not three. Tensors apart (a pageable read) still go one by one."""
    cache = make_cache(store, store.top_k, max(1, len(store.experts_present(store.moe_layers[0])) - 2))
    entry = cache.host.adopt((store.moe_layers[0], 0))
    for number, tensor in enumerate(entry.values()):  # known values: an adopted entry's memory is uninitialised
        tensor.copy_(torch.arange(tensor.numel(), dtype=tensor.dtype).view(tensor.shape) + 1000 * number)
    pairs = cache._copy_pairs(0, entry)
    assert [tuple(slot_view.shape) for slot_view, _ in pairs] == [tuple(cache.gate_up[0].shape),
                                                                  tuple(cache.down[0].shape)]
    gate_up = pairs[0][1]
    assert torch.equal(gate_up[:cache.intermediate], entry["gate_proj"])
    assert torch.equal(gate_up[cache.intermediate:], entry["up_proj"])
    apart = {name: tensor.clone() for name, tensor in entry.items()}
    assert len(cache._copy_pairs(0, apart)) == 3


def test_spare_slots_keep_a_batch_from_refilling_the_slots_it_evicts(store):
    """On a GPU the cache keeps a few device slots free ahead of need: a load refills a slot
    evicted by an earlier batch, whose write-back is done, instead of the one its own batch
    evicts (which would make the load wait for that write-back). The same bookkeeping on the
    CPU, with the spares switched on: no batch refills a slot it evicted, the spares stay
    free between calls, and every load still has the store's weights."""
    layer = store.moe_layers[0]
    total = len(store.experts_present(layer))
    cache = make_cache(store, 2 * store.top_k, max(1, total - 2 * store.top_k - 1))
    cache._spare_slots = store.top_k
    refills, issue = [], cache._issue

    def watched(misses, *rest):
        loads = misses.from_memory + misses.from_disk
        evicted = {slot.index for _, slot in misses.writebacks}
        refills.extend(slot.index in evicted for _, slot in loads)
        issue(misses, *rest)

    cache._issue = watched
    run_pattern(cache, store, steps=40)
    assert cache.stats().writebacks > 0 and refills and not any(refills)
    assert len(cache._free) >= store.top_k
