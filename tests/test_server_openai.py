"""The OpenAI endpoints through the `openai` client library, against a live uvicorn."""

import openai
import pytest

from server_live import ENGINES, MODEL_NAME, serve, tiny_runtime


@pytest.fixture(scope="module", params=list(ENGINES))
def live(tmp_path_factory, request):
    _, runtime = tiny_runtime(tmp_path_factory.mktemp("server-openai"))
    with serve(runtime, **ENGINES[request.param]) as server:
        server.wait_ready()
        server.runtime = runtime
        yield server
    runtime.close()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]


def test_completion_and_its_stream_agree(client, live):
    done = client.completions.create(model=MODEL_NAME, prompt="hello world", max_tokens=9, temperature=0)
    choice = done.choices[0]
    assert choice.finish_reason == "length" and done.usage.completion_tokens == 9
    assert done.usage.prompt_tokens == len(live.runtime.tokenizer("hello world")["input_ids"])
    assert done.usage.total_tokens == done.usage.prompt_tokens + 9
    chunks = list(client.completions.create(model=MODEL_NAME, prompt="hello world", max_tokens=9, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9


def test_completion_accepts_token_ids(client, live):
    ids = live.runtime.tokenizer("hello world")["input_ids"]
    by_ids = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=5, temperature=0)
    by_text = client.completions.create(model=MODEL_NAME, prompt="hello world", max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_chat_completion_and_its_stream_agree(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    done = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0)
    message = done.choices[0].message
    assert message.role == "assistant" and done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 8
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_strings_are_never_streamed(client):
    full = client.completions.create(model=MODEL_NAME, prompt="hello", max_tokens=20, temperature=0).choices[0].text
    stop = full[5:8]
    cut = full.find(stop)
    assert cut > 0, f"pick another slice of {full!r}"
    chunks = list(client.completions.create(model=MODEL_NAME, prompt="hello", max_tokens=20, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full[:cut]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_chat_sampling_repeats(client):
    request = dict(model=MODEL_NAME, messages=[{"role": "user", "content": "a story"}], max_tokens=10,
                   temperature=1.0, top_p=0.9, seed=42)
    first = client.chat.completions.create(**request).choices[0].message.content
    assert client.chat.completions.create(**request).choices[0].message.content == first


def test_errors_arrive_as_openai_errors(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=100_000)
    assert err.value.body["code"] == "context_length_exceeded" and "256" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                       tools=[{"type": "function", "function": {"name": "f"}}])
    assert err.value.body["param"] == "tools"
