"""--experts / --layers write exactly the experts asked for, and the manifest says so."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from extract_helpers import build_checkpoint, routed_keys, source_tensors
from extractor import ExtractError, extract_store, verify_store
from extractor.__main__ import main
from extractor.spec import parse_spec, resolve_spec


def shard_files(store) -> set[tuple[int, int]]:
    return {(int(p.parent.name[6:]), int(p.stem[7:])) for p in (store / "experts").glob("layer_*/expert_*.safetensors")}


def test_experts_0_7_of_16_in_every_layer(tmp_path):
    ckpt = build_checkpoint(tmp_path / "ckpt", "qwen3_moe", dtype=torch.bfloat16)
    assert main(["--model", str(ckpt), "--out", str(tmp_path / "store"), "--experts", "0-7", "--layers", "all",
                 "--quiet"]) == 0
    manifest = json.loads((tmp_path / "store/manifest.json").read_text())

    assert manifest["num_experts"] == 16
    assert manifest["experts"] == {str(layer): list(range(8)) for layer in (0, 1, 2)}
    assert shard_files(tmp_path / "store") == {(layer, e) for layer in (0, 1, 2) for e in range(8)}
    assert {rel for rel in manifest["files"] if rel.startswith("experts/")} == {
        f"experts/layer_{layer:03d}/expert_{e:03d}.safetensors" for layer in (0, 1, 2) for e in range(8)}
    source = source_tensors(ckpt)  # experts 8-15 are in neither the shards nor the trunk
    assert set(load_file(tmp_path / "store/trunk.safetensors")) == set(source) - routed_keys(source)
    assert verify_store(tmp_path / "store") == []


def test_layer_selection_and_growing_a_store(tmp_path):
    ckpt = build_checkpoint(tmp_path / "ckpt", "deepseek_v3", dtype=torch.bfloat16)  # layer 0 is dense
    first = extract_store(ckpt, tmp_path / "store", experts="0-3,9", layers="0-1")
    manifest = json.loads((tmp_path / "store/manifest.json").read_text())
    assert first.shards == 5 and manifest["experts"] == {"1": [0, 1, 2, 3, 9], "2": []}

    grown = extract_store(ckpt, tmp_path / "store", experts="all", layers="all")
    assert (grown.shards, grown.shards_skipped, grown.shards_written) == (32, 5, 27)
    assert shard_files(tmp_path / "store") == {(layer, e) for layer in (1, 2) for e in range(16)}
    assert verify_store(tmp_path / "store") == []

    again = extract_store(ckpt, tmp_path / "store")  # same request on a finished store: nothing to do
    assert (again.shards_written, again.bytes_written) == (0, 0)


def test_spec_grammar():
    assert parse_spec("all", "--experts") is None
    assert resolve_spec(parse_spec(" 0-2, 12,1 ,40-41", "--experts"), 48, "--experts", "expert") == [0, 1, 2, 12, 40, 41]
    assert resolve_spec(parse_spec([3, 1], "--layers"), 4, "--layers", "layer") == [1, 3]
    for bad in ("", "a", "1-", "-1", "3-1", "1,,2", "0-7;12", "all,1", "1.5"):
        with pytest.raises(ExtractError):
            parse_spec(bad, "--experts")
    with pytest.raises(ExtractError, match="expert 48 out of range"):
        resolve_spec(parse_spec("0-48", "--experts"), 48, "--experts", "expert")
