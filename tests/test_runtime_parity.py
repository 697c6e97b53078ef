"""The runtime is token-identical to transformers on every family, at every budget."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from models import Runtime, RuntimeConfig
from parity import assert_parity, budgets, prompt_ids, two_budgets
from tiny_models import FIRST_SIX, NEW_FAMILIES

NEW_TOKENS = 64


@pytest.mark.parametrize("family", FIRST_SIX)
def test_greedy_tokens_and_logits_match_transformers(family, store_factory):
    assert_parity(*store_factory(family), budgets, NEW_TOKENS, family)


# Families read from transformers' description (biases, interleaved experts, attention
# sinks and sliding layers, linear attention, Mamba, conv layers): the budgets the issue
# names, 100% and one token's top-k of one layer, with a shorter generation (CI time).
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_new_families_match_transformers(family, store_factory):
    assert_parity(*store_factory(family), two_budgets, 24, family)


# bf16: transformers' and cadre's kernels see the same bf16 operands; the stated
# tolerance is on logits (bf16 has ~3 significant digits) and the greedy tokens.
BF16_LOGIT_ATOL = 2e-2


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_bf16_parity_within_tolerance(family, store_factory):
    checkpoint, store = store_factory(family, dtype=torch.bfloat16)
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    runtime = Runtime.from_store(store, RuntimeConfig(cache_fraction=0.5))
    ids = prompt_ids(batch=2)
    with torch.no_grad():
        expected, got = reference(ids).logits, runtime.model(ids).logits
    torch.testing.assert_close(got.float(), expected.float(), atol=BF16_LOGIT_ATOL, rtol=0)
    expected_tokens = reference.generate(ids[:1], max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert torch.equal(runtime.generate(ids[:1], max_new_tokens=16, min_new_tokens=16), expected_tokens)
    runtime.close()
