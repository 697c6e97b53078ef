"""Prompts prefilled together (Decoder.prefill_rows: one forward per chunk for all of them,
right-aligned, shorter ones padded on the left) give each prompt transformers' greedy tokens,
at scattered rows and across chunks; their padding routes to no expert; and under a small
budget they load fewer experts than the same prompts prefilled one at a time."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from models import Runtime, RuntimeConfig, decoder as decoder_module

NEW_TOKENS = 6
LENGTHS = {3: 11, 0: 4, 5: 7}  # row -> prompt length: scattered rows, unequal lengths


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(3, 120, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


PROMPTS = {row: prompt(length, seed=row) for row, length in LENGTHS.items()}


def continue_greedy(decoder, first: dict[int, int]) -> dict[int, list[int]]:
    """NEW_TOKENS greedy tokens per row, the first given, the rest decoded together."""
    got = {row: [token] for row, token in first.items()}
    while len(next(iter(got.values()))) < NEW_TOKENS:
        logits = decoder.decode({row: tokens[-1] for row, tokens in got.items()})
        for row, row_logits in zip(sorted(got), logits):
            got[row].append(row_logits.argmax().item())
    return got


@pytest.mark.parametrize("chunk", [512, 4])  # 4: every prompt spans chunks, each forward pads some rows
def test_prompts_prefilled_together_decode_as_transformers(store_factory, monkeypatch, chunk):
    monkeypatch.setattr(decoder_module, "PREFILL_CHUNK", chunk)
    checkpoint, store = store_factory("qwen3_moe")
    reference = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    want = {row: reference.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                    do_sample=False)[0, len(ids):].tolist() for row, ids in PROMPTS.items()}
    runtime = Runtime.from_store(store, RuntimeConfig(cache_fraction=0.5))
    decoder = runtime.decoder(max_batch=8, max_len=64)
    spans = []
    logits = decoder.prefill_rows(PROMPTS, before_forward=lambda s, width: spans.append((s, width)))
    assert logits.shape[0] == len(PROMPTS)
    got = continue_greedy(decoder, {row: l.argmax().item() for row, l in zip(PROMPTS, logits)})
    assert got == want
    for (row, ids), together in zip(PROMPTS.items(), logits):  # the same logits as the prompt alone
        alone = runtime.decoder(max_batch=8, max_len=64).prefill(row, ids)
        torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    forwards = -(-max(LENGTHS.values()) // chunk)
    assert len(spans) == forwards and all(end == LENGTHS[row] for row, _, end in spans[-1][0])
    runtime.close()


def test_padding_routes_to_no_expert(store_factory):
    _, store = store_factory("qwen3_moe")
    runtime = Runtime.from_store(store, RuntimeConfig(cache_fraction=0.5))
    events = []
    runtime.add_routing_listener(events.append)
    runtime.decoder(max_batch=8, max_len=64).prefill_rows(PROMPTS)
    top_k, width = runtime.store.top_k, max(LENGTHS.values())
    for event in events:  # one forward: [rows * width, K], the padding UNUSED
        assert event.experts.shape == (len(PROMPTS) * width, top_k)
        assert int((event.experts >= 0).sum()) == sum(LENGTHS.values()) * top_k
    runtime.close()


def test_prompts_prefilled_together_load_fewer_experts(store_factory):
    _, store = store_factory("qwen3_moe")
    loads = {}
    for way in ("one at a time", "together"):
        runtime = Runtime.from_store(store, RuntimeConfig(cache_fraction=0.5))
        decoder = runtime.decoder(max_batch=8, max_len=64)
        if way == "together":
            decoder.prefill_rows(PROMPTS)
        else:
            for row, ids in PROMPTS.items():
                decoder.prefill(row, ids)
        loads[way] = sum(runtime.cache.stats().loads.values())
        runtime.close()
    assert loads["together"] < loads["one at a time"], loads
