"""Families beyond the first six, extracted from layouts transformers describes: every
expert shard equals, bit for bit, that expert's slice of the fused parameters transformers
itself builds when it loads the same checkpoint (per-expert keys merged and concatenated,
fused keys transposed, gate/up interleaved, biases)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from extract_helpers import same_bits, source_tensors
from extractor import extract_store
from extractor.store import ExpertStore
from tiny_models import NEW_FAMILIES, make_checkpoint


def transformers_experts(checkpoint, dtype) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """(layer, expert) -> shard tensors, cut from the experts modules of transformers' own load."""
    return experts_of(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype))


def experts_of(model) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    experts = {}
    for path, module in model.named_modules():
        if not hasattr(module, "is_concatenated"):
            continue
        layer = int(path.split("layers.")[1].split(".")[0])
        for e in range(module.gate_up_proj.shape[0]):
            gate_up, down = module.gate_up_proj[e], module.down_proj[e]
            if module.is_transposed:
                gate_up, down = gate_up.T, down.T  # [2I,H], [H,I]
            split = (slice(None, None, 2), slice(1, None, 2)) if not module.is_concatenated else None
            gate, up = (gate_up[split[0]], gate_up[split[1]]) if split else gate_up.chunk(2, dim=0)
            shard = {"gate_proj": gate, "up_proj": up, "down_proj": down}
            if module.has_bias:
                bias = module.gate_up_proj_bias[e]
                gate_b, up_b = (bias[split[0]], bias[split[1]]) if split else bias.chunk(2)
                shard |= {"gate_proj_bias": gate_b, "up_proj_bias": up_b, "down_proj_bias": module.down_proj_bias[e]}
            experts[layer, e] = {k: v.detach().contiguous() for k, v in shard.items()}
    return experts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_shards_equal_transformers_own_experts(tmp_path, family, dtype):
    checkpoint = make_checkpoint(tmp_path / "ckpt", family, dtype=dtype, max_shard_size="40KB")
    extract_store(checkpoint, tmp_path / "store")
    store = ExpertStore.open(tmp_path / "store")
    expected = transformers_experts(checkpoint, dtype)

    assert store.manifest["family"] == family and store.moe_layers == sorted({l for l, _ in expected})
    assert store.num_experts == 16
    for (layer, expert), tensors in expected.items():
        shard = store.load_expert(layer, expert)
        assert set(shard) == set(tensors), (layer, expert)
        for name, tensor in tensors.items():
            assert same_bits(shard[name], tensor), (family, layer, expert, name)
    # the trunk is every other key of the checkpoint, untouched
    trunk, source = load_file(store.trunk_path), source_tensors(checkpoint)
    assert all(same_bits(trunk[key], source[key]) for key in trunk)
    assert store.verify() == []


def test_gpt_oss_format_lists_its_biases(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "ckpt", "gpt_oss")
    extract_store(checkpoint, tmp_path / "store")
    store = ExpertStore.open(tmp_path / "store")
    assert store.manifest["expert_format"] == {
        "weights": "dense", "tensors": ["gate_proj", "up_proj", "down_proj", "gate_proj_bias", "up_proj_bias",
                                        "down_proj_bias"]}
    plain = make_checkpoint(tmp_path / "plain", "glm4_moe")
    extract_store(plain, tmp_path / "plain-store")
    assert "expert_format" not in ExpertStore.open(tmp_path / "plain-store").manifest  # read as format 1 stores
