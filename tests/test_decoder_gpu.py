"""The CUDA-graph decode path gives transformers' greedy tokens, at every budget.

Marked `gpu`: CI has no GPU and deselects them (-m "not gpu"); they run on the lent GPU
machine with `python -m pytest -m gpu`.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from models import Runtime, RuntimeConfig

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fraction", [1.0, 0.5])  # 50%: a 4-row step (4x4 experts) fits 24 slots
@pytest.mark.parametrize("batch", [1, 3])
def test_graph_decode_matches_transformers(store_factory, dtype, fraction, batch):
    checkpoint, store = store_factory("qwen3_moe", dtype=dtype)
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).cuda().eval()
    ids = torch.randint(3, 120, (batch, 12), generator=torch.Generator().manual_seed(1))
    want = reference.generate(ids.cuda(), max_new_tokens=40, min_new_tokens=40, do_sample=False).cpu()
    runtime = Runtime.from_store(store, RuntimeConfig(device="cuda", cache_fraction=fraction))
    decoder = runtime.decoder(max_batch=4, max_len=64)
    for _ in range(2):  # the first run captures every step shape, the second replays them
        got = decoder.generate(ids, 40)
        assert torch.equal(got, want)
    assert decoder._steps, "no decode step was captured"
    if fraction < 1:
        assert all(len(step.pieces) == 1 + len(runtime.store.moe_layers) for step in decoder._steps.values())
        assert runtime.cache.stats().misses > 0
    else:
        assert all(len(step.pieces) == 1 for step in decoder._steps.values())  # no host work in a step
    runtime.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_grouped_small_steps_match_transformers(store_factory, dtype, fraction):
    """RuntimeConfig(gather_rows=0): a batch-1 step runs the grouped matmul over the slot buffers
    instead of gathering its experts' weights (bench decode --gather-rows 0 times both)."""
    checkpoint, store = store_factory("qwen3_moe", dtype=dtype)
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).cuda().eval()
    ids = torch.randint(3, 120, (1, 12), generator=torch.Generator().manual_seed(2))
    want = reference.generate(ids.cuda(), max_new_tokens=40, min_new_tokens=40, do_sample=False).cpu()
    runtime = Runtime.from_store(store, RuntimeConfig(device="cuda", cache_fraction=fraction, gather_rows=0))
    decoder = runtime.decoder(max_batch=1, max_len=64)
    for _ in range(2):  # capture, then replay
        assert torch.equal(decoder.generate(ids, 40), want)
    runtime.close()


def test_graph_steps_report_routing_once_per_step(store_factory):
    _, store = store_factory("qwen3_moe", dtype=torch.bfloat16)
    runtime = Runtime.from_store(store, RuntimeConfig(device="cuda", cache_fraction=0.25))
    decoder = runtime.decoder(max_batch=1, max_len=64)
    decoder.generate(torch.tensor([[5, 6, 7]]), 4)  # capture
    events = []
    runtime.add_routing_listener(events.append)
    decoder.generate(torch.tensor([[5, 6, 7]]), 4)  # prefill + 3 replayed steps
    assert len(events) == 4 * len(runtime.store.moe_layers)
    assert all(e.outcomes for e in events)
    runtime.close()


def test_compiled_leaves_keep_float32_tokens_in_graphs(store_factory):
    """RuntimeConfig(compile=True): inductor's fused leaves inside the captured steps. In
    float32 its rounding differences stay far below a greedy choice's margin."""
    checkpoint, store = store_factory("qwen3_moe")
    reference = AutoModelForCausalLM.from_pretrained(checkpoint).cuda().eval()
    ids = torch.randint(3, 120, (2, 7), generator=torch.Generator().manual_seed(9))
    want = reference.generate(ids.cuda(), max_new_tokens=16, min_new_tokens=16, do_sample=False).cpu()
    for fraction in (1.0, 0.5):
        runtime = Runtime.from_store(store, RuntimeConfig(device="cuda", cache_fraction=fraction, compile=True))
        decoder = runtime.decoder(max_batch=2, max_len=32)
        for _ in range(2):
            assert torch.equal(decoder.generate(ids, 16), want)
        runtime.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_step_is_captured_and_keeps_tokens(store_factory, dtype):
    """RuntimeConfig(compile_step=True): the compiled one-token forward captured as one graph;
    greedy tokens equal to transformers', or parting only at a tie (inductor rounds fused
    ops once; in bfloat16 that can flip a near-tie of a tiny random model)."""
    from greedy_compare import assert_greedy_matches

    checkpoint, store = store_factory("qwen3_moe", dtype=dtype)
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).cuda().eval()
    ids = torch.randint(3, 120, (2, 12), generator=torch.Generator().manual_seed(1))
    want = reference.generate(ids.cuda(), max_new_tokens=24, min_new_tokens=24, do_sample=False)
    runtime = Runtime.from_store(store, RuntimeConfig(device="cuda", cache_fraction=1.0, compile_step=True))
    decoder = runtime.decoder(max_batch=2, max_len=64)
    for _ in range(2):  # capture, then replay
        got = decoder.generate(ids, 24)
        assert_greedy_matches(reference, got, want, prompt_len=ids.shape[1])
    assert decoder.use_graphs and all(step.verified and len(step.pieces) == 1 for step in decoder._steps.values())
    runtime.close()
