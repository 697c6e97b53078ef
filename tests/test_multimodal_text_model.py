"""A vision-language MoE checkpoint as published (Qwen3.5-MoE, Qwen4-Exp): the store keeps every
tensor (the vision tower in the trunk), and cadre serves its text model with transformers' tokens
and logits, at every expert and at one token's top-k of budget."""

import pytest
from safetensors import safe_open

from extractor import extract_store
from parity import assert_parity, two_budgets
from tiny_models import make_multimodal_checkpoint


@pytest.mark.parametrize("family", ["qwen3_5_moe", "qwen4_exp"])
def test_the_text_model_matches_transformers(family, tmp_path):
    checkpoint = make_multimodal_checkpoint(tmp_path / "checkpoint", family)
    extract_store(checkpoint, tmp_path / "store", quiet=True)
    with safe_open(tmp_path / "store" / "trunk.safetensors", "pt") as f:
        assert any(key.startswith("model.visual.") for key in f.keys())  # nothing of the checkpoint is lost
    # the reference is transformers' own text model of the checkpoint (AutoModelForCausalLM)
    assert_parity(checkpoint, tmp_path / "store", two_budgets, 16, family)
