"""RuntimeConfig(compile_step=True): at a budget holding every expert, the decoder's one-token
step is torch.compiled (prefill stays eager) and still gives transformers' greedy tokens
(float32; a near-tie may part, as vLLM's comparison allows); at a budget that streams
experts it is left eager, logged."""

import logging

import torch
from transformers import AutoModelForCausalLM

from greedy_compare import assert_greedy_matches
from models import Runtime, RuntimeConfig

NEW_TOKENS = 12


def decode_with_routing(store, ids, compile_step: bool):
    runtime = Runtime.from_store(store, RuntimeConfig(cache_fraction=1.0, compile_step=compile_step))
    decoder = runtime.decoder(max_batch=2, max_len=64)
    events = []
    runtime.add_routing_listener(lambda e: events.append((e.layer, e.experts.tolist(), e.outcomes)))
    before = runtime.cache.stats()
    got = decoder.generate(ids, NEW_TOKENS)
    after = runtime.cache.stats()
    compiled = decoder._step_logits is not decoder._logits
    runtime.close()
    return got, (events, after.queries - before.queries, after.hits - before.hits), compiled


def test_compiled_step_matches_transformers_and_reports_routing(store_factory):
    checkpoint, store = store_factory("qwen3_moe")
    reference = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    ids = torch.randint(3, 120, (2, 9), generator=torch.Generator().manual_seed(3))
    want = reference.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    got, events, compiled = decode_with_routing(store, ids, compile_step=True)
    assert compiled
    _, queries, hits = events
    assert hits == queries > 0  # every lookup of a complete layer is a hit, counted from the route buffers
    assert_greedy_matches(reference, got, want, prompt_len=ids.shape[1])
    eager_got, eager_events, _ = decode_with_routing(store, ids, compile_step=False)
    if torch.equal(got, eager_got):  # the same tokens were routed: the listeners heard and counted the same
        assert events == eager_events


def test_partial_budget_stays_eager(store_factory, caplog):
    _, store = store_factory("qwen3_moe")
    runtime = Runtime.from_store(store, RuntimeConfig(cache_fraction=0.5, compile_step=True))
    with caplog.at_level(logging.WARNING, logger="cadre.decoder"):
        decoder = runtime.decoder(max_batch=1, max_len=64)
    assert decoder._step_logits == decoder._logits
    assert "not compiled" in caplog.text
    runtime.close()
