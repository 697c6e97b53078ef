"""Several loader threads reading misses from the store at once (the GPU default) give the
same tokens and the same cache accounting as one."""

import torch

from models import Runtime, RuntimeConfig
from models.cache import default_load_workers


def generate(store, workers: int):
    runtime = Runtime.from_store(store, RuntimeConfig(cache_fraction=0.25, load_workers=workers, prefetch_layers=1))
    ids = torch.randint(3, 120, (2, 12), generator=torch.Generator().manual_seed(5))
    out = runtime.generate(ids, max_new_tokens=16, min_new_tokens=16)
    stats = runtime.cache.stats()
    runtime.close()
    return out, stats


def test_four_loaders_match_one(store_factory):
    _, store = store_factory("qwen3_moe")
    one, one_stats = generate(store, 1)
    four, four_stats = generate(store, 4)
    assert torch.equal(one, four)
    assert four_stats.queries == one_stats.queries
    assert four_stats.bytes <= four_stats.capacity_bytes


def test_defaults():
    assert default_load_workers(torch.device("cpu")) == 1
    assert 1 <= default_load_workers(torch.device("cuda")) <= 8
