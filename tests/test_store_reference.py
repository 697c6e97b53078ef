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
