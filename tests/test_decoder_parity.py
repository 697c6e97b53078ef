"""The slot-cache decoder gives transformers' greedy tokens: batched, rows of different
lengths decoding together, at every budget (eager here; the CUDA-graph path is in
tests/test_decoder_gpu.py)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from models import Runtime, RuntimeConfig
from models.runtime import expert_bytes
from tiny_models import FIRST_SIX as FAMILIES  # the slot-cache decoder holds full attention only (models/decoder.py)

NEW_TOKENS = 24


def prompts(batch: int, length: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, 120, (batch, length), generator=torch.Generator().manual_seed(seed))


def one_token_budget(store_path) -> dict:
    from extractor.store import ExpertStore

    store = ExpertStore.open(store_path)
    return {"cache_bytes": store.top_k * expert_bytes(store, store.dtype)}


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_greedy_decode_matches_transformers(family, store_factory):
    checkpoint, store = store_factory(family)
    reference = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    ids = prompts(batch=2, length=9)
    want = reference.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    for budget in ({"cache_fraction": 1.0}, {"cache_fraction": 0.5}, one_token_budget(store)):
        runtime = Runtime.from_store(store, RuntimeConfig(**budget))
        got = runtime.decoder(max_batch=2, max_len=64).generate(ids, NEW_TOKENS)
        assert torch.equal(got, want), f"{family} @ {budget}"
        runtime.close()


def test_rows_of_different_lengths_decode_together(store_factory):
    checkpoint, store = store_factory("qwen3_moe")
    reference = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    short, long = prompts(1, 4, seed=1), prompts(1, 11, seed=2)
    want = [reference.generate(p, max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, p.shape[1]:].tolist()
            for p in (short, long)]
    runtime = Runtime.from_store(store, RuntimeConfig(cache_fraction=0.5))
    decoder = runtime.decoder(max_batch=4, max_len=64)
    # row 2 joins late: rows 0 and 2 are at different positions, row 1 stays empty (padding)
    first = decoder.prefill(0, short[0].tolist()).argmax().item()
    got = {0: [first]}
    got[0].append(decoder.decode({0: first})[0].argmax().item())
    got[2] = [decoder.prefill(2, long[0].tolist()).argmax().item()]
    while len(got[2]) < 8:
        logits = decoder.decode({0: got[0][-1], 2: got[2][-1]}) if len(got[0]) < 8 else \
            decoder.decode({2: got[2][-1]})
        for row, row_logits in zip([r for r in (0, 2) if len(got[r]) < 8 or r == 2], logits):
            got[row].append(row_logits.argmax().item())
    assert got[0][:8] == want[0]
    assert got[2][:8] == want[1]
    runtime.close()


def test_routing_listeners_see_every_layer_of_every_step(store_factory):
    _, store = store_factory("qwen3_moe")
    runtime = Runtime.from_store(store, RuntimeConfig(cache_fraction=0.5))
    events = []
    runtime.add_routing_listener(events.append)
    runtime.decoder(max_batch=1, max_len=32).generate(prompts(1, 5), 3)
    moe_layers = len(runtime.store.moe_layers)
    assert len(events) == 3 * moe_layers  # a prefill and two decode steps
    assert all(e.experts.shape[-1] == runtime.store.top_k for e in events)
    assert all(set(e.outcomes.values()) <= {"hit", "miss", "prefetched"} for e in events)
    runtime.close()


def test_a_full_row_is_refused(store_factory):
    _, store = store_factory("qwen3_moe")
    runtime = Runtime.from_store(store, RuntimeConfig())
    decoder = runtime.decoder(max_batch=1, max_len=8)
    with pytest.raises(ValueError, match="holds 1 to 7"):
        decoder.prefill(0, list(range(3, 11)))
    token = decoder.prefill(0, list(range(3, 9))).argmax().item()  # positions 0-5
    for _ in range(2):  # positions 6 and 7: the row is full
        token = decoder.decode({0: token})[0].argmax().item()
    with pytest.raises(ValueError, match="full"):
        decoder.decode({0: token})
    runtime.close()


def test_runtime_generate_through_the_decoder_stops_at_eos_as_transformers_does(store_factory):
    checkpoint, store = store_factory("qwen3_moe")
    reference = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    ids = prompts(batch=2, length=6, seed=5)
    free_run = reference.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    eos = int(free_run[0, 6 + 3])  # a token row 0 emits early: generation must stop there
    reference.generation_config.eos_token_id = eos
    reference.generation_config.pad_token_id = 0
    want = reference.generate(ids, max_new_tokens=12, do_sample=False)
    runtime = Runtime.from_store(store, RuntimeConfig(cache_fraction=0.5, decoder="on"))
    runtime.model.generation_config.eos_token_id = eos
    runtime.model.generation_config.pad_token_id = 0
    got = runtime.generate(ids, max_new_tokens=12)
    assert torch.equal(got, want)
    # min_new_tokens bans the EOS until then, as transformers' processor does (the run differs from free_run)
    banned = reference.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert torch.equal(runtime.generate(ids, max_new_tokens=12, min_new_tokens=12), banned)
    runtime.close()

