"""The runtime is token-identical to transformers on every family, at every budget."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from models import Runtime, RuntimeConfig
from models.runtime import expert_bytes
from tiny_models import FIRST_SIX, NEW_FAMILIES

NEW_TOKENS = 64


def prompt_ids(batch: int = 1, length: int = 10) -> torch.Tensor:
    return torch.randint(3, 120, (batch, length), generator=torch.Generator().manual_seed(7))


def budgets(store_path) -> dict[str, dict]:
    from extractor.store import ExpertStore

    store = ExpertStore.open(store_path)
    one_layer = store.top_k * expert_bytes(store, store.dtype)  # one token's top-k of one layer
    return {"100%": {"cache_fraction": 1.0}, "50%": {"cache_fraction": 0.5}, "one-layer": {"cache_bytes": one_layer}}


@pytest.mark.parametrize("family", FIRST_SIX)
def test_greedy_tokens_and_logits_match_transformers(family, store_factory):
    assert_parity(family, store_factory, budgets, NEW_TOKENS)


# Families read from transformers' description (biases, interleaved experts, attention
# sinks and sliding layers, linear attention, Mamba, conv layers): the budgets the issue
# names, 100% and one token's top-k of one layer, with a shorter generation (CI time).
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_new_families_match_transformers(family, store_factory):
    def two_budgets(store):
        every = budgets(store)
        return {"100%": every["100%"], "one-layer": every["one-layer"]}

    assert_parity(family, store_factory, two_budgets, 24)


def assert_parity(family, store_factory, budgets_of, new_tokens):
    checkpoint, store = store_factory(family)
    reference = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    ids = prompt_ids()
    with torch.no_grad():
        expected_logits = reference(prompt_ids(batch=2)).logits
    expected = reference.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    for name, budget in budgets_of(store).items():
        runtime = Runtime.from_store(store, RuntimeConfig(**budget))
        with torch.no_grad():
            logits = runtime.model(prompt_ids(batch=2)).logits
        tokens = runtime.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        assert torch.equal(tokens, expected), f"{family} @ {name}: tokens differ"
        torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=0, msg=f"{family} @ {name}")
        stats = runtime.cache.stats()
        assert stats.bytes <= stats.capacity_bytes
        runtime.close()


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
