"""An exclusive host tier is pinned up front (HostTier.pin_all): every chunk its cap allows,
allocated before decoding, so no cudaHostAlloc (which holds the driver's lock) runs between a
step's copies. The cap still holds, and filling the tier allocates nothing more."""

from models.host_tier import HostTier, chunk_sizes, entries_within
from test_host_tier import ENTRY, parts


def test_pin_all_allocates_every_chunk_within_the_cap_and_nothing_after(monkeypatch):
    import models.host_tier as host_tier

    cap = 10 * ENTRY + 100
    tier = HostTier(cap, entry_bytes=ENTRY, pin=False)
    tier.pin_all()
    assert tier.pinned_bytes == sum(chunk_sizes(cap, ENTRY)) <= cap
    allocations = []
    monkeypatch.setattr(host_tier, "_allocate", lambda *a: allocations.append(a))
    held = entries_within(cap, ENTRY)
    for expert in range(held + 3):  # fill, then evict
        tier.put((0, expert), parts(expert))
    assert not allocations and tier.stats().entries == held and tier.stats().evictions == 3
    assert tier.stats().peak_pinned_bytes <= cap


def test_an_exclusive_cache_on_the_cpu_pins_nothing_up_front(store_factory):
    """Only a pinned tier (a GPU's) is allocated up front: an unpinned one gains nothing by it."""
    from extractor.store import ExpertStore
    from test_host_tier_exclusive import make_cache

    store = ExpertStore.open(store_factory("qwen3_moe")[1])
    total = len(store.experts_present(store.moe_layers[0]))
    cache = make_cache(store, store.top_k, max(1, total - store.top_k - 1))
    try:
        assert cache.exclusive and cache.host.pinned_bytes == 0
    finally:
        cache.close()
