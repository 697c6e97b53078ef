"""Every OpenAI parameter cadre accepts does what OpenAI (or, for extensions, vLLM) documents,
checked against transformers on the same checkpoint: its logits for logprobs, its own
`generate()` processors for penalties, logit_bias and min_tokens.

The model's EOS is set to a token its greedy continuation reaches (as in
test_server_eos.py), so ignore_eos and min_tokens have an EOS to act on. Every test runs on
both engines (transformers' continuous batching, cadre's slot-cache decoder).
"""

import json
import math

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from server_live import ENGINES, FAMILY, MODEL_NAME, byte_tokenizer, serve, tiny_runtime
from tiny_models import tiny_model

PROMPT = "hello"
OTHER = "the cat sat on"


@pytest.fixture(scope="module", params=list(ENGINES))
def case(tmp_path_factory, request):
    tokenizer = byte_tokenizer()
    ids = tokenizer(PROMPT)["input_ids"]
    greedy = tiny_model(FAMILY).generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):]
    eos = int(greedy[3])
    checkpoint, runtime = tiny_runtime(tmp_path_factory.mktemp("server-params"), eos_token_id=eos)
    reference = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    with serve(runtime, max_concurrency=4, **ENGINES[request.param]) as server:
        server.wait_ready()
        server.reference, server.tokenizer, server.eos = reference, tokenizer, eos
        server.eos_at = greedy.tolist().index(eos) + 1  # PROMPT's greedy output ends with EOS here
        yield server
    runtime.close()


def complete(live, **body) -> dict:
    response = httpx.post(f"{live.url}/v1/completions", timeout=120,
                          json={"model": MODEL_NAME, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()


def chat(live, **body) -> dict:
    response = httpx.post(f"{live.url}/v1/chat/completions", timeout=120,
                          json={"model": MODEL_NAME, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()


def stream_events(live, path: str, **body) -> list[dict]:
    events = []
    with httpx.stream("POST", f"{live.url}{path}", timeout=120,
                      json={"model": MODEL_NAME, "temperature": 0, "stream": True, **body}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    return events


def ids_of(live, text: str) -> list[int]:
    return live.tokenizer(text)["input_ids"]


def reference_generate(live, ids: list[int], n: int, **kwargs) -> list[int]:
    out = live.reference.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, **kwargs)
    return out[0, len(ids):].tolist()


def reference_logprobs(live, ids: list[int]) -> torch.Tensor:
    """[T, V]: row t = log p(. | ids[:t+1]) under the reference model."""
    with torch.no_grad():
        return torch.log_softmax(live.reference(torch.tensor([ids])).logits[0].float(), dim=-1)


def text_of(live, ids: list[int]) -> str:
    return live.tokenizer.decode(ids, skip_special_tokens=True)


# --- prompts and choices -------------------------------------------------------------------------

@pytest.mark.parametrize("shape", ["strings", "token_lists"])
def test_prompt_lists_give_one_indexed_choice_each(case, shape):
    live = case
    prompts = [PROMPT, OTHER, "a"]
    alone = [complete(live, prompt=p, max_tokens=5, ignore_eos=True)["choices"][0]["text"] for p in prompts]
    batch = prompts if shape == "strings" else [ids_of(live, p) for p in prompts]
    body = complete(live, prompt=batch, max_tokens=5, ignore_eos=True)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["text"] for c in body["choices"]] == alone
    assert body["usage"]["prompt_tokens"] == sum(len(ids_of(live, p)) for p in prompts)
    assert body["usage"]["completion_tokens"] == 15
    assert [c["usage"]["completion_tokens"] for c in body["choices"]] == [5, 5, 5]


def test_n_choices_sample_with_seed_plus_index(case):
    live = case
    many = complete(live, prompt=[PROMPT, OTHER], max_tokens=6, n=3, temperature=1.0, seed=11)
    assert [c["index"] for c in many["choices"]] == list(range(6))
    for i, prompt in enumerate([PROMPT, OTHER]):
        for j in range(3):
            alone = complete(live, prompt=prompt, max_tokens=6, temperature=1.0, seed=11 + j)
            assert many["choices"][i * 3 + j]["text"] == alone["choices"][0]["text"]
    greedy = chat(live, messages=[{"role": "user", "content": PROMPT}], max_tokens=4, n=2)
    assert greedy["choices"][0]["message"] == greedy["choices"][1]["message"]
    assert greedy["usage"]["completion_tokens"] == 8


def test_best_of_returns_the_highest_mean_logprob(case):
    live = case
    best = complete(live, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=5, best_of=3)
    candidates = [complete(live, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=5 + j, logprobs=0)
                  ["choices"][0] for j in range(3)]
    scores = [sum(c["logprobs"]["token_logprobs"]) / len(c["logprobs"]["token_logprobs"]) for c in candidates]
    assert best["choices"][0]["text"] == candidates[scores.index(max(scores))]["text"]
    assert "logprobs" not in best["choices"][0] or best["choices"][0]["logprobs"] is None
    assert best["usage"]["completion_tokens"] == 18  # best_of completions are generated (and billed)


# --- logprobs ----------------------------------------------------------------------------------------

def test_echo_scores_the_prompt_like_transformers(case):
    live = case
    ids = ids_of(live, OTHER)
    reference = reference_logprobs(live, ids)
    for max_tokens in (0, 1):
        body = complete(live, prompt=[ids], max_tokens=max_tokens, echo=True, logprobs=2)
        choice = body["choices"][0]
        logprobs = choice["logprobs"]
        assert choice["text"].startswith(OTHER) and len(logprobs["tokens"]) == len(ids) + max_tokens
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        for t in range(1, len(ids)):
            assert abs(logprobs["token_logprobs"][t] - float(reference[t - 1, ids[t]])) < 1e-4
            top = reference[t - 1].topk(2)
            expected = {live.tokenizer.decode([i]): v for i, v in zip(top.indices.tolist(), top.values.tolist())}
            assert set(expected) <= set(logprobs["top_logprobs"][t])
        assert logprobs["text_offset"][:len(ids)] == [len(text_of(live, ids[:i])) for i in range(len(ids))]
        assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": max_tokens,
                                 "total_tokens": len(ids) + max_tokens}
    generated = choice["logprobs"]["token_logprobs"][-1]
    assert abs(generated - float(reference[-1].max())) < 1e-4  # greedy: the most likely token


def test_generation_logprobs_are_the_models(case):
    live = case
    ids = ids_of(live, OTHER)
    body = complete(live, prompt=ids, max_tokens=6, logprobs=3)
    choice = body["choices"][0]
    tokens = reference_generate(live, ids, 6)
    assert choice["text"] == text_of(live, tokens)
    reference = reference_logprobs(live, ids + tokens)
    lp = choice["logprobs"]
    for i, token in enumerate(tokens):
        row = reference[len(ids) - 1 + i]
        assert abs(lp["token_logprobs"][i] - float(row[token])) < 1e-4
        assert len(lp["top_logprobs"][i]) == 3  # greedy: the chosen token is one of the top 3
    assert lp["text_offset"] == [len(text_of(live, tokens[:i])) for i in range(len(tokens))]
    zero = complete(live, prompt=ids, max_tokens=3, logprobs=0)["choices"][0]["logprobs"]
    assert [list(d) for d in zero["top_logprobs"]] == [[t] for t in zero["tokens"]]


def test_chat_logprobs_shape_and_values(case):
    live = case
    messages = [{"role": "user", "content": PROMPT}]
    body = chat(live, messages=messages, max_tokens=4, logprobs=True, top_logprobs=2)
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for item in content:
        assert set(item) == {"token", "logprob", "bytes", "top_logprobs"}
        assert bytes(item["bytes"]).decode() == item["token"]
        assert len(item["top_logprobs"]) == 2 and item["logprob"] == pytest.approx(item["top_logprobs"][0]["logprob"])
    assert "".join(item["token"] for item in content) == body["choices"][0]["message"]["content"]


# --- penalties, bias, lengths: transformers' generate() as the reference ----------------------------

def test_repetition_penalty_matches_transformers(case):
    live = case
    ids = ids_of(live, OTHER)
    expected = reference_generate(live, ids, 12, repetition_penalty=1.8)
    assert expected != reference_generate(live, ids, 12)  # the penalty changes this continuation
    body = complete(live, prompt=ids, max_tokens=12, repetition_penalty=1.8)
    assert body["choices"][0]["text"] == text_of(live, expected)


def test_logit_bias_matches_transformers_sequence_bias(case):
    live = case
    ids = ids_of(live, OTHER)
    plain = reference_generate(live, ids, 8)
    favoured = ids_of(live, "z")[0]
    expected = reference_generate(live, ids, 8, sequence_bias={(favoured,): 4.0})
    assert expected != plain
    body = complete(live, prompt=ids, max_tokens=8, logit_bias={str(favoured): 4.0})
    assert body["choices"][0]["text"] == text_of(live, expected)
    banned = plain[0]
    expected = reference_generate(live, ids, 8, sequence_bias={(banned,): -100.0})
    body = complete(live, prompt=ids, max_tokens=8, logit_bias={str(banned): -100})
    assert body["choices"][0]["text"] == text_of(live, expected) and banned not in expected


def test_presence_and_frequency_penalties_follow_openai(case):
    """logit - frequency * count - presence * (count > 0), over the output so far."""
    live = case
    ids = ids_of(live, OTHER)
    frequency, presence = 1.2, 0.7
    out: list[int] = []
    with torch.no_grad():
        while len(out) < 10 and live.eos not in out:
            row = live.reference(torch.tensor([ids + out])).logits[0, -1].float()
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=row.numel()).float()
            row = row - frequency * counts - presence * (counts > 0).float()
            out.append(int(row.argmax()))
    body = complete(live, prompt=ids, max_tokens=10, frequency_penalty=frequency, presence_penalty=presence)
    assert body["choices"][0]["text"] == text_of(live, out)


def test_ignore_eos_gives_exactly_max_tokens(case):
    live = case
    ids = ids_of(live, PROMPT)
    stops = complete(live, prompt=ids, max_tokens=8)["choices"][0]
    assert stops["finish_reason"] == "stop" and stops["usage"]["completion_tokens"] == live.eos_at
    full = complete(live, prompt=ids, max_tokens=8, ignore_eos=True, logprobs=0)["choices"][0]
    assert full["finish_reason"] == "length" and full["usage"]["completion_tokens"] == 8
    events = stream_events(live, "/v1/completions", prompt=ids, max_tokens=8, ignore_eos=True,
                           stream_options={"include_usage": True})
    assert events[-1]["usage"]["completion_tokens"] == 8


def test_min_tokens_matches_transformers_min_new_tokens(case):
    live = case
    ids = ids_of(live, PROMPT)
    expected = reference_generate(live, ids, 12, min_new_tokens=7)
    assert live.eos not in expected[:7]
    body = complete(live, prompt=ids, max_tokens=12, min_tokens=7)["choices"][0]
    assert body["usage"]["completion_tokens"] == len(expected) and body["text"] == text_of(live, expected)


def test_stop_token_ids_end_the_output(case):
    live = case
    ids = ids_of(live, OTHER)
    plain = reference_generate(live, ids, 10)
    stop = plain[4]
    body = complete(live, prompt=ids, max_tokens=10, stop_token_ids=[stop], ignore_eos=True)["choices"][0]
    assert body["finish_reason"] == "stop" and body["usage"]["completion_tokens"] == plain.index(stop) + 1


# --- streaming -------------------------------------------------------------------------------------

def test_streamed_choices_join_to_the_unstreamed_ones(case):
    live = case
    body = dict(prompt=[PROMPT, OTHER], max_tokens=6, n=2, temperature=1.0, seed=3, logprobs=1)
    whole = complete(live, **body)
    events = stream_events(live, "/v1/completions", stream_options={"include_usage": True,
                                                                     "continuous_usage_stats": True}, **body)
    texts, tokens = {}, {}
    for event in events:
        for choice in event["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
            tokens.setdefault(choice["index"], []).extend(choice["logprobs"]["tokens"])
            assert event["usage"]["completion_tokens"] <= 6
    assert texts == {c["index"]: c["text"] for c in whole["choices"]}
    assert tokens == {c["index"]: c["logprobs"]["tokens"] for c in whole["choices"]}
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]


def test_streamed_chat_logprobs_and_echo(case):
    live = case
    events = stream_events(live, "/v1/chat/completions", messages=[{"role": "user", "content": PROMPT}],
                           max_tokens=4, logprobs=True, top_logprobs=1, n=2)
    per_choice = {}
    for event in events:
        for choice in event["choices"]:
            per_choice.setdefault(choice["index"], []).extend((choice["logprobs"] or {}).get("content") or [])
    assert sorted(per_choice) == [0, 1] and all(len(v) == 4 for v in per_choice.values())
    echoed = stream_events(live, "/v1/completions", prompt=OTHER, max_tokens=3, echo=True, logprobs=0)
    first = echoed[0]["choices"][0]
    assert first["text"] == OTHER and first["logprobs"]["token_logprobs"][0] is None
    assert math.isfinite(first["logprobs"]["token_logprobs"][1])
