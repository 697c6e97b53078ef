"""A top-k slot that selects nothing (UNUSED: an expert the store lacks, or a prefill's padding
token) computes nothing, whatever slots a lease spans. Its lookup lands on a slot inside the
lease: a negative one (below the lease's first slot) was dropped from the grouped kernel's
counts and shifted every later group onto the wrong rows, which a batched prefill's padding
showed at a partial budget (tests/test_decoder_batched_prefill.py compares its logits)."""

import torch

from models import Runtime, RuntimeConfig
from router.exact import UNUSED


def test_an_unused_slot_looks_up_a_slot_inside_the_lease(store_factory):
    _, store = store_factory("qwen3_moe")
    runtime = Runtime.from_store(store, RuntimeConfig(cache_fraction=0.5))
    layer = runtime.store.moe_layers[0]
    assert not runtime.cache.layer_is_complete(layer)
    first = 5  # a lease spanning slots 5..: UNUSED maps to the table's last column, slot 0
    slots = runtime.cache.lookup(layer, torch.tensor([[UNUSED, UNUSED]]), first)
    assert (slots >= 0).all()
    runtime.close()


def test_a_subset_store_at_a_partial_budget_gives_its_full_budget_logits(store_factory):
    _, store = store_factory("qwen3_moe", experts="0")  # fewer than top-k present: every token has UNUSED slots
    ids = torch.randint(3, 120, (2, 12), generator=torch.Generator().manual_seed(4))
    logits = {}
    for fraction in (1.0, 0.5):
        runtime = Runtime.from_store(store, RuntimeConfig(cache_fraction=fraction))
        with torch.no_grad():
            logits[fraction] = runtime.model(ids).logits
        runtime.close()
    torch.testing.assert_close(logits[0.5], logits[1.0], atol=1e-5, rtol=0)
