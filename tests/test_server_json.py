"""Chat's response_format: json_schema and json_object outputs are JSON that matches (outlines-core
masks every token that would break the grammar, then only EOS remains); a schema it cannot
compile, or a combination that cannot end (min_tokens, ignore_eos), is a 400."""

import json

import httpx
import pytest

from server_live import ENGINES, MODEL_NAME, byte_tokenizer, serve, tiny_runtime

SCHEMA = {"type": "object", "properties": {
    "colour": {"type": "string", "enum": ["red", "green", "blue"]},
    "ok": {"type": "boolean"},
    "size": {"type": "string", "enum": ["S", "M", "L"]},
}, "required": ["colour", "ok", "size"], "additionalProperties": False}
MESSAGES = [{"role": "user", "content": "describe the cat"}]


@pytest.fixture(scope="module")
def shared_indexes():
    """outlines-core's Index, built once per (regex, vocabulary) for the module's three servers: they
    serve the same tokenizer, and json_object's index takes ~5 s to build (the server keeps it per
    model; the engines differ only in what walks it). The first server builds each one itself."""
    import outlines_core

    build, built = outlines_core.Index, []

    def index(regex, vocabulary):
        for key, value in built:
            if key == (regex, vocabulary):
                return value
        value = build(regex, vocabulary)
        built.append(((regex, vocabulary), value))
        return value

    outlines_core.Index = index
    yield built
    outlines_core.Index = build


@pytest.fixture(scope="module", params=list(ENGINES))
def live(tmp_path_factory, request, shared_indexes):
    _, runtime = tiny_runtime(tmp_path_factory.mktemp("server-json"), eos_token_id=0)  # <eos> of byte_tokenizer
    with serve(runtime, **ENGINES[request.param]) as server:
        server.wait_ready()
        yield server
    runtime.close()


def chat(live, **body) -> httpx.Response:
    return httpx.post(f"{live.url}/v1/chat/completions", timeout=120,
                      json={"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 120, **body})


def schema_format(schema=SCHEMA) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "cat", "schema": schema, "strict": True}}


@pytest.mark.parametrize("sampling", [{"temperature": 0}, *({"temperature": 1.0, "seed": s} for s in range(4))])
def test_json_schema_output_matches_the_schema(live, sampling):
    response = chat(live, response_format=schema_format(), **sampling)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "stop"  # the grammar completed and only EOS was left
    value = json.loads(choice["message"]["content"])
    assert value["colour"] in ("red", "green", "blue") and isinstance(value["ok"], bool)
    assert value["size"] in ("S", "M", "L") and set(value) == {"colour", "ok", "size"}


def test_json_object_is_json_and_can_close(live):
    close = str(byte_tokenizer()("}")["input_ids"][0])
    response = chat(live, response_format={"type": "json_object"}, temperature=0, logit_bias={close: 50})
    choice = response.json()["choices"][0]
    assert choice["message"]["content"] == "{}" and choice["finish_reason"] == "stop"
    streamed = httpx.post(f"{live.url}/v1/chat/completions", timeout=120, json={
        "model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 30, "temperature": 0,
        "response_format": {"type": "json_object"}, "stream": True})
    assert streamed.status_code == 200 and '"content":"{' in streamed.text


def test_text_format_is_plain_generation(live):
    plain = chat(live, temperature=0, max_tokens=8).json()["choices"][0]["message"]["content"]
    assert chat(live, temperature=0, max_tokens=8, response_format={"type": "text"}).json()["choices"][0][
        "message"]["content"] == plain


@pytest.mark.parametrize("body,words", [
    ({"response_format": schema_format({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}})}, "schema"),
    ({"response_format": {"type": "json_schema"}}, "json_schema object"),
    ({"response_format": {"type": "json_object"}, "min_tokens": 3}, "min_tokens"),
    ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos"),
    ({"response_format": {"type": "yaml"}}, None),
])
def test_impossible_formats_are_400(live, body, words):
    response = chat(live, **body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"].startswith("response_format"), error
    if words:
        assert words in error["message"], error
