"""Quantised stores run: FP8 (trunk and experts) and MXFP4 (gpt-oss experts) give transformers'
own greedy tokens, logits within bf16's tolerance of transformers' dequantised load, and a
miss moves the quantised shard's bytes (the cache's counters)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, FineGrainedFP8Config, Mxfp4Config

from extractor import extract_store
from models import Runtime, RuntimeConfig
from quantized_checkpoints import make_fp8_checkpoint, make_mxfp4_checkpoint

BF16_LOGIT_ATOL = 2e-2  # as tests/test_runtime_parity.py: the same bf16 operands, other kernels
NEW_TOKENS = 16


def prompt(batch: int = 1) -> torch.Tensor:
    return torch.randint(3, 120, (batch, 8), generator=torch.Generator().manual_seed(5))


CASES = {
    "fp8-qwen3_moe": (lambda p: make_fp8_checkpoint(p, "qwen3_moe"), FineGrainedFP8Config(dequantize=True)),
    "fp8-deepseek_v3": (lambda p: make_fp8_checkpoint(p, "deepseek_v3"), FineGrainedFP8Config(dequantize=True)),
    "mxfp4-gpt_oss": (lambda p: make_mxfp4_checkpoint(p, intermediate_size=32), Mxfp4Config(dequantize=True)),
}


@pytest.mark.parametrize("case", CASES)
def test_quantised_store_matches_transformers_dequantised(tmp_path, case):
    build, quantization = CASES[case]
    checkpoint = build(tmp_path / "ckpt")
    extract_store(checkpoint, tmp_path / "store")
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=quantization).eval()
    runtime = Runtime.from_store(tmp_path / "store", RuntimeConfig(cache_fraction=0.25))
    with torch.no_grad():
        expected, got = reference(prompt(2)).logits, runtime.model(prompt(2)).logits
    torch.testing.assert_close(got.float(), expected.float(), atol=BF16_LOGIT_ATOL, rtol=0)
    expected_tokens = reference.generate(prompt(), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                         do_sample=False)
    assert torch.equal(runtime.generate(prompt(), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS),
                       expected_tokens)
    stats = runtime.cache.stats()
    loads = sum(stats.loads.values())
    shard = runtime.store.expert_nbytes(runtime.store.moe_layers[0], 0)
    assert loads > 0 and stats.bytes_loaded == loads * shard  # every miss moved exactly one quantised shard
    runtime.close()
