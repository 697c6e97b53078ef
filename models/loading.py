"""Build a transformers model from an expert store without materialising any expert.

The model runs transformers' own experts modules under the "cadre" experts
implementation (transformers' public ExpertsInterface, see models/experts.py). Only one
thing needs a subclass of the family's model class: in `__init__` (on the meta device,
before any weight loads) each routed-experts module drops its weight parameters, so
`from_pretrained` never allocates them and never expects them in the trunk, and gets an
`ExpertLayer`. The trunk loads through `from_pretrained`, which applies transformers' own
key renaming (e.g. Mixtral's `block_sparse_moe` -> `mlp`). Attention, KV cache and
`generate()` are untouched. Each router gate keeps its weights and gets a forward that
routes through `router.exact` with the store's mask.
"""

from __future__ import annotations

import types
from functools import lru_cache

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from extractor.families import renormalizes
from extractor.store import ExpertStore, StoreError
from router.exact import RoutingSpec

from .experts import EXPERTS_IMPLEMENTATION, ExpertLayer


def moe_blocks(model: PreTrainedModel) -> dict[int, torch.nn.Module]:
    """{layer index: MoE block (the module with `gate` and `experts`)}."""
    return {i: layer.mlp for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")}


def expert_layers(model: PreTrainedModel) -> dict[int, ExpertLayer]:
    """{layer index: the ExpertLayer bound to that layer's experts module}."""
    return {layer: block.experts.cadre for layer, block in moe_blocks(model).items()}


@lru_cache(maxsize=None)
def selective_class(base: type[PreTrainedModel]) -> type[PreTrainedModel]:
    class Selective(base):
        # expert keys never reach the model: they live in the store's shards
        _keys_to_ignore_on_load_unexpected = [r"\.experts\."]

        def __init__(self, config):
            super().__init__(config)
            for layer, block in moe_blocks(self).items():
                strip_expert_weights(block.experts)
                block.experts.cadre = ExpertLayer(layer)

    Selective.__name__ = Selective.__qualname__ = f"Selective{base.__name__}"
    Selective.__module__ = base.__module__  # transformers reads the family's source through it
    return Selective


def strip_expert_weights(experts: torch.nn.Module) -> None:
    """Remove a routed-experts module's weights (and biases): the cache's slots hold them."""
    if not hasattr(experts, "has_gate"):  # not decorated with @use_experts_implementation
        raise StoreError(f"{type(experts).__name__} does not use transformers' experts interface; "
                         "cadre cannot serve its experts")
    for name in list(experts._parameters):
        del experts._parameters[name]
    experts._is_hf_initialized = True  # nothing left for the family's _init_weights to fill


def routing_spec(store: ExpertStore, hf_config) -> RoutingSpec:
    family = store.family
    return RoutingSpec(
        kind=family.routing,
        top_k=store.top_k,
        num_experts=store.num_experts,
        renormalize=renormalizes(store.config, family),
        weights_in_logits_dtype=family.name != "mixtral",
        n_group=getattr(hf_config, "n_group", 1) or 1,
        topk_group=getattr(hf_config, "topk_group", 1) or 1,
        routed_scaling_factor=getattr(hf_config, "routed_scaling_factor", 1.0) or 1.0,
    )


def load_model(store: ExpertStore, *, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu") -> PreTrainedModel:
    config = AutoConfig.from_pretrained(store.root)
    base = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if base is None:
        raise StoreError(f"{store.root}: transformers has no causal-LM class for {type(config).__name__}")
    try:
        trunk = load_file(store.trunk_path)
    except Exception as exc:
        raise StoreError(f"{store.trunk_path}: cannot load trunk: {exc}") from exc
    model = selective_class(base).from_pretrained(None, config=config, state_dict=trunk, dtype=dtype or store.dtype,
                                                  experts_implementation=EXPERTS_IMPLEMENTATION)
    return model.to(device).eval()


def install_router(block: torch.nn.Module, route_fn) -> None:
    """Make `block.gate` return (logits, weights, indices) chosen by `route_fn(logits, gate)`.

    The logits are computed exactly as the family's gate computes them (DeepSeek-V3 in
    float32), so `exact` routing reproduces transformers' choices bit for bit.
    """
    gate = block.gate
    in_float32 = hasattr(gate, "e_score_correction_bias")

    def forward(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.weight.shape[-1])  # [T,H]
        if in_float32:
            logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))  # [T,E]
        else:
            logits = F.linear(hidden_states, self.weight)  # [T,E]
        weights, indices = route_fn(logits, self)
        return logits, weights, indices

    gate.forward = types.MethodType(forward, gate)
