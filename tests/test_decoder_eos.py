"""The decoder stops at EOS as transformers' generate() does, although it reads whether every
row is done one step late (models/decoder.py keeps tokens on the device): rows that finish at
different steps are padded, the output ends at the step where the last row finished, and
min_new_tokens keeps EOS out until then."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from models import Runtime, RuntimeConfig

PAD = 0


def prompts(batch: int, length: int, seed: int = 5) -> torch.Tensor:
    return torch.randint(3, 120, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def models(store_factory):
    checkpoint, store = store_factory("qwen3_moe")
    reference = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    runtime = Runtime.from_store(store, RuntimeConfig(cache_fraction=1.0))
    yield reference, runtime
    runtime.close()


def free_run(reference, ids, tokens=16):
    return reference.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)[:, ids.shape[1]:]


@pytest.mark.parametrize("min_new_tokens", [0, 6])
def test_rows_finishing_at_different_steps_match_transformers(models, min_new_tokens):
    reference, runtime = models
    ids = prompts(2, 7)
    free = free_run(reference, ids)
    # EOS ids the free run emits: row 0's fourth token and row 1's ninth (unless already emitted)
    eos = sorted({int(free[0, 3]), int(free[1, 8])})
    kwargs = dict(max_new_tokens=16, min_new_tokens=min_new_tokens, do_sample=False)
    want = reference.generate(ids, eos_token_id=eos, pad_token_id=PAD, **kwargs)
    assert want.shape[1] < ids.shape[1] + 16, "the test needs a generation that stops early"
    got = runtime.decoder(max_batch=2, max_len=64).generate(ids, 16, eos_token_ids=eos, pad_token_id=PAD,
                                                            min_new_tokens=min_new_tokens)
    assert torch.equal(got, want)


def test_stop_at_the_last_allowed_step_keeps_it(models):
    reference, runtime = models
    ids = prompts(1, 5, seed=8)
    free = free_run(reference, ids, tokens=6)
    eos = [int(free[0, 5])]  # emitted exactly at the last step (if not earlier)
    want = reference.generate(ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=PAD, do_sample=False)
    got = runtime.decoder(max_batch=1, max_len=32).generate(ids, 6, eos_token_ids=eos, pad_token_id=PAD)
    assert torch.equal(got, want)
