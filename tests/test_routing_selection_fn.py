"""Cohere2-MoE's config picks how its top-k logits become weights (expert_selection_fn: softmax,
or sigmoid renormalised or not): each choice gives transformers' tokens and logits, at every
expert and at one token's top-k of budget."""

import pytest

from parity import assert_parity, two_budgets


@pytest.mark.parametrize("selection, renormalize", [("softmax", True), ("sigmoid", False)])
def test_each_selection_function_matches_transformers(selection, renormalize, store_factory):
    checkpoint, store = store_factory("cohere2_moe", expert_selection_fn=selection, norm_topk_prob=renormalize)

    def routes_by_its_selection(runtime):
        assert runtime.policy.spec.kind == ("topk_sigmoid" if selection == "sigmoid" else "topk_softmax")

    assert_parity(checkpoint, store, two_budgets, 16, f"cohere2_moe ({selection})", check=routes_by_its_selection)
