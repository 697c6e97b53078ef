"""Every family cadre supports serves through the server, and so do the quantised formats people
download (FP8 block-scaled, MXFP4): greedy output over HTTP is transformers' own, whichever
batching the engine chose. Transformers' continuous batching refuses models whose
layers its paged cache cannot hold (linear attention, Mamba, indexed attention) or fails on their
first forward (MLA's latent cache, attention sinks); the engine then serves them in static
batches and says so in /v1/models (test_server_families.py checks the reason and traces)."""

from __future__ import annotations

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from quantized_checkpoints import make_fp8_checkpoint, make_mxfp4_checkpoint
from server_live import byte_tokenizer, serve
from tiny_models import FAMILIES, make_checkpoint

PROMPT = "the cat sat on"
NEW_TOKENS = 8


CHECKPOINTS = {family: lambda path, family=family: make_checkpoint(path, family) for family in FAMILIES} | {
    "fp8-qwen3_moe": lambda path: make_fp8_checkpoint(path, "qwen3_moe"),
    "fp8-deepseek_v3": lambda path: make_fp8_checkpoint(path, "deepseek_v3"),
    "mxfp4-gpt_oss": lambda path: make_mxfp4_checkpoint(path, intermediate_size=32),  # MXFP4 blocks are 32 wide
}


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_greedy_output_over_http_is_transformers_own(name, tmp_path):
    from extractor import extract_store
    from models import Runtime, RuntimeConfig

    checkpoint = CHECKPOINTS[name](tmp_path / "checkpoint")
    tokenizer = byte_tokenizer()
    tokenizer.save_pretrained(checkpoint)
    extract_store(checkpoint, tmp_path / "store", quiet=True)
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    runtime = Runtime.from_store(tmp_path / "store", RuntimeConfig(device="cpu", cache_fraction=0.5))
    # a quantised checkpoint is compared with transformers' own dequantisation, in the store's dtype
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=runtime.model.dtype).eval()
    expected = reference.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)[0, ids.shape[1]:].tolist()
    try:
        with serve(runtime) as server:
            server.wait_ready()
            body = httpx.post(f"{server.url}/generate", json={"prompt": PROMPT, "max_new_tokens": NEW_TOKENS},
                              timeout=120).json()
            batching = httpx.get(f"{server.url}/v1/models").json()["data"][0]["batching"]
    finally:
        runtime.close()
    assert batching in ("continuous", "static")
    assert body["token_ids"] == expected, f"{name} ({batching} batching)"
