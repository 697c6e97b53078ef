"""bench's reference model built from a store equals transformers' own from_pretrained."""

import torch
from transformers import AutoModelForCausalLM

from bench.store_reference import reference_from_store


def test_reference_from_store_is_from_pretrained(store_factory):
    checkpoint, store = store_factory("qwen3_moe")
    ids = torch.randint(3, 120, (2, 9), generator=torch.Generator().manual_seed(4))
    built = reference_from_store(store, "cpu", torch.float32, "grouped_mm")
    loaded = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(built(ids).logits, loaded(ids).logits)


def test_offloaded_from_store_computes_the_same(store_factory):
    """accelerate's dispatch (here every module on the CPU, the only device) keeps the numbers."""
    from bench.store_reference import offloaded_from_store, reference_from_store

    _, store = store_factory("qwen3_moe")
    ids = torch.tensor([[5, 6, 7, 8]])
    offloaded = offloaded_from_store(store, torch.float32, {"cpu": 8 * 2**30})
    resident = reference_from_store(store, "cpu", torch.float32, "batched_mm")
    with torch.no_grad():
        assert torch.equal(offloaded(ids).logits, resident(ids).logits)
    assert set(offloaded.hf_device_map.values()) == {"cpu"}
