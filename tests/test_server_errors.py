"""Bad input, bad auth, oversize bodies and overload: each a 4xx/503 in OpenAI's error shape,
never a 500, and the server keeps serving afterwards."""

import threading

import httpx
import pytest

from server_live import MODEL_NAME, serve, tiny_runtime

KEY = "sekret"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY = 4096


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    _, runtime = tiny_runtime(tmp_path_factory.mktemp("server-errors"))
    with serve(runtime, api_key=KEY, max_concurrency=1, max_queue=1, max_body_bytes=MAX_BODY) as server:
        server.wait_ready()
        yield server
    runtime.close()


def post(live, path: str, headers=AUTH, **kwargs) -> httpx.Response:
    return httpx.post(f"{live.url}{path}", headers=headers, timeout=60, **kwargs)


def assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and len(error["message"]) > 5
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


BAD_GENERATE = [
    ("malformed json", b'{"prompt": "hi", ', None, "json_invalid"),
    ("not an object", b'["hi"]', None, None),
    ("prompt not a string", b'{"prompt": 3}', "prompt", None),
    ("max_new_tokens not a number", b'{"prompt": "hi", "max_new_tokens": "ten"}', "max_new_tokens", None),
    ("negative max_new_tokens", b'{"prompt": "hi", "max_new_tokens": -5}', "max_new_tokens", None),
    ("zero max_new_tokens", b'{"prompt": "hi", "max_new_tokens": 0}', "max_new_tokens", None),
    ("huge max_new_tokens", b'{"prompt": "hi", "max_new_tokens": 1000000000}', "max_new_tokens",
     "context_length_exceeded"),
    ("empty prompt", b'{"prompt": ""}', "prompt", None),
    ("negative temperature", b'{"prompt": "hi", "temperature": -1}', "temperature", None),
    ("top_p zero", b'{"prompt": "hi", "top_p": 0}', "top_p", None),
    ("stop not strings", b'{"prompt": "hi", "stop": 5}', None, None),
    ("too many stops", b'{"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}', "stop", None),
    ("unknown field", b'{"prompt": "hi", "max_tokens": 5}', "max_tokens", None),
]


@pytest.mark.parametrize("name,body,param,code", BAD_GENERATE, ids=[case[0] for case in BAD_GENERATE])
def test_bad_generate_bodies_are_400(live, name, body, param, code):
    response = post(live, "/generate", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert_error(response, 400, param, code)


def test_unknown_model_is_404(live):
    assert_error(post(live, "/generate", json={"prompt": "hi", "model": "gpt-4"}), 404, "model", "model_not_found")
    response = post(live, "/v1/chat/completions",
                    json={"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]})
    assert_error(response, 404, "model", "model_not_found")


def test_over_long_prompt_names_the_context_window(live):
    error = assert_error(post(live, "/generate", json={"prompt": "x y " * 150, "max_new_tokens": 4}),
                         400, "max_new_tokens", "context_length_exceeded")
    assert "256" in error["message"]
    error = assert_error(post(live, "/v1/chat/completions",
                              json={"model": MODEL_NAME, "messages": [{"role": "user", "content": "x y " * 150}]}),
                         400, "messages", "context_length_exceeded")
    assert "256" in error["message"]


def test_bad_openai_bodies_are_400(live):
    cases = [
        ({"model": MODEL_NAME, "prompt": [5, 100000]}, "/v1/completions", "prompt"),
        ({"model": MODEL_NAME, "prompt": "hi", "suffix": "end"}, "/v1/completions", "suffix"),
        ({"model": MODEL_NAME, "prompt": "hi", "presence_penalty": 2.5}, "/v1/completions", "presence_penalty"),
        ({"model": MODEL_NAME, "messages": []}, "/v1/chat/completions", "messages"),
        ({"model": MODEL_NAME, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "/v1/chat/completions", "messages.0.content"),
        ({"model": MODEL_NAME, "messages": [{"role": "wizard", "content": "hi"}]}, "/v1/chat/completions", None),
        ({"prompt": "hi"}, "/v1/completions", "model"),
    ]
    for body, path, param in cases:
        assert_error(post(live, path, json=body), 400, param)


def test_bad_auth_is_401_and_probes_stay_open(live):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = post(live, "/generate", json={"prompt": "hi"}, headers=headers)
        assert_error(response, 401, code="invalid_api_key")
        assert response.headers["WWW-Authenticate"] == "Bearer"
    assert_error(httpx.get(f"{live.url}/v1/models"), 401)
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(f"{live.url}{path}").status_code == 200


def test_oversize_bodies_are_413(live):
    big = {"prompt": "x" * (MAX_BODY + 10)}
    assert_error(post(live, "/generate", json=big), 413, code="request_too_large")

    def chunks():  # no Content-Length: the limit must hold on what actually arrives
        yield b'{"prompt": "'
        for _ in range(MAX_BODY // 100 + 2):
            yield b"x" * 100
        yield b'"}'

    response = post(live, "/generate", content=chunks(), headers={**AUTH, "Content-Type": "application/json"})
    assert_error(response, 413, code="request_too_large")


def test_wrong_method_and_path_keep_the_shape(live):
    assert_error(httpx.get(f"{live.url}/generate", headers=AUTH), 405)
    assert_error(httpx.get(f"{live.url}/nope", headers=AUTH), 404)


def test_overload_is_503_with_retry_after_and_counted(live):
    """One running, one waiting, the third is refused; the first two still complete."""
    running_started = threading.Event()
    results = {}

    def long_stream():
        with httpx.stream("POST", f"{live.url}/generate", headers=AUTH, timeout=60,
                          json={"prompt": "hi", "max_new_tokens": 60, "stream": True}) as response:
            for line in response.iter_lines():
                running_started.set()
            results["running"] = response.status_code

    def queued():
        results["queued"] = post(live, "/generate", json={"prompt": "hi", "max_new_tokens": 2}).status_code

    first = threading.Thread(target=long_stream)
    first.start()
    assert running_started.wait(30)
    second = threading.Thread(target=queued)
    second.start()
    while "cadre_requests_waiting 1.0" not in httpx.get(f"{live.url}/metrics").text:
        assert second.is_alive()
    refused = post(live, "/generate", json={"prompt": "hi", "max_new_tokens": 2})
    assert_error(refused, 503, code="queue_full")
    assert int(refused.headers["Retry-After"]) >= 1
    first.join(60)
    second.join(60)
    assert results == {"running": 200, "queued": 200}
    metrics = httpx.get(f"{live.url}/metrics").text
    assert 'cadre_request_rejections_total{reason="queue_full"} 1.0' in metrics


def test_server_still_serves_after_all_that(live):
    response = post(live, "/generate", json={"prompt": "still here", "max_new_tokens": 3})
    assert response.status_code == 200 and len(response.json()["token_ids"]) == 3
    assert httpx.get(f"{live.url}/health").json() == {"status": "ok"}
