"""In bfloat16 the routers differ in which dtype each step runs in (Lara-Mini's float32 logits and
weights in the hidden dtype, Granite's and Cohere's float32 softmax over bf16 logits, MiniMax-M2's
bf16 logits and float32 sigmoid, Laguna's soft-capped float32 logits, AFMoE's bf16 logits cast
after, Kolibri's float32 GEMM): on a bf16 checkpoint cadre's logits equal transformers' exactly,
where a float32 check would pass a router that is only close."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from models import Runtime, RuntimeConfig


@pytest.mark.parametrize("family", ["lara_mini", "granitemoe", "cohere2_moe", "minimax_m2", "laguna", "qwen3_moe",
                                    "afmoe", "kolibri1", "deepseek_v4"])
def test_bf16_logits_equal_transformers(family, store_factory):
    checkpoint, store = store_factory(family, dtype=torch.bfloat16)
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    runtime = Runtime.from_store(store, RuntimeConfig(cache_fraction=1.0, dtype="bfloat16"))
    ids = torch.randint(3, 120, (2, 10), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(runtime.model(ids).logits, reference(ids).logits)
    runtime.close()
