"""POST /generate against a live server: text, traces, streaming, sampling, stop strings.

Traces are checked against transformers itself: the reference model's own gates, run on
each request's own sequence, must have chosen the experts and weights the trace shows,
also when requests were batched together (the trace maps packed rows back to requests).
"""

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from server_live import ENGINES, serve, tiny_runtime

PROMPTS = ["hello world", "the cat sat on", "a", "it is a truth universally acknowledged"]
CACHE_OUTCOMES = {"hit", "miss", "prefetched"}


@pytest.fixture(scope="module", params=list(ENGINES))
def live(tmp_path_factory, request):
    """Each behaviour below holds with either engine (server/engine.py, server/decode_engine.py)."""
    checkpoint, runtime = tiny_runtime(tmp_path_factory.mktemp("server-generate"))
    with serve(runtime, **ENGINES[request.param]) as server:
        server.wait_ready()
        server.checkpoint, server.runtime = checkpoint, runtime
        yield server
    runtime.close()


@pytest.fixture(scope="module")
def reference(live):
    return AutoModelForCausalLM.from_pretrained(live.checkpoint).eval()


def generate(live, **body) -> dict:
    response = httpx.post(f"{live.url}/generate", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def concurrently(fn, items):
    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(fn, items))


def reference_routing(reference, ids: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (indices [T,k], weights [T,k])} as the reference model's own gates chose them."""
    chosen, hooks = {}, []
    for layer, block in enumerate(reference.model.layers):
        def keep(module, args, output, layer=layer):
            _, weights, indices = output
            chosen[layer] = (indices, weights)
        hooks.append(block.mlp.gate.register_forward_hook(keep))
    with torch.no_grad():
        reference(torch.tensor([ids]))
    for hook in hooks:
        hook.remove()
    return chosen


def test_generate_without_trace(live):
    body = generate(live, prompt="hello world", max_new_tokens=8)
    assert set(body) == {"text", "token_ids", "finish_reason", "usage"}
    assert body["finish_reason"] == "length" and len(body["token_ids"]) == 8
    assert body["usage"] == {"prompt_tokens": len(live.runtime.tokenizer("hello world")["input_ids"]),
                             "completion_tokens": 8}
    assert body["text"] == live.runtime.tokenizer.decode(body["token_ids"], skip_special_tokens=True)


def test_greedy_output_equals_transformers_alone_and_batched(live, reference):
    tokenizer = live.runtime.tokenizer
    expected = {}
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        out = reference.generate(ids, max_new_tokens=12, do_sample=False)
        expected[prompt] = out[0, ids.shape[1]:].tolist()
    assert generate(live, prompt=PROMPTS[0], max_new_tokens=12)["token_ids"] == expected[PROMPTS[0]]
    batched = concurrently(lambda p: generate(live, prompt=p, max_new_tokens=12), PROMPTS)
    assert [b["token_ids"] for b in batched] == [expected[p] for p in PROMPTS]


def check_trace(body: dict, store, reference, prompt_ids: list[int]) -> None:
    steps, summary = body["trace"]["steps"], body["trace"]["summary"]
    assert [s["token_id"] for s in steps] == body["token_ids"]  # one step per generated token
    assert "".join(s["text"] for s in steps) == body["text"]
    routing = reference_routing(reference, prompt_ids + body["token_ids"][:-1])
    outcomes = {"hit": 0, "miss": 0, "prefetched": 0}
    for i, step in enumerate(steps):
        assert [entry["layer"] for entry in step["layers"]] == store.moe_layers  # one entry per MoE layer
        row = len(prompt_ids) - 1 + i  # the position whose logits chose this token
        for entry in step["layers"]:
            experts, weights, cache = entry["experts"], entry["weights"], entry["cache"]
            assert len(experts) == len(set(experts)) == store.top_k
            assert set(experts) <= set(store.experts_present(entry["layer"]))
            assert set(cache) <= CACHE_OUTCOMES and len(cache) == len(experts)
            assert sum(weights) == pytest.approx(1.0, abs=1e-5)  # qwen3 with norm_topk_prob renormalises
            ref_indices, ref_weights = routing[entry["layer"]]
            assert experts == ref_indices[row].tolist()
            assert weights == pytest.approx(ref_weights[row].tolist(), abs=1e-5)
            for outcome in cache:
                outcomes[outcome] += 1
    assert (summary["hits"], summary["misses"], summary["prefetched"]) == \
           (outcomes["hit"], outcomes["miss"], outcomes["prefetched"])
    pathways = summary["pathways"]
    assert pathways["tokens"] == len(steps) and 1 <= pathways["distinct"] <= len(steps)
    assert sum(p["count"] for p in pathways["most_common"]) <= len(steps)
    assert all(len(p["experts"]) == len(store.moe_layers) for p in pathways["most_common"])
    assert summary["loads"] >= 0 and summary["load_seconds"] >= 0 and summary["regret"] == 0


def test_trace_matches_the_models_own_routing_for_every_token_and_layer(live, reference):
    tokenizer, store = live.runtime.tokenizer, live.runtime.store
    body = generate(live, prompt=PROMPTS[1], max_new_tokens=10, trace=True)
    check_trace(body, store, reference, tokenizer(PROMPTS[1])["input_ids"])
    # Batched: four requests share each forward; each trace must still be its own.
    bodies = concurrently(lambda p: generate(live, prompt=p, max_new_tokens=10, trace=True), PROMPTS)
    for prompt, body in zip(PROMPTS, bodies):
        check_trace(body, store, reference, tokenizer(prompt)["input_ids"])


def test_trace_query_parameter(live):
    response = httpx.post(f"{live.url}/generate?trace=true", json={"prompt": "hi", "max_new_tokens": 3})
    assert response.status_code == 200 and len(response.json()["trace"]["steps"]) == 3


def test_seeded_sampling_is_reproducible_alone_and_batched(live):
    request = dict(prompt="the cat", max_new_tokens=16, temperature=0.9, top_p=0.95, top_k=40, seed=1234)
    alone = generate(live, **request)["token_ids"]
    others = [dict(prompt=p, max_new_tokens=16, temperature=1.0, seed=i) for i, p in enumerate(PROMPTS)]
    batched = concurrently(lambda r: generate(live, **r), [request, *others])
    assert batched[0]["token_ids"] == alone
    greedy = generate(live, prompt="the cat", max_new_tokens=16)["token_ids"]
    seeds = {tuple(generate(live, **{**request, "seed": s})["token_ids"]) for s in range(4)}
    assert len(seeds | {tuple(greedy)}) > 1, "temperature 0.9 with four seeds never left the greedy path"


def test_stop_string_ends_the_text_before_it(live):
    full = generate(live, prompt="hello", max_new_tokens=24)["text"]
    stop = full[6:8]
    cut = full.find(stop)
    assert cut > 0, f"pick another slice of {full!r}"
    body = generate(live, prompt="hello", max_new_tokens=24, stop=[stop, "\x00never"])
    assert body["finish_reason"] == "stop" and body["text"] == full[:cut]
    assert len(body["token_ids"]) < 24


def read_sse(response) -> list[tuple[str, dict]]:
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[len("data: "):])))
    return events


def test_streaming_sends_one_event_per_token_then_the_summary(live):
    request = {"prompt": "once upon", "max_new_tokens": 7, "stream": True, "trace": True}
    with httpx.stream("POST", f"{live.url}/generate", json=request, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = read_sse(response)
    tokens, (final_name, final) = events[:-1], events[-1]
    assert [name for name, _ in tokens] == ["token"] * 7 and final_name == "final"
    assert [t["index"] for _, t in tokens] == list(range(7))
    assert [t["token_id"] for _, t in tokens] == final["token_ids"]
    assert "".join(t["text"] for _, t in tokens) == final["text"]
    assert all(len(t["layers"]) == len(live.runtime.store.moe_layers) for _, t in tokens)
    hits = sum(entry["cache"].count("hit") for _, t in tokens for entry in t["layers"])
    assert final["trace"]["summary"]["hits"] == hits and "steps" not in final["trace"]
    assert final["finish_reason"] == "length" and final["usage"]["completion_tokens"] == 7
    # the streamed tokens are the non-streamed ones
    assert final["token_ids"] == generate(live, prompt="once upon", max_new_tokens=7)["token_ids"]
