"""Every family cadre supports serves through the server: greedy output over HTTP is transformers'
own, whichever batching the engine chose. Transformers' continuous batching refuses models whose
layers its paged cache cannot hold (linear attention, Mamba, indexed attention) or fails on their
first forward (MLA's latent cache, attention sinks); the engine then serves them in static
batches and says so in /v1/models (test_server_families.py checks the reason and traces)."""

from __future__ import annotations

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from server_live import byte_tokenizer, serve
from tiny_models import FAMILIES, make_checkpoint

PROMPT = "the cat sat on"
NEW_TOKENS = 8


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_output_over_http_is_transformers_own(family, tmp_path):
    from extractor import extract_store
    from models import Runtime, RuntimeConfig

    checkpoint = make_checkpoint(tmp_path / "checkpoint", family)
    tokenizer = byte_tokenizer()
    tokenizer.save_pretrained(checkpoint)
    extract_store(checkpoint, tmp_path / "store", quiet=True)
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    reference = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    expected = reference.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)[0, ids.shape[1]:].tolist()
    runtime = Runtime.from_store(tmp_path / "store", RuntimeConfig(device="cpu", cache_fraction=0.5))
    try:
        with serve(runtime) as server:
            server.wait_ready()
            body = httpx.post(f"{server.url}/generate", json={"prompt": PROMPT, "max_new_tokens": NEW_TOKENS},
                              timeout=120).json()
            batching = httpx.get(f"{server.url}/v1/models").json()["data"][0]["batching"]
    finally:
        runtime.close()
    assert batching in ("continuous", "static")
    assert body["token_ids"] == expected, f"{family} ({batching} batching)"
