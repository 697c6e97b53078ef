"""What validation catches before admission, and parameters cadre refuses rather than ignores.

Each bad value is a 400 naming the parameter (never a 500, never a silent 200), and after
many of them -- more than the batch has slots -- the server still serves normally with
nothing left running.
"""

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server_live import MODEL_NAME, serve, tiny_runtime

SLOTS = 2


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    _, runtime = tiny_runtime(tmp_path_factory.mktemp("server-validation"))
    with serve(runtime, max_concurrency=SLOTS, max_queue=SLOTS) as server:
        server.wait_ready()
        yield server
    runtime.close()


def post(live, path: str, body) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return httpx.post(f"{live.url}{path}", content=body, headers={"Content-Type": "application/json"}, timeout=60)
    return httpx.post(f"{live.url}{path}", json=body, timeout=60)


def assert_400(response: httpx.Response, param: str, words: str | None = None) -> dict:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    if words is not None:
        assert words in error["message"], error
    return error


def running(live) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{live.url}/metrics").text):
        if family.name == "cadre_requests_running":
            return family.samples[0].value
    raise AssertionError("no cadre_requests_running")


CHAT = [{"role": "user", "content": "hi"}]
SEED_PAST_RANGE = 2**64  # torch.Generator.manual_seed overflows: once a 500 that leaked a batch slot


@pytest.mark.parametrize("path,body", [
    ("/generate", {"prompt": "x", "max_new_tokens": 2, "temperature": 1, "seed": SEED_PAST_RANGE}),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "x", "max_tokens": 2, "seed": SEED_PAST_RANGE}),
    ("/v1/chat/completions", {"model": MODEL_NAME, "messages": CHAT, "max_tokens": 2, "seed": SEED_PAST_RANGE}),
], ids=["generate", "completions", "chat"])
def test_seed_past_its_range_is_400_and_leaks_nothing(live, path, body):
    for _ in range(SLOTS * 4):
        assert_400(post(live, path, body), "seed", "less than or equal to 18446744073709551615")
    ok = post(live, path, {**body, "seed": SEED_PAST_RANGE - 1})
    assert ok.status_code == 200, ok.text
    assert running(live) == 0


GENERATE_CASES = [
    ("max_new_tokens true", b'{"prompt": "x", "max_new_tokens": true}', "max_new_tokens", "valid integer"),
    ("max_new_tokens 2.0", b'{"prompt": "x", "max_new_tokens": 2.0}', "max_new_tokens", "valid integer"),
    ("temperature 1e308", b'{"prompt": "x", "temperature": 1e308}', "temperature", "less than or equal"),
    ("temperature Infinity", b'{"prompt": "x", "temperature": Infinity}', "temperature", "finite"),
    ("temperature NaN", b'{"prompt": "x", "temperature": NaN}', "temperature", "finite"),
    ("top_p NaN", b'{"prompt": "x", "top_p": NaN}', "top_p", "finite"),
    ("temperature string", b'{"prompt": "x", "temperature": "0.5"}', "temperature", "valid number"),
    ("trace yes", b'{"prompt": "x", "trace": "yes"}', "trace", "valid boolean"),
    ("stream 1", b'{"prompt": "x", "stream": 1}', "stream", "valid boolean"),
]


@pytest.mark.parametrize("name,body,param,words", GENERATE_CASES, ids=[c[0] for c in GENERATE_CASES])
def test_generate_values_are_strict(live, name, body, param, words):
    assert_400(post(live, "/generate", body), param, words)


def completion(**fields) -> dict:
    return {"model": MODEL_NAME, "prompt": "hello", "max_tokens": 3, **fields}


def chat(**fields) -> dict:
    return {"model": MODEL_NAME, "messages": CHAT, "max_tokens": 3, **fields}


OPENAI_CASES = [
    ("unknown parameter", "/v1/completions", completion(frobnicate=1), "frobnicate", "unsupported parameter"),
    ("unknown chat parameter", "/v1/chat/completions", chat(service_tier="flex"), "service_tier", "unsupported"),
    ("prompt of mixed types", "/v1/completions", completion(prompt=[5, "a"]), "prompt", "list of token-id lists"),
    ("empty prompt list", "/v1/completions", completion(prompt=[]), "prompt", "empty"),
    ("max_tokens true", "/v1/completions", completion(max_tokens=True), "max_tokens", "valid integer"),
    ("echo yes", "/v1/completions", completion(echo="yes"), "echo", "valid boolean"),
    ("max_tokens 0 without echo", "/v1/completions", completion(max_tokens=0), "max_tokens", "only with echo"),
    ("logprobs past 20", "/v1/completions", completion(logprobs=21), "logprobs", None),
    ("logit_bias key", "/v1/completions", completion(logit_bias={"a": 1}), "logit_bias", "token ids"),
    ("logit_bias value", "/v1/completions", completion(logit_bias={"5": 101}), "logit_bias", "[-100, 100]"),
    ("logit_bias token", "/v1/completions", completion(logit_bias={"100000": 1}), "logit_bias", "vocabulary"),
    ("stop_token_ids token", "/v1/completions", completion(stop_token_ids=[100000]), "stop_token_ids",
     "vocabulary"),
    ("min_tokens past max", "/v1/completions", completion(min_tokens=5), "min_tokens", "exceeds"),
    ("best_of below n", "/v1/completions", completion(n=3, best_of=2), "best_of", "at least n"),
    ("best_of streamed", "/v1/completions", completion(best_of=2, stream=True), "best_of", "streamed"),
    ("n past 16", "/v1/completions", completion(n=17), "n", None),
    ("suffix", "/v1/completions", completion(suffix="the end"), "suffix", "not supported"),
    ("presence_penalty past 2", "/v1/completions", completion(presence_penalty=2.5), "presence_penalty", None),
    ("temperature past 2", "/v1/chat/completions", chat(temperature=2.5), "temperature", None),
    ("tools", "/v1/chat/completions", chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tools",
     "not supported"),
    ("tool_choice", "/v1/chat/completions", chat(tool_choice="auto"), "tool_choice", "not supported"),
    ("top_logprobs alone", "/v1/chat/completions", chat(top_logprobs=2), "top_logprobs", "logprobs: true"),
    ("message extra field", "/v1/chat/completions",
     chat(messages=[{"role": "user", "content": "hi", "tool_call_id": "x"}]), "messages.0.tool_call_id",
     "unsupported"),
    ("stream_options extra", "/v1/chat/completions", chat(stream=True, stream_options={"include_usage": True,
                                                                                       "foo": 1}),
     "stream_options.foo", "unsupported"),
]


@pytest.mark.parametrize("name,path,body,param,words", OPENAI_CASES, ids=[c[0] for c in OPENAI_CASES])
def test_openai_parameters_are_done_or_refused(live, name, path, body, param, words):
    assert_400(post(live, path, body), param, words)


def test_null_means_the_default(live):
    """OpenAI's API treats null as 'not given'; clients (guidellm: "stop": null) rely on it."""
    response = post(live, "/v1/completions", completion(stop=None, temperature=None, n=None, logprobs=None,
                                                        stream_options=None, seed=None))
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 1


def test_server_keeps_serving_after_all_of_it(live):
    response = post(live, "/v1/completions", completion(max_tokens=4, temperature=0))
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 4
    assert running(live) == 0
