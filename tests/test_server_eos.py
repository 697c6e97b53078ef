"""finish_reason "eos": a model whose EOS is a token its greedy continuation reaches.

The tiny model's weights depend only on its seed and shapes, so the EOS id can be picked
from a first greedy run and written into the checkpoint's config without changing them.
"""

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from server_live import ENGINES, FAMILY, byte_tokenizer, serve, tiny_runtime
from tiny_models import tiny_model

PROMPT = "hello"


def greedy_continuation(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module", params=list(ENGINES))
def eos_case(tmp_path_factory, request):
    ids = byte_tokenizer()(PROMPT)["input_ids"]
    tokens = greedy_continuation(tiny_model(FAMILY), ids, 8)
    eos = tokens[3]
    checkpoint, runtime = tiny_runtime(tmp_path_factory.mktemp("server-eos"), eos_token_id=eos)
    reference = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    with serve(runtime, **ENGINES[request.param]) as server:
        server.wait_ready()
        yield server, eos, tokens.index(eos) + 1, greedy_continuation(reference, ids, 8)
    runtime.close()


def test_generation_ends_at_eos_like_transformers(eos_case):
    live, eos, length, expected = eos_case
    body = httpx.post(f"{live.url}/generate", json={"prompt": PROMPT, "max_new_tokens": 8}, timeout=60).json()
    assert body["finish_reason"] == "eos"
    assert body["token_ids"][-1] == eos and len(body["token_ids"]) == length
    assert body["token_ids"] == expected  # transformers stops at the same token


def test_openai_reports_eos_as_stop(eos_case):
    live, *_ = eos_case
    body = httpx.post(f"{live.url}/v1/completions", timeout=60,
                      json={"model": "tiny-qwen3", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}).json()
    assert body["choices"][0]["finish_reason"] == "stop"
