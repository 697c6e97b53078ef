"""A multimodal MoE checkpoint as published (Qwen3.5-MoE, Qwen4-Exp; dots.note 3, whose vision
encoder has experts of its own): the store keeps every tensor (the other towers in the trunk),
and cadre serves its text model with transformers' tokens and logits, at every expert and at one
token's top-k of budget."""

import pytest
from safetensors import safe_open

from extractor import extract_store
from extractor.families import FAMILIES
from parity import assert_parity, two_budgets
from tiny_models import make_multimodal_checkpoint


@pytest.mark.parametrize("family", ["qwen3_5_moe", "qwen4_exp", "dots3_note"])
def test_the_text_model_matches_transformers(family, tmp_path):
    checkpoint = make_multimodal_checkpoint(tmp_path / "checkpoint", family)
    extract_store(checkpoint, tmp_path / "store", quiet=True)
    with safe_open(tmp_path / "store" / "trunk.safetensors", "pt") as f:
        for tower in FAMILIES[family].other_towers:  # nothing of the checkpoint is lost
            assert any(key.startswith(tower) for key in f.keys()), tower
    # the reference is transformers' own text model of the checkpoint (AutoModelForCausalLM)
    assert_parity(checkpoint, tmp_path / "store", two_budgets, 16, family)


def test_a_text_config_kept_at_the_top_level_is_read_there(tmp_path):
    """dots.note 3's published config.json keeps its text model's keys at the top level, beside the
    vision and audio sections, with no text_config: the store reads them there."""
    import json

    checkpoint = make_multimodal_checkpoint(tmp_path / "checkpoint", "dots3_note")
    config = json.loads((checkpoint / "config.json").read_text())
    text = config.pop("text_config")
    text.pop("model_type", None)
    (checkpoint / "config.json").write_text(json.dumps({**config, **text}))
    extract_store(checkpoint, tmp_path / "store", quiet=True)
    assert_parity(checkpoint, tmp_path / "store", two_budgets, 16, "dots3_note (top-level text config)")
