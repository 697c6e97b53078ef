"""A decode step counts its complete layers' expert lookups once for all layers
(ExpertCache.count_step_hits), and the counts are those of the per-layer path: the same
greedy run through transformers' generate() over the same runtime counts the same queries."""

import torch

from models import Runtime, RuntimeConfig


def test_step_counts_equal_per_layer_counts(store_factory):
    _, store = store_factory("qwen3_moe")
    # one row: the decoder prefills row by row, and distinct experts are counted per forward
    ids = torch.randint(3, 120, (1, 6), generator=torch.Generator().manual_seed(4))
    counted = {}
    for decoder in ("on", "off"):  # the slot-cache decoder, then transformers' generate()
        runtime = Runtime.from_store(store, RuntimeConfig(cache_fraction=1.0, decoder=decoder))
        before = runtime.cache.stats()
        runtime.generate(ids, max_new_tokens=10, min_new_tokens=10)
        after = runtime.cache.stats()
        counted[decoder] = (after.queries - before.queries, after.hits - before.hits)
        runtime.close()
    queries, hits = counted["on"]
    assert queries > 0 and hits == queries
    assert counted["on"] == counted["off"]
