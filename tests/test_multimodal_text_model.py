"""A vision-language MoE checkpoint as published (Qwen3.5-MoE, Qwen4-Exp): the store keeps every
tensor (the vision tower in the trunk), and cadre serves its text model with transformers' tokens
and logits, at every expert and at one token's top-k of budget."""

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from extractor import extract_store
from extractor.store import ExpertStore
from models import Runtime, RuntimeConfig
from models.runtime import expert_bytes
from tiny_models import make_multimodal_checkpoint


@pytest.mark.parametrize("family", ["qwen3_5_moe", "qwen4_exp"])
def test_the_text_model_matches_transformers(family, tmp_path):
    checkpoint = make_multimodal_checkpoint(tmp_path / "checkpoint", family)
    extract_store(checkpoint, tmp_path / "store", quiet=True)
    with safe_open(tmp_path / "store" / "trunk.safetensors", "pt") as f:
        assert any(key.startswith("model.visual.") for key in f.keys())  # nothing of the checkpoint is lost
    store = ExpertStore.open(tmp_path / "store")
    reference = AutoModelForCausalLM.from_pretrained(checkpoint).eval()  # transformers' own text model of it
    ids = torch.randint(3, 120, (2, 10), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want_logits = reference(ids).logits
    want = reference.generate(ids[:1], max_new_tokens=16, min_new_tokens=16, do_sample=False)
    for budget in ({"cache_fraction": 1.0}, {"cache_bytes": store.top_k * expert_bytes(store, store.dtype)}):
        runtime = Runtime.from_store(store.root, RuntimeConfig(**budget))
        with torch.no_grad():
            torch.testing.assert_close(runtime.model(ids).logits, want_logits, atol=1e-4, rtol=0)
        assert torch.equal(runtime.generate(ids[:1], max_new_tokens=16, min_new_tokens=16), want)
        runtime.close()
