"""GPU path: slot buffers on the device, pinned host tier, side-stream copies.

Marked `gpu`: CI has no GPU and deselects them (-m "not gpu"); they run on the lent
GPU machine with `python -m pytest -m gpu tests/test_runtime_gpu.py`.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from models import Runtime, RuntimeConfig

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fraction", [1.0, 0.25])
def test_cuda_generation_matches_transformers(store_factory, dtype, fraction):
    checkpoint, store = store_factory("qwen3_moe", dtype=dtype)
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).cuda().eval()
    runtime = Runtime.from_store(store, RuntimeConfig(device="cuda", cache_fraction=fraction))
    ids = torch.randint(3, 120, (2, 12), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        expected, got = reference(ids).logits, runtime.model(ids).logits
    atol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), expected.float(), atol=atol, rtol=0)
    want = reference.generate(ids[:1], max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert torch.equal(runtime.generate(ids[:1], max_new_tokens=32, min_new_tokens=32), want)
    stats = runtime.cache.stats()
    assert stats.bytes <= stats.capacity_bytes
    if fraction < 1:
        assert stats.loads["host"] > 0  # evicted experts come back from pinned host RAM
    runtime.close()
