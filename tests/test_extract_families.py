"""Every family, per-expert and fused, bf16 and fp32, sharded: each expert shard equals
the source tensor bit for bit, and the trunk holds exactly the non-expert keys."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from extract_helpers import build_checkpoint, expected_experts, routed_keys, same_bits, source_tensors
from extractor import extract_store
from extractor.store import ExpertStore
from tiny_models import FIRST_SIX as FAMILIES

CASES = [
    pytest.param(family, dtype, fused, id=f"{family}-{str(dtype)[6:]}{'-fused' if fused else ''}")
    for family in (*FAMILIES, "thinker")
    for dtype in (torch.bfloat16, torch.float32)
    for fused in (False, True)
]


@pytest.mark.parametrize("family, dtype, fused", CASES)
def test_shards_and_trunk_equal_the_source(tmp_path, family, dtype, fused):
    ckpt = build_checkpoint(tmp_path / "ckpt", family, dtype=dtype, fused=fused)
    summary = extract_store(ckpt, tmp_path / "store", workers=2 if fused else 1)
    store = ExpertStore.open(tmp_path / "store")
    source = source_tensors(ckpt)
    # a fused checkpoint's split is checked against the per-expert save of the same weights
    reference = source_tensors(build_checkpoint(tmp_path / "ref", family, dtype=dtype)) if fused else source
    experts = expected_experts(reference)

    assert summary.shards == summary.shards_written == len(experts)
    for (layer, expert), projections in experts.items():
        shard = store.load_expert(layer, expert)
        assert set(shard) == {"gate_proj", "up_proj", "down_proj"}
        for name, tensor in projections.items():
            assert same_bits(shard[name], tensor), (layer, expert, name)

    trunk = load_file(store.trunk_path)
    assert set(trunk) == set(source) - routed_keys(source)
    assert all(same_bits(trunk[key], source[key]) for key in trunk)
    assert store.verify() == []


@pytest.mark.parametrize("family", ["deepseek_v3", "thinker", "mixtral"])
def test_manifest_describes_the_store(tmp_path, family):
    ckpt = build_checkpoint(tmp_path / "ckpt", family, dtype=torch.bfloat16)
    extract_store(ckpt, tmp_path / "store")
    store = ExpertStore.open(tmp_path / "store")
    manifest = store.manifest
    layers = sorted({layer for layer, _ in expected_experts(source_tensors(ckpt))})

    assert manifest["family"] == {"thinker": "qwen3_omni_moe"}.get(family, family)
    assert manifest["dtype"] == "bfloat16" and store.dtype == torch.bfloat16
    assert manifest["num_layers"] == 3 and store.moe_layers == layers  # deepseek: layer 0 is dense
    assert (store.num_experts, store.top_k) == (16, 2 if family == "mixtral" else 4)
    assert manifest["experts"] == {str(layer): list(range(16)) for layer in layers}
    assert manifest["source"]["config_sha256"] == hashlib.sha256((ckpt / "config.json").read_bytes()).hexdigest()
    assert (tmp_path / "store/config.json").read_bytes() == (ckpt / "config.json").read_bytes()
    assert (tmp_path / "store/generation_config.json").is_file()
    on_disk = {str(p.relative_to(tmp_path / "store")) for p in (tmp_path / "store").rglob("*")
               if p.is_file() and p.name not in ("manifest.json", ".extract-journal.jsonl")}
    assert set(manifest["files"]) == on_disk
    shard = store.load_expert(layers[0], 3)
    assert store.expert_nbytes(layers[0], 3) == sum(t.nbytes for t in shard.values())


@pytest.mark.parametrize("family, fused", [("deepseek_v3", False), ("qwen2_moe", True)])
def test_dtype_converts_weights_like_torch(tmp_path, family, fused):
    ckpt = build_checkpoint(tmp_path / "ckpt", family, dtype=torch.float32, fused=fused)
    extract_store(ckpt, tmp_path / "store", dtype="bfloat16", workers=2)
    store = ExpertStore.open(tmp_path / "store")
    source = source_tensors(ckpt)

    assert store.manifest["dtype"] == "bfloat16"
    for (layer, expert), projections in expected_experts(source).items():
        shard = store.load_expert(layer, expert)
        assert all(same_bits(shard[n], t.to(torch.bfloat16)) for n, t in projections.items())
    trunk = load_file(store.trunk_path)
    for key, tensor in trunk.items():
        # transformers keeps DeepSeek's correction bias and router weight in float32 whatever the model dtype
        kept = family == "deepseek_v3" and key.endswith(("e_score_correction_bias", "mlp.gate.weight"))
        assert same_bits(tensor, source[key] if kept else source[key].to(torch.bfloat16)), key
    assert any(k.endswith("e_score_correction_bias") for k in trunk) == (family == "deepseek_v3")


def test_workers_write_the_same_bytes_as_one_thread(tmp_path):
    ckpt = build_checkpoint(tmp_path / "ckpt", "olmoe", dtype=torch.bfloat16, fused=True)
    extract_store(ckpt, tmp_path / "one", workers=1)
    extract_store(ckpt, tmp_path / "four", workers=4)
    files = [json.loads((tmp_path / name / "manifest.json").read_text())["files"] for name in ("one", "four")]
    assert files[0] == files[1]
