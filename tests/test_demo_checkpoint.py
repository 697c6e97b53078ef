"""The shipped demo checkpoint is the model the issue asks for, in transformers' normal format."""

from __future__ import annotations

import json

from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer

from models.demo import CHECKPOINT_DIR

SHIPPED_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}


def test_architecture_is_a_fine_grained_qwen3_moe():
    config = AutoConfig.from_pretrained(CHECKPOINT_DIR)
    assert config.model_type == "qwen3_moe" and config.architectures == ["Qwen3MoeForCausalLM"]
    assert config.num_hidden_layers >= 8 and config.num_experts >= 32
    assert config.num_experts_per_tok == 4 and config.norm_topk_prob is True
    assert config.mlp_only_layers == [] and config.decoder_sparse_step == 1  # every layer is MoE


def test_weights_are_bf16_per_expert_and_small():
    assert {p.name for p in CHECKPOINT_DIR.iterdir()} == SHIPPED_FILES
    assert sum(p.stat().st_size for p in CHECKPOINT_DIR.iterdir()) < 25e6
    config = json.loads((CHECKPOINT_DIR / "config.json").read_text())
    with safe_open(CHECKPOINT_DIR / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
        assert {str(f.get_slice(k).get_dtype()) for k in keys} == {"BF16"}
    for layer in range(config["num_hidden_layers"]):
        for expert in range(config["num_local_experts"]):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight" in keys


def test_tokenizer_round_trips_and_names_its_special_tokens():
    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT_DIR)
    text = "MACBETH.\nIs this a dagger which I see before me?\n"
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    config = AutoConfig.from_pretrained(CHECKPOINT_DIR)
    assert tokenizer.eos_token_id == config.eos_token_id == 0
    assert tokenizer.pad_token_id == config.pad_token_id == 1
    assert len(tokenizer) == config.vocab_size
