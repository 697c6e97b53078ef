"""Replayed decode steps queue the speculative prefetch behind the next piece: the prediction is
computed inside the captured piece and read with the layer's routing, and its loads, write-backs
into an exclusive host tier included, race the piece's reads of the slots; with prefetch_tier
"host" they are store reads into the host tier instead. Tokens must stay transformers' greedy
tokens, and the prefetches must be used.

Marked `gpu`: CI has no GPU and deselects them (-m "not gpu").
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from models import Runtime, RuntimeConfig

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("host_entries,tier", [(None, "device"), (6, "device"), (6, "host")])  # None: holds the store
def test_speculative_prefetch_in_replayed_steps_keeps_tokens(store_factory, dtype, host_entries, tier):
    checkpoint, store = store_factory("qwen3_moe", dtype=dtype)
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).cuda().eval()
    ids = torch.randint(3, 120, (1, 12), generator=torch.Generator().manual_seed(4))
    want = reference.generate(ids.cuda(), max_new_tokens=40, min_new_tokens=40, do_sample=False).cpu()
    probe = Runtime.from_store(store, RuntimeConfig(device="cuda", cache_fraction=0.25))
    entry = probe.plan.slot_bytes
    probe.close()
    host = None if host_entries is None else str(host_entries * entry)
    runtime = Runtime.from_store(store, RuntimeConfig(device="cuda", cache_fraction=0.25, prefetch_layers=1,
                                                      prefetch_tier=tier, host_memory=host))
    try:
        assert runtime.cache.exclusive == (host_entries is not None)
        if runtime.cache.exclusive:  # pinned up front (HostTier.pin_all), within its cap
            assert 0 < runtime.cache.host.pinned_bytes <= runtime.plan.host_tier_bytes
        decoder = runtime.decoder(max_batch=1, max_len=64)
        for _ in range(3):  # capture, then replays
            assert torch.equal(decoder.generate(ids, 40), want)
        assert any(split.ahead for step in decoder._steps.values() for split in step.splits), \
            "no captured step predicts deeper layers"
        stats, kind = runtime.cache.stats(), "" if tier == "device" else "host_"
        assert stats.prefetch[f"{kind}issued"] > 0 and stats.prefetch[f"{kind}used"] > 0, stats.prefetch
        if tier == "host":
            assert stats.prefetch["issued"] == 0, "a host-tier prefetch loaded device slots"
        assert runtime.cache.pinned() == 0
    finally:
        runtime.close()
