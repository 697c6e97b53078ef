"""GPU parity of every family beyond the first six, and of quantised stores: the slot
buffers on the device, pinned host tier, side-stream copies, dequantisation after the copy.

Marked `gpu`: CI deselects them; on the lent GPU machine:
    python -m pytest -m gpu tests/test_families_gpu.py
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from extractor import extract_store
from models import Runtime, RuntimeConfig
from models.runtime import expert_bytes
from test_runtime_quantized import CASES
from tiny_models import NEW_FAMILIES

pytestmark = pytest.mark.gpu
NEW_TOKENS = 24


def ids(batch: int = 1) -> torch.Tensor:
    return torch.randint(3, 120, (batch, 10), generator=torch.Generator().manual_seed(7)).cuda()


def check(runtime, reference, atol: float) -> None:
    with torch.no_grad():
        expected, got = reference(ids(2)).logits, runtime.model(ids(2)).logits
    torch.testing.assert_close(got.float(), expected.float(), atol=atol, rtol=0)
    want = reference.generate(ids(), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(runtime.generate(ids(), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS), want)
    stats = runtime.cache.stats()
    assert stats.bytes <= stats.capacity_bytes


@pytest.mark.parametrize("budget", ["100%", "one-layer"])
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_new_family_on_cuda_matches_transformers(store_factory, family, budget):
    checkpoint, store = store_factory(family)
    reference = AutoModelForCausalLM.from_pretrained(checkpoint).cuda().eval()
    from extractor.store import ExpertStore

    opened = ExpertStore.open(store)
    config = {"cache_fraction": 1.0} if budget == "100%" else {
        "cache_bytes": opened.top_k * expert_bytes(opened, opened.dtype)}
    runtime = Runtime.from_store(store, RuntimeConfig(device="cuda", **config))
    check(runtime, reference, atol=1e-4)
    runtime.close()


QUANTISED = CASES  # the CPU test's checkpoints and references (tests/test_runtime_quantized.py)


@pytest.mark.parametrize("case", QUANTISED)
def test_quantised_store_on_cuda_moves_quantised_bytes(tmp_path, case):
    build, quantization = QUANTISED[case]
    checkpoint = build(tmp_path / "ckpt")
    extract_store(checkpoint, tmp_path / "store")
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=quantization).cuda().eval()
    runtime = Runtime.from_store(tmp_path / "store", RuntimeConfig(device="cuda", cache_fraction=0.25))
    check(runtime, reference, atol=2e-2)  # bf16 compute: the tolerance of tests/test_runtime_gpu.py
    stats = runtime.cache.stats()
    loads = sum(stats.loads.values())
    assert stats.loads["host"] > 0  # evicted experts come back from pinned host RAM, still quantised
    assert stats.bytes_loaded == loads * runtime.store.expert_nbytes(runtime.store.moe_layers[0], 0)
    runtime.close()
