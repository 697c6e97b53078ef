"""A store read parses each shard's header once (ExpertStore._headers): a miss on a decode step's
critical path no longer opens and parses it first. A shard cut short or gone after its header was
parsed still fails with the shard named."""

import os
import shutil

import pytest
import torch

import extractor.store as store_module
from extractor.store import ExpertStore, StoreError


@pytest.fixture()
def store(store_factory, tmp_path):
    return ExpertStore.open(shutil.copytree(store_factory("qwen3_moe")[1], tmp_path / "store"))


def destination(store, layer, expert):
    return {name: torch.empty_like(t) for name, t in store.load_expert(layer, expert).items()}


def test_each_shards_header_is_parsed_once(store, monkeypatch):
    parsed = []
    real = store_module.read_header
    monkeypatch.setattr(store_module, "read_header", lambda path: parsed.append(path) or real(path))
    layer = store.moe_layers[0]
    for expert in (0, 1, 0, 1, 0):
        out = destination(store, layer, expert)
        store.read_expert_into(layer, expert, out)
        want = store.load_expert(layer, expert)
        assert all(torch.equal(out[name], want[name]) for name in want)
    assert parsed == [store.expert_path(layer, 0), store.expert_path(layer, 1)]


@pytest.mark.parametrize("damage", ["truncate", "remove"])
def test_a_shard_damaged_after_its_header_was_read_names_the_shard(store, damage):
    layer = store.moe_layers[0]
    out = destination(store, layer, 2)
    store.read_expert_into(layer, 2, out)  # header parsed and kept
    path = store.expert_path(layer, 2)
    if damage == "truncate":
        os.truncate(path, path.stat().st_size - 8)
    else:
        path.unlink()
    with pytest.raises(StoreError, match="expert_002.safetensors"):
        store.read_expert_into(layer, 2, out)
