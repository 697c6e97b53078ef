"""Speculative reads into the host tier (ExpertCache.prefetch_host, a runtime's
prefetch_tier="host"): a predicted expert that no memory tier holds is read from the store
into the host tier ahead of need, so its load is a host-tier copy, not a store read on the
step's critical path. It never touches the device slots; a load that comes while the read is
under way waits for it instead of reading the shard twice; a read that fails leaves the
store to the load. On the CPU with a host tier of its own (the bookkeeping a GPU runs)."""

import threading
import time

import pytest
import torch

from test_host_tier_exclusive import make_cache, store, weights_match  # noqa: F401 (store: a fixture)


def exclusive_cache(store):
    layer = store.moe_layers[0]
    total = len(store.experts_present(layer))
    cache = make_cache(store, store.top_k, max(store.top_k, total - 2 * store.top_k))
    assert cache.exclusive
    return cache, layer, store.experts_present(layer)


def wait_for_reads(cache) -> None:
    for future in list(cache._host_reads.values()):
        future.result(timeout=30)


def test_a_predicted_expert_is_read_into_the_host_tier_and_its_load_is_a_host_copy(store):
    cache, layer, experts = exclusive_cache(store)
    predicted = [(layer, e) for e in experts[:3]]
    assert cache.prefetch_host(predicted) == 3
    wait_for_reads(cache)
    assert all(key in cache.host for key in predicted)
    assert not cache.resident(), "a host-tier prefetch took a device slot"
    assert host_entries_hold_their_experts(cache, store)
    lease = cache.acquire(layer, experts[:3])
    stats = cache.stats()
    assert stats.loads["host"] == 3 and stats.loads["disk"] == 0
    assert stats.prefetch["host_issued"] == 3 and stats.prefetch["host_used"] == 3
    for expert, slot in lease.slots.items():
        assert weights_match(cache, store, layer, expert, slot)
    cache.release(lease)
    assert not any(key in cache.host for key in predicted), "taken up by the device, yet still in the host tier"
    cache.close()


def test_what_a_memory_tier_already_holds_is_not_read_again(store):
    cache, layer, experts = exclusive_cache(store)
    cache.release(cache.acquire(layer, experts[:2]))  # resident on the device
    assert cache.prefetch_host([(layer, e) for e in experts[:2]]) == 0
    assert cache.prefetch_host([(layer, experts[2])]) == 1
    wait_for_reads(cache)
    assert cache.prefetch_host([(layer, experts[2])]) == 0  # now in the host tier
    assert cache.stats().prefetch["host_issued"] == 1
    cache.close()


def test_a_load_during_the_read_waits_for_it_instead_of_reading_the_shard_twice(store, monkeypatch):
    cache, layer, experts = exclusive_cache(store)
    key, started, release = (layer, experts[0]), threading.Event(), threading.Event()
    reads = []
    read = cache._read_shard_into

    def slow_read(key, views):
        reads.append(key)
        started.set()
        assert release.wait(10)
        read(key, views)
    monkeypatch.setattr(cache, "_read_shard_into", slow_read)
    cache.prefetch_host([key])
    assert started.wait(10)
    threading.Timer(0.2, release.set).start()
    lease = cache.acquire(layer, [experts[0]])  # waits for the read under way
    assert reads == [key], "the shard was read twice"
    assert cache.stats().loads == {"host": 1}
    assert weights_match(cache, store, layer, experts[0], lease.slots[experts[0]])
    cache.release(lease)
    cache.close()


def test_a_failed_read_leaves_no_entry_and_the_load_reads_the_store(store, monkeypatch):
    cache, layer, experts = exclusive_cache(store)

    def broken(key, views):
        views["gate_proj"].fill_(7)  # half written, then the disk fails
        raise OSError("disk gone")
    monkeypatch.setattr(cache, "_read_shard_into", broken)
    key = (layer, experts[0])
    assert cache.prefetch_host([key]) == 1
    deadline = time.monotonic() + 10
    while cache._host_reads and time.monotonic() < deadline:  # (a read's future leaves once done)
        time.sleep(0.01)
    assert not cache._host_reads
    assert key not in cache.host, "a half-written entry was registered"
    lease = cache.acquire(layer, [experts[0]])
    assert cache.stats().loads["disk"] == 1
    assert weights_match(cache, store, layer, experts[0], lease.slots[experts[0]])
    cache.release(lease)
    cache.close()


def test_the_runtime_prefetch_tier_is_checked():
    from models.runtime import RuntimeConfig

    with pytest.raises(ValueError, match="prefetch_tier"):
        RuntimeConfig(prefetch_tier="disk")


def host_entries_hold_their_experts(cache, store) -> bool:
    for (layer, expert), slot in list(cache.host._entries.items()):
        views, shard = cache.host._views(slot), store.load_expert(layer, expert)
        if not all(torch.equal(views[name], shard[name].to(views[name].dtype)) for name in views):
            return False
    return True
