"""A batch of quantised misses fills its slots with the same bits as dequantising each expert
alone (expert_format.dense_weights, itself tested against transformers): FP8 and MXFP4 (with
biases), from host-tier entries (one copy each) and from loose tensors, across batches cut
by the workspace bound."""

from __future__ import annotations

import pytest
import torch

from extractor import extract_store
from extractor.store import ExpertStore
from models import quantised_fill
from models.expert_format import dense_weights
from models.host_tier import HostTier
from models.quantised_fill import QuantisedFill
from quantized_checkpoints import make_fp8_checkpoint, make_mxfp4_checkpoint

DTYPE = torch.bfloat16
BUILDERS = {"fp8": lambda p: make_fp8_checkpoint(p, "qwen3_moe"),
            "mxfp4": lambda p: make_mxfp4_checkpoint(p, intermediate_size=32)}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def store(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    extract_store(BUILDERS[request.param](root / "ckpt"), root / "store")
    return ExpertStore.open(root / "store")


def _shards(store: ExpertStore) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    return {(layer, expert): store.load_expert(layer, expert)
            for layer in store.moe_layers for expert in store.experts_present(layer)}


def _buffers(store: ExpertStore, shards, slots: int):
    """Empty slot buffers of the cache's shapes (NaN: an unwritten slot shows)."""
    dense = dense_weights(store.expert_format, next(iter(shards.values())), DTYPE)
    inter, hidden = dense["gate_proj"].shape
    full = lambda *shape: torch.full(shape, float("nan"), dtype=DTYPE)  # noqa: E731
    biases = (full(slots, 2 * inter), full(slots, hidden)) if "gate_proj_bias" in dense else (None, None)
    return full(slots, 2 * inter, hidden), full(slots, hidden, inter), *biases


def _expected(store, parts) -> dict[str, torch.Tensor]:
    dense = dense_weights(store.expert_format, parts, DTYPE)
    out = {"gate_up": torch.cat([dense["gate_proj"], dense["up_proj"]]), "down": dense["down_proj"]}
    if "gate_proj_bias" in dense:
        out |= {"gate_up_bias": torch.cat([dense["gate_proj_bias"], dense["up_proj_bias"]]),
                "down_bias": dense["down_proj_bias"]}
    return out


@pytest.mark.parametrize("source", ["host-tier", "loose"])
@pytest.mark.parametrize("workspace", [None, 1])  # 1 byte: every expert its own batch
def test_batched_fill_equals_dequantising_each_expert(store, source, workspace, monkeypatch):
    if workspace is not None:
        monkeypatch.setattr(quantised_fill, "DEQUANT_WORKSPACE_BYTES", workspace)
    shards = _shards(store)
    tier = HostTier(None, pin=False)
    entries = {key: tier.put(key, parts) if source == "host-tier" else parts for key, parts in shards.items()}
    buffers = _buffers(store, shards, len(shards) + 3)
    fill = QuantisedFill(store.expert_format, DTYPE, *buffers)
    keys = list(entries)
    slots = [len(keys) + 2 - i for i in range(len(keys))]  # reversed and offset: the index is honoured
    fill.fill(slots, [entries[key] for key in keys], non_blocking=False)

    assert fill.batch == 1 if workspace else fill.batch >= len(keys)
    names = ["gate_up", "down", "gate_up_bias", "down_bias"]
    for key, slot in zip(keys, slots):
        for name, expected in _expected(store, shards[key]).items():
            got = buffers[names.index(name)][slot]
            assert torch.equal(got.view(torch.int16), expected.view(torch.int16)), (key, name)
    untouched = set(range(len(keys) + 3)) - set(slots)
    assert all(torch.isnan(buffers[0][slot]).all() for slot in untouched)


def test_a_reused_host_tier_slot_fills_with_its_new_expert(store):
    """The filler remembers where host-tier entries lie; a slot the tier evicts and refills
    holds another expert at the same address, and that one is what gets copied."""
    shards = _shards(store)
    entry_bytes = sum(t.nbytes for t in next(iter(shards.values())).values())
    tier = HostTier(4 * entry_bytes, pin=False)  # a few entries: every put past them evicts
    buffers = _buffers(store, shards, 1)
    fill = QuantisedFill(store.expert_format, DTYPE, *buffers)
    addresses = set()
    for key, parts in shards.items():
        entry = tier.put(key, parts)
        addresses.add(entry["gate_proj"].data_ptr())
        fill.fill([0], [entry], non_blocking=False)
        del entry  # given back: the tier may evict it
        assert torch.equal(buffers[1][0].view(torch.int16), _expected(store, parts)["down"].view(torch.int16)), key
    assert len(addresses) < len(shards)  # slots were reused


def test_a_host_tier_entry_is_one_copy_and_loose_tensors_are_not(store):
    shards = _shards(store)
    key, parts = next(iter(shards.items()))
    entry = HostTier(None, pin=False).put(key, parts)
    fill = QuantisedFill(store.expert_format, DTYPE, *_buffers(store, shards, 1))
    fill._learn(entry)
    whole = fill._contiguous_bytes(entry)
    assert whole is not None and whole.numel() == sum(t.nbytes for t in parts.values())
    assert whole.data_ptr() == entry["gate_proj"].data_ptr()
    assert fill._contiguous_bytes(parts) is None  # separate tensors of a safetensors read
    reordered = dict(reversed(list(entry.items())))  # the same tensors, another order: still the layout's
    assert fill._contiguous_bytes(reordered) is not None


@pytest.mark.gpu
def test_on_cuda_pinned_entries_fill_on_a_side_stream_with_the_same_bits(store):
    """As the cache runs it: pinned host-tier entries, copies and dequantisation queued on a side
    stream without waiting, then read on the default stream after its event."""
    shards = _shards(store)
    tier = HostTier(None, pin=True)
    entries = [tier.put(key, parts) for key, parts in shards.items()]
    buffers = [b.cuda() if b is not None else None for b in _buffers(store, shards, len(shards))]
    fill = QuantisedFill(store.expert_format, DTYPE, *buffers)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        fill.fill(list(range(len(entries))), entries, non_blocking=True)
        done = torch.cuda.Event()
        done.record(side)
    torch.cuda.current_stream().wait_event(done)
    names = ["gate_up", "down", "gate_up_bias", "down_bias"]
    for slot, key in enumerate(shards):
        for name, expected in _expected(store, shards[key]).items():
            got = buffers[names.index(name)][slot].cpu()
            assert torch.equal(got.view(torch.int16), expected.view(torch.int16)), (key, name)
