"""Every family either decodes over the slot cache with transformers' greedy tokens, or the
decoder refuses it up front (models.decoder.unsupported_reason) so that generate() takes
transformers' own loop: never a silently different answer (the GPU uses the decoder by
default, so a family it mishandles would be wrong there)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from models import Runtime, RuntimeConfig
from models.decoder import unsupported_reason
from tiny_models import NEW_FAMILIES

NEW_TOKENS = 16


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_decoder_matches_transformers_or_refuses(family, store_factory):
    checkpoint, store = store_factory(family)
    reference = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    ids = torch.randint(3, 120, (2, 9), generator=torch.Generator().manual_seed(3))
    runtime = Runtime.from_store(store, RuntimeConfig(cache_fraction=1.0))
    if unsupported_reason(runtime.model) is not None:
        with pytest.raises(ValueError, match="cannot decode over a slot cache"):
            runtime.decoder(max_batch=2, max_len=64)
    else:
        want = reference.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        got = runtime.decoder(max_batch=2, max_len=64).generate(ids, NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                                                eos_token_ids=runtime._eos_token_ids())
        assert torch.equal(got, want), family
    runtime.close()


@pytest.mark.parametrize("min_new_tokens", [24, 0])
def test_runtime_generate_through_the_decoder_keeps_min_new_tokens(store_factory, min_new_tokens):
    """Runtime.generate on the decoder (the GPU default) bans EOS before min_new_tokens, as
    transformers' generate does: with this prompt the tiny DeepSeek-V2's third greedy token is
    its EOS (id 2), which the decoder used to emit where transformers took the runner-up."""
    checkpoint, store = store_factory("deepseek_v2")
    reference = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    ids = torch.randint(3, 120, (1, 10), generator=torch.Generator().manual_seed(7))
    kwargs = dict(max_new_tokens=24, min_new_tokens=min_new_tokens)
    want = reference.generate(ids, do_sample=False, **kwargs)
    runtime = Runtime.from_store(store, RuntimeConfig(cache_fraction=1.0, decoder="on"))
    got = runtime.generate(ids, **kwargs)
    assert torch.equal(got[:, : want.shape[1]], want)
    runtime.close()
