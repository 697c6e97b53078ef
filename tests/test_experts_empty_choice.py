"""A forward whose every top-k slot is unused (a lossy policy dropped them all, or a store
holding fewer experts than top-k) computes nothing and loads nothing."""

import torch

from models import Runtime, RuntimeConfig
from models.loading import expert_layers


def test_a_layer_with_no_expert_chosen_contributes_zero(store_factory):
    _, store = store_factory("qwen3_moe")
    runtime = Runtime.from_store(store, RuntimeConfig(cache_fraction=0.5))
    layer = next(iter(expert_layers(runtime.model).values()))
    module = next(m for m in runtime.model.modules() if getattr(m, "cadre", None) is layer)
    hidden = torch.randn(3, runtime.model.config.hidden_size)
    index = torch.full((3, runtime.store.top_k), -1)
    out = layer(module, hidden, index, torch.zeros(3, runtime.store.top_k))
    assert torch.equal(out, torch.zeros_like(hidden))
    assert sum(runtime.cache.stats().loads.values()) == 0
    runtime.close()
