"""A layer's first miss from the host tier is queued alone, before the host decides the
others: on a GPU its copy keeps the copy engine busy meanwhile (a batch decided whole left it
idle for the whole decision). The rest go out together; every load still has the store's
weights, and the table's changes of both batches land."""

import pytest

from extractor.store import ExpertStore

from test_host_tier_exclusive import make_cache, weights_match


@pytest.fixture()
def store(store_factory):
    return ExpertStore.open(store_factory("qwen3_moe")[1])


def test_the_first_miss_goes_out_before_the_rest_are_decided(store):
    layer = store.moe_layers[0]
    experts = store.experts_present(layer)
    k = store.top_k
    cache = make_cache(store, 2 * k, None)  # a host tier that holds the store
    cache.host.warm(store, [(layer, e) for e in experts], store.dtype)
    batches, issue = [], cache._issue

    def watched(misses, *rest):
        batches.append(len(misses.from_memory))
        issue(misses, *rest)

    cache._issue = watched
    lease = cache.acquire(layer, experts[:k])
    assert [b for b in batches if b] == [1, k - 1]
    for expert, slot in lease.slots.items():
        assert weights_match(cache, store, layer, expert, slot)
        assert int(cache.table[layer, expert]) == slot
    cache.release(lease)
