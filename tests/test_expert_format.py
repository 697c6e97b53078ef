"""Quantised experts: FP8 block-scaled and MXFP4 checkpoints extract with their scales, bit
for bit, and cadre's dequantisation equals transformers' own dequantised load of the same
checkpoint exactly (tolerance 0: the same arithmetic in the same order); --dtype fp8
writes what transformers' FP8 quantiser writes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, FineGrainedFP8Config, Mxfp4Config

from extract_helpers import same_bits, source_tensors
from extractor import extract_store
from extractor.store import ExpertStore
from models.expert_format import dense_weights
from quantized_checkpoints import FP8_BLOCK, make_fp8_checkpoint, make_mxfp4_checkpoint
from test_extract_layouts import experts_of
from tiny_models import make_checkpoint


def _experts_module_dequantised(checkpoint, config):
    return experts_of(AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=config))


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_fp8_experts_extract_with_scales_and_dequantise_like_transformers(tmp_path, family):
    checkpoint = make_fp8_checkpoint(tmp_path / "ckpt", family)
    extract_store(checkpoint, tmp_path / "store")
    store = ExpertStore.open(tmp_path / "store")
    fmt = store.expert_format
    assert fmt["weights"] == "fp8" and fmt["block_size"] == FP8_BLOCK and store.manifest["dtype"] == "bfloat16"
    source = source_tensors(checkpoint)
    reference = _experts_module_dequantised(checkpoint, FineGrainedFP8Config(dequantize=True))
    for (layer, expert), expected in reference.items():
        shard = store.load_expert(layer, expert)
        prefix = f"model.layers.{layer}.mlp.experts.{expert}."
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert same_bits(shard[name], source[prefix + name + ".weight"])
            assert same_bits(shard[name + "_scale_inv"], source[prefix + name + ".weight_scale_inv"])
        dense = dense_weights(fmt, shard, torch.bfloat16)
        for name, tensor in expected.items():
            assert same_bits(dense[name], tensor), (layer, expert, name)
    # a miss moves the quantised shard: one byte a weight plus the scales
    inter, hidden = 16, 32
    assert store.expert_nbytes(layer, expert) == 3 * inter * hidden + 3 * 2 * 4 * 4


def test_mxfp4_experts_extract_with_scales_and_dequantise_like_transformers(tmp_path):
    checkpoint = make_mxfp4_checkpoint(tmp_path / "ckpt", intermediate_size=32)
    extract_store(checkpoint, tmp_path / "store")
    store = ExpertStore.open(tmp_path / "store")
    fmt = store.expert_format
    assert fmt["weights"] == "mxfp4" and "gate_proj_bias" in fmt["tensors"]
    source = source_tensors(checkpoint)
    reference = _experts_module_dequantised(checkpoint, Mxfp4Config(dequantize=True))
    for (layer, expert), expected in reference.items():
        shard = store.load_expert(layer, expert)
        blocks = source[f"model.layers.{layer}.mlp.experts.gate_up_proj_blocks"][expert]  # [2I,G,16] interleaved
        assert same_bits(shard["gate_proj"], blocks[0::2].contiguous())
        assert same_bits(shard["up_proj"], blocks[1::2].contiguous())
        dense = dense_weights(fmt, shard, torch.bfloat16)
        for name, tensor in expected.items():
            assert same_bits(dense[name], tensor), (layer, expert, name)
    assert store.expert_nbytes(0, 0) == 3 * 32 * (16 + 1) + 3 * 32 * 2  # blocks + scales, then bf16 biases


def test_dtype_fp8_writes_what_transformers_quantiser_writes(tmp_path):
    from transformers.integrations.finegrained_fp8 import Fp8Quantize
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    checkpoint = make_checkpoint(tmp_path / "ckpt", "qwen3_moe", dtype=torch.bfloat16)
    extract_store(checkpoint, tmp_path / "store", dtype="fp8", fp8_block=(8, 8))
    store = ExpertStore.open(tmp_path / "store")
    assert store.expert_format["weights"] == "fp8" and store.manifest["dtype"] == "bfloat16"
    quantize = Fp8Quantize(FineGrainedFP8HfQuantizer(FineGrainedFP8Config(weight_block_size=[8, 8])))
    source = source_tensors(checkpoint)
    for layer in store.moe_layers:
        for expert in (0, 15):
            shard = store.load_expert(layer, expert)
            for name in ("gate_proj", "up_proj", "down_proj"):
                key = f"model.layers.{layer}.mlp.experts.{expert}.{name}.weight"
                expected = quantize.convert({key: source[key]})
                assert same_bits(shard[name], expected[key])
                assert same_bits(shard[name + "_scale_inv"], expected[key + "_scale_inv"])
    trunk_key = "model.layers.0.self_attn.q_proj.weight"
    from safetensors.torch import load_file

    assert same_bits(load_file(store.trunk_path)[trunk_key], source[trunk_key])  # the trunk is left as it was


def test_dtype_fp8_refuses_a_block_that_does_not_divide(tmp_path):
    from extractor import ExtractError

    checkpoint = make_checkpoint(tmp_path / "ckpt", "qwen3_moe", dtype=torch.bfloat16)
    with pytest.raises(ExtractError, match="does not divide"):
        extract_store(checkpoint, tmp_path / "store", dtype="fp8", fp8_block=(128, 128))
    assert not (tmp_path / "store").exists()
