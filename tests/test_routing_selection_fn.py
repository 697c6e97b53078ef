"""Cohere2-MoE's config picks how its top-k logits become weights (expert_selection_fn: softmax,
or sigmoid renormalised or not): each choice gives transformers' tokens and logits, at every
expert and at one token's top-k of budget."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from extractor.store import ExpertStore
from models import Runtime, RuntimeConfig
from models.runtime import expert_bytes


@pytest.mark.parametrize("selection, renormalize", [("softmax", True), ("sigmoid", False)])
def test_each_selection_function_matches_transformers(selection, renormalize, store_factory):
    checkpoint, store = store_factory("cohere2_moe", expert_selection_fn=selection, norm_topk_prob=renormalize)
    reference = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    ids = torch.randint(3, 120, (2, 10), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want_logits = reference(ids).logits
    want = reference.generate(ids[:1], max_new_tokens=16, min_new_tokens=16, do_sample=False)
    opened = ExpertStore.open(store)
    for budget in ({"cache_fraction": 1.0}, {"cache_bytes": opened.top_k * expert_bytes(opened, opened.dtype)}):
        runtime = Runtime.from_store(store, RuntimeConfig(**budget))
        assert runtime.policy.spec.kind == ("topk_sigmoid" if selection == "sigmoid" else "topk_softmax")
        with torch.no_grad():
            torch.testing.assert_close(runtime.model(ids).logits, want_logits, atol=1e-4, rtol=0)
        assert torch.equal(runtime.generate(ids[:1], max_new_tokens=16, min_new_tokens=16), want)
        runtime.close()
