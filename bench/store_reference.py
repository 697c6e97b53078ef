"""Stock transformers, every expert resident, built straight from an expert store.

A real-size synthetic store (`python -m bench synth-store`) has no checkpoint beside it —
a second 61 GB copy would not fit the GPU machine's disk — so the reference model is built
from the store itself: the family's own transformers class from the store's config.json,
allocated on the device, the trunk's tensors loaded under their own names, and each layer's
experts stacked into transformers' fused parameters (gate_up_proj [E,2I,H], gate rows
first; down_proj [E,H,I]). Nothing but the loading differs from `from_pretrained`.
"""

from __future__ import annotations

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from extractor.store import ExpertStore
from models.expert_format import dense_weights


def reference_from_store(root, device: str, dtype: torch.dtype, experts_implementation: str):
    store = ExpertStore.open(root)
    config = AutoConfig.from_pretrained(store.root)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, experts_implementation=experts_implementation)
    model.to_empty(device=device)
    _load_trunk(model, store, device, dtype)
    _load_experts(model, store, device, dtype)
    _rebuild_rotary(model, config, device)
    return model.eval()


def _load_trunk(model, store: ExpertStore, device: str, dtype: torch.dtype) -> None:
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    with safe_open(store.trunk_path, framework="pt", device="cpu") as trunk:
        tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
        missing = [name for name in params if name not in trunk.keys() and ".experts." not in name
                   and "rotary_emb" not in name and name not in tied]
        if missing:
            raise ValueError(f"{store.trunk_path}: no tensor for {missing[:3]} (a family whose checkpoint names "
                             "differ from its module names needs from_pretrained's renaming)")
        for name in trunk.keys():
            if name in params:
                params[name].data.copy_(trunk.get_tensor(name).to(device=device, dtype=params[name].dtype))
    model.tie_weights()


def _load_experts(model, store: ExpertStore, device: str, dtype: torch.dtype) -> None:
    for layer, module in enumerate(model.model.layers):
        experts = getattr(module.mlp, "experts", None)
        if experts is None:
            continue
        inter = experts.down_proj.shape[-1]
        for expert in store.experts_present(layer):
            # quantised shards (FP8 block scales, MXFP4) dequantised on the device, as transformers
            # loads such a checkpoint with dequantize=True; dense ones only cast
            shard = {name: t.to(device) for name, t in store.load_expert(layer, expert).items()}
            tensors = dense_weights(store.expert_format, shard, dtype)
            experts.gate_up_proj.data[expert, :inter].copy_(tensors["gate_proj"])
            experts.gate_up_proj.data[expert, inter:].copy_(tensors["up_proj"])
            experts.down_proj.data[expert].copy_(tensors["down_proj"])


def _rebuild_rotary(model, config, device: str) -> None:
    """to_empty() left the rotary embedding's inv_freq buffers uninitialised."""
    rotary = model.model.rotary_emb
    with torch.device(device):
        model.model.rotary_emb = type(rotary)(config=config)


def offloaded_from_store(root, dtype: torch.dtype, max_memory: dict):
    """The same model built in host RAM, then dispatched by accelerate under `max_memory`
    (e.g. {0: 24 GiB, "cpu": ...}): what `from_pretrained(device_map="auto")` does, from a store."""
    from accelerate import dispatch_model, infer_auto_device_map

    model = reference_from_store(root, "cpu", dtype, "batched_mm")
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=model._no_split_modules)
    return dispatch_model(model, device_map=device_map)
