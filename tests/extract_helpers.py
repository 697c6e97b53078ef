"""Shared by the test_extract_* files: read a checkpoint with the safetensors library
itself, name its routed-expert keys independently of extractor/families.py, and build
the nested "thinker" checkpoint that tiny_models.py has no factory for."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tiny_models import make_checkpoint

PER_EXPERT = re.compile(
    r"^(?:thinker\.)?model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\."
    r"(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$"
)
FUSED = re.compile(r"^(?:thinker\.)?model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
STORE_NAME = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
TINY_SHARD = "20KB"  # splits every tiny checkpoint into ~10 files with an index


def source_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(ckpt.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return tensors


def routed_keys(tensors: dict) -> set[str]:
    return {key for key in tensors if PER_EXPERT.match(key) or FUSED.match(key)}


def expected_experts(tensors: dict) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """(layer, expert) -> {gate_proj, up_proj, down_proj} as nn.Linear [out, in] weights."""
    experts: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if match := PER_EXPERT.match(key):
            layer, expert, proj = int(match[1]), int(match[2]), match[3]
            experts.setdefault((layer, expert), {})[STORE_NAME.get(proj, proj)] = tensor
        elif match := FUSED.match(key):
            layer = int(match[1])
            for expert in range(tensor.shape[0]):
                slot = experts.setdefault((layer, expert), {})
                if match[2] == "down_proj":
                    slot["down_proj"] = tensor[expert]  # [H, I]
                else:
                    gate, up = tensor[expert].chunk(2, dim=0)  # [2I, H] -> 2 x [I, H], gate first
                    slot["gate_proj"], slot["up_proj"] = gate, up
    return experts


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and raw_bytes(a) == raw_bytes(b)


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


def make_thinker_checkpoint(path: Path, *, dtype=torch.float32, seed: int = 0, fused: bool = False) -> Path:
    """A tiny qwen3_moe whose keys sit under thinker.model. / thinker.lm_head., in a
    qwen3_omni_moe config (text config under thinker_config.text_config), sharded in 3
    files, plus one talker MoE tensor that must stay in the trunk."""
    inner = make_checkpoint(path.with_name(path.name + "-inner"), "qwen3_moe", dtype=dtype, seed=seed, fused=fused)
    tensors = {"thinker." + key: t for key, t in source_tensors(inner).items()}
    tensors["talker.model.layers.0.mlp.experts.0.gate_proj.weight"] = torch.ones(2, 2, dtype=dtype)
    path.mkdir(parents=True)
    names = sorted(tensors)
    weight_map = {}
    for i in range(3):
        file = f"model-{i + 1:05d}-of-00003.safetensors"
        part = {key: tensors[key].contiguous() for key in names[i::3]}
        save_file(part, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    text_config = json.loads((inner / "config.json").read_text())
    config = {"model_type": "qwen3_omni_moe", "architectures": ["Qwen3OmniMoeForConditionalGeneration"],
              "thinker_config": {"text_config": text_config}}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(inner / "generation_config.json", path)
    shutil.rmtree(inner)
    return path


def build_checkpoint(path: Path, family: str, **kwargs) -> Path:
    if family == "thinker":
        return make_thinker_checkpoint(path, **kwargs)
    return make_checkpoint(path, family, max_shard_size=TINY_SHARD, **kwargs)
