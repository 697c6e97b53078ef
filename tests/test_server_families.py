"""DeepSeek-V3 (MLA attention), gpt-oss (attention sinks, sliding layers, expert biases) and
MiniMax (linear attention) served over HTTP with trace=true: greedy output is transformers' own,
alone or with other requests in flight. Transformers' continuous batching cannot page MLA's
latent cache nor hold linear attention's state, so DeepSeek-V3 and MiniMax fall back to static
batches through generate() and say so in /v1/models."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from server_live import byte_tokenizer, serve
from tiny_models import make_checkpoint

PROMPTS = ["hello world", "the cat sat on", "a"]


# MiniMax: linear attention, refused by continuous batching up front; transformers' own
# left-padded batches of it are not exact, so static batches must never pad
BATCHING = {"deepseek_v3": "static", "gpt_oss": "continuous", "minimax": "static"}


@pytest.fixture(scope="module", params=list(BATCHING))
def live(tmp_path_factory, request):
    from extractor import extract_store
    from models import Runtime, RuntimeConfig

    root = tmp_path_factory.mktemp(f"server-{request.param}")
    checkpoint = make_checkpoint(root / "checkpoint", request.param)
    byte_tokenizer().save_pretrained(checkpoint)
    extract_store(checkpoint, root / "store", quiet=True)
    runtime = Runtime.from_store(root / "store", RuntimeConfig(device="cpu", cache_fraction=0.5))
    with serve(runtime) as server:
        server.wait_ready()
        server.checkpoint, server.runtime, server.family = checkpoint, runtime, request.param
        yield server
    runtime.close()


def reference_tokens(checkpoint, tokenizer, prompt: str, new_tokens: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def test_the_engine_says_how_it_batches(live):
    card = httpx.get(f"{live.url}/v1/models").json()["data"][0]
    assert card["batching"] == BATCHING[live.family]


def test_traced_greedy_output_is_transformers_own(live):
    tokenizer = byte_tokenizer()
    for prompt in PROMPTS:
        body = httpx.post(f"{live.url}/generate?trace=true", json={"prompt": prompt, "max_new_tokens": 12},
                          timeout=120).json()
        assert body["token_ids"] == reference_tokens(live.checkpoint, tokenizer, prompt, 12)
        assert body["finish_reason"] in ("length", "eos")
        steps = body["trace"]["steps"]
        assert len(steps) == len(body["token_ids"])
        for step in steps:
            assert [entry["layer"] for entry in step["layers"]] == live.runtime.store.moe_layers
            assert all(len(entry["experts"]) == live.runtime.store.top_k for entry in step["layers"])


def test_concurrent_requests_get_what_each_gets_alone(live):
    """Prompts of different lengths in flight together: each answer is transformers' for that
    prompt alone, whatever the engine batched it with."""
    def ask(prompt):
        return httpx.post(f"{live.url}/generate", json={"prompt": prompt, "max_new_tokens": 8}, timeout=120).json()

    tokenizer = byte_tokenizer()
    prompts = [*PROMPTS, *PROMPTS]  # more requests than one batch takes at once
    with ThreadPoolExecutor(len(prompts)) as pool:
        bodies = list(pool.map(ask, prompts))
    for prompt, body in zip(prompts, bodies):
        assert body["token_ids"] == reference_tokens(live.checkpoint, tokenizer, prompt, 8), prompt


def test_forcing_continuous_batching_on_linear_attention_says_why(tmp_path):
    from extractor import extract_store
    from models import Runtime, RuntimeConfig

    checkpoint = make_checkpoint(tmp_path / "checkpoint", "minimax")
    byte_tokenizer().save_pretrained(checkpoint)
    extract_store(checkpoint, tmp_path / "store", quiet=True)
    runtime = Runtime.from_store(tmp_path / "store", RuntimeConfig(device="cpu"))
    try:
        with serve(runtime, batching="continuous") as server:
            deadline = time.monotonic() + 60
            while (ready := httpx.get(f"{server.url}/ready")).json().get("status") != "failed":
                assert time.monotonic() < deadline, ready.text
                time.sleep(0.05)
    finally:
        runtime.close()
    detail = ready.json()["detail"]
    assert "--batching continuous" in detail and "linear_attention" in detail and "--batching auto" in detail
