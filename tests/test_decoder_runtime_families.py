"""tests/test_families_gpu.py's check without a GPU: Runtime.generate through the decoder
(decoder="on", the CUDA default) against transformers' generate, every newer family, at 100%
and at one token's top-k of budget. A failure here is the decoder's, not the GPU's."""

import pytest
import torch

from extractor.store import ExpertStore
from models import Runtime, RuntimeConfig
from models.decoder import unsupported_reason
from models.runtime import expert_bytes
from parity import transformers_greedy
from tiny_models import NEW_FAMILIES

NEW_TOKENS = 24


@pytest.mark.parametrize("budget", ["100%", "one-layer"])
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_runtime_generate_on_the_decoder_matches_transformers(store_factory, family, budget):
    checkpoint, store = store_factory(family)
    opened = ExpertStore.open(store)
    config = {"cache_fraction": 1.0} if budget == "100%" else {
        "cache_bytes": opened.top_k * expert_bytes(opened, opened.dtype)}
    runtime = Runtime.from_store(store, RuntimeConfig(decoder="on", **config))
    ids = torch.randint(3, 120, (1, 10), generator=torch.Generator().manual_seed(7))
    want = transformers_greedy(checkpoint, ids, NEW_TOKENS)  # once per family (test_runtime_parity's prompt too)
    got = runtime.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    assert torch.equal(got, want), f"{family} @ {budget}" + (
        f" (decoder refused: {unsupported_reason(runtime.model)})" if unsupported_reason(runtime.model) else "")
    runtime.close()
