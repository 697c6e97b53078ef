"""transformers renamed the forward's KV-cache keyword and output field from past_key_values to
cache (the old names warn, and go in 5.40). cadre's own loops (the decoder, bench decode's
compiled reference, bench policies and quality, the KV footprint probe) ask
models.loading.cache_keyword / cache_of instead of naming either, so they keep working on both
sides of the rename and log no deprecation on every token."""

import logging
import warnings

import torch

from models.loading import cache_keyword, cache_of
from tiny_models import tiny_model


def test_a_cached_forward_through_the_helpers_matches_one_full_forward_without_a_deprecation(caplog):
    model = tiny_model("qwen3_moe").eval()
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        cache, steps = None, []
        for t in range(ids.shape[1]):
            out = model(input_ids=ids[:, t:t + 1], use_cache=True, **{cache_keyword(model): cache})
            cache = cache_of(out)
            steps.append(out.logits[:, -1])
        whole = model(input_ids=ids).logits[0]
    torch.testing.assert_close(torch.cat(steps), whole, rtol=1e-4, atol=1e-5)
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [line for line in said if "deprecated" in line], said


def test_a_forward_that_predates_the_rename_gets_the_old_keyword():
    class Before(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return {"logits": input_ids, "past_key_values": "the cache"}

    assert cache_keyword(Before()) == "past_key_values"
    assert cache_of(Before()(input_ids=1)) == "the cache"
