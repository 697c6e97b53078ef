"""A float32 checkpoint written as a bfloat16 store keeps in float32 what transformers keeps in
float32 at any dtype (the model's `_keep_in_fp32_modules_strict`: DeepSeek's and GLM's router
weights and correction biases, ERNIE's): cadre's bf16 model then computes exactly what
transformers' own bf16 load of the checkpoint computes. Cast to bf16 and upcast again, the
router weights moved the logits by ~4e-3."""

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from models import Runtime, RuntimeConfig
from extractor import extract_store
from tiny_models import make_checkpoint


@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v2", "glm4_moe", "ernie4_5_moe", "kimi_linear",
                                    "hunyuan_v1_moe", "hy_v3", "hy_v4", "glm_moe_dsa", "flint", "beam", "axk2"])
def test_bf16_store_keeps_transformers_fp32_tensors(family, tmp_path):
    checkpoint = make_checkpoint(tmp_path / "checkpoint", family)  # float32
    extract_store(checkpoint, tmp_path / "store", dtype="bfloat16", quiet=True)
    with safe_open(tmp_path / "store" / "trunk.safetensors", "pt") as f:
        kept = {key for key in f.keys() if f.get_slice(key).get_dtype() == "F32"}
        cast = {key for key in f.keys() if f.get_slice(key).get_dtype() == "BF16"}
    assert any(key.endswith((".gate.weight", ".gate.wg.weight")) for key in kept), sorted(kept)  # the router's
    assert any(key.endswith("o_proj.weight") for key in cast), sorted(cast)  # the rest is cast
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    runtime = Runtime.from_store(tmp_path / "store", RuntimeConfig(cache_fraction=1.0, dtype="bfloat16"))
    ids = torch.randint(3, 120, (2, 10), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(runtime.model(ids).logits, reference(ids).logits)
    runtime.close()
