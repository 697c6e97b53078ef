"""Routers that differ from their kind in one detail, checked at the router where the detail
decides the choice (the parity tests' random weights rarely reach it): A.X-K2 scores the experts
of unchosen groups 0.0, so with negative bias-corrected scores inside the chosen groups it routes
outside them; Kolibri chooses by logits + bias, not by logits; AFMoE's bias is the block's and
its weights are renormalised then scaled by route_scale; Beam sorts its top-ks and leaves the
scaling to its block. cadre's routing (indices in their order, weights, dtypes) must equal the
family's own router on the same hidden states, bit for bit. DeepSeek-V4's hash layers and ZAYA
keep transformers' router, so their stores must hold every expert."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from extractor import extract_store
from models import Runtime, RuntimeConfig
from models.loading import moe_blocks, router_of
from tiny_models import tiny_model

GROUP_SIZE = 4  # the tiny A.X-K2 and Beam configs: 16 experts in 4 groups, 2 groups chosen, top-4


def one_positive_expert_per_group(model) -> None:
    """Bias all but the first expert of every group by -1: sigmoid + bias < 0 for them, so the two
    chosen groups hold only two experts scoring above 0 and the top-4 must take two more."""
    for block in moe_blocks(model).values():
        bias = block.gate.e_score_correction_bias
        bias.copy_(torch.where(torch.arange(bias.numel()) % GROUP_SIZE == 0, 0.0, -1.0))


def strong_bias(model) -> None:
    """A bias that outweighs the logits, so choosing by logits alone would pick other experts."""
    for block in moe_blocks(model).values():
        router = router_of(block)
        bias = getattr(block, "expert_bias", None)
        bias = bias if bias is not None else router.e_score_correction_bias
        bias.copy_(torch.linspace(-3.0, 3.0, bias.numel()))


CASES = {"axk2": one_positive_expert_per_group, "kolibri1": strong_bias, "afmoe": strong_bias, "beam": strong_bias}


def routed(block, hidden: torch.Tensor):
    router = router_of(block)
    bias = getattr(block, "expert_bias", None)
    hidden = hidden[None] if bias is not None else hidden  # AFMoE's router takes [B,S,H]
    logits, weights, indices = router(hidden, bias) if bias is not None else router(hidden)
    return logits, weights, indices


@pytest.mark.parametrize("family", sorted(CASES))
def test_router_equals_the_familys_where_its_detail_decides(family, tmp_path):
    model = tiny_model(family)
    with torch.no_grad():
        CASES[family](model)
    model.save_pretrained(tmp_path / "checkpoint")
    extract_store(tmp_path / "checkpoint", tmp_path / "store", quiet=True)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint").eval()
    runtime = Runtime.from_store(tmp_path / "store", RuntimeConfig(cache_fraction=1.0))
    hidden = torch.randn(32, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    blocks = moe_blocks(runtime.model)
    with torch.no_grad():
        for layer, reference_block in moe_blocks(reference).items():
            logits, expected_weights, expected_indices = routed(reference_block, hidden)
            _, weights, indices = routed(blocks[layer], hidden)
            assert torch.equal(indices, expected_indices), f"{family} layer {layer}: indices"
            assert weights.dtype == expected_weights.dtype and torch.equal(weights, expected_weights)
            if family == "axk2":  # the 0.0 of unchosen groups beat the negative scores inside the chosen ones
                assert any(len({int(e) // GROUP_SIZE for e in row}) > 2 for row in indices)
            else:  # the bias changed the choice: the logits alone would have chosen otherwise
                by_logits = logits.topk(indices.shape[-1], dim=-1)[1]
                assert not torch.equal(by_logits.sort(-1)[0], indices.sort(-1)[0])
    runtime.close()


@pytest.mark.parametrize("family, layer", [("deepseek_v4", 0), ("zaya", 0)])
def test_layers_that_keep_their_own_router_need_every_expert(family, layer, tmp_path):
    """DeepSeek-V4's hash layers take their experts from a token-id table, and ZAYA's router is an
    MLP carrying state from layer to layer: no mask steers either, so cadre leaves transformers'
    router there, and a store without all of those layers' experts is refused when loaded."""
    from extractor.store import StoreError

    model = tiny_model(family)
    model.save_pretrained(tmp_path / "checkpoint")
    extract_store(tmp_path / "checkpoint", tmp_path / "store", experts="0-7", quiet=True)
    with pytest.raises(StoreError, match=f"layer {layer} keeps transformers' router"):
        Runtime.from_store(tmp_path / "store", RuntimeConfig(cache_fraction=1.0))
