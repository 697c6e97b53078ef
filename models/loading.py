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

import inspect
import re
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

from .expert_format import dequantize_fp8
from .experts import EXPERTS_IMPLEMENTATION, ExpertLayer


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def moe_blocks(model: PreTrainedModel) -> dict[int, torch.nn.Module]:
    """{layer index: MoE block}: the parent of each routed-experts module, found by the metadata
    transformers' `@use_experts_implementation` puts on it (`mlp` in most families, Jamba's and
    LFM2's `feed_forward`, Granite's `block_sparse_moe`)."""
    blocks = {}
    for path, module in model.named_modules():
        if hasattr(module, "is_concatenated") and path.endswith(".experts"):
            blocks[int(_LAYER.search(path)[1])] = model.get_submodule(path.rsplit(".", 1)[0])
    return blocks


def router_of(block: torch.nn.Module) -> torch.nn.Module:
    """The block's router: `gate` in most families, `router` in gpt-oss, PhiMoE, Granite, Jamba."""
    for router_name, linear_name in (("gate", "wg"), ("router", "gate")):
        router = getattr(block, router_name, None)
        if router is not None and not hasattr(router, "weight") and hasattr(getattr(router, linear_name, None),
                                                                             "weight"):
            # HunYuan keeps its router's linear in gate.wg, AFMoE in router.gate: its weight is named
            # where cadre reads a router's (a plain reference: no second parameter, the call unchanged)
            object.__setattr__(router, "weight", getattr(router, linear_name).weight)
        if hasattr(router, "weight"):
            return router
    raise StoreError(f"{type(block).__name__} has no router (gate/router) with a weight")


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
    kind = family.routing
    if kind == "topk_softmax" and getattr(hf_config, "expert_selection_fn", "softmax") == "sigmoid":
        kind = "topk_sigmoid"  # Cohere2-MoE: the config picks how the top-k logits become weights
    return RoutingSpec(
        kind=kind,
        top_k=store.top_k,
        num_experts=store.num_experts,
        renormalize=renormalizes(store.config, family),
        weights_in_logits_dtype=family.weights_dtype != "float32",
        n_group=getattr(hf_config, "n_group", 1) or 1,
        topk_group=getattr(hf_config, "topk_group", 1) or 1,
        routed_scaling_factor=(getattr(hf_config, family.scaling_key, 1.0) or 1.0) if family.scaling_key else 1.0,
        topk_method=getattr(hf_config, "topk_method", None) or "greedy",
        weights_in_hidden_dtype=family.weights_dtype == "hidden",
        jitter_eps=getattr(hf_config, "router_jitter_noise", 0.0) or 0.0,
        norm_min=getattr(hf_config, "moe_norm_min", 1e-12) or 1e-12,
        logit_softcap=getattr(hf_config, "moe_router_logit_softcapping", 0.0) or 0.0,
        group_fill=family.group_fill,
        sorted_topk=family.sorted_topk,
        renorm_epsilon=family.renorm_epsilon,
        logits=family.logits,
        score_fn=getattr(hf_config, "scoring_func", None) or "sigmoid",
    )


def load_model(store: ExpertStore, *, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu") -> PreTrainedModel:
    config = AutoConfig.from_pretrained(store.root)
    if store.family.config_path:  # a multimodal checkpoint (Qwen3.5-MoE): cadre serves its text model
        config = config.get_text_config()
    base = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if base is None:
        raise StoreError(f"{store.root}: transformers has no causal-LM class for {type(config).__name__}")
    try:
        trunk = load_file(store.trunk_path)
    except Exception as exc:
        raise StoreError(f"{store.trunk_path}: cannot load trunk: {exc}") from exc
    if store.family.other_towers:  # a vision tower: the served text model has no place for it
        trunk = {key: value for key, value in trunk.items() if not key.startswith(store.family.other_towers)}
    dequantize_trunk(config, trunk, dtype or store.dtype)
    model = selective_class(base).from_pretrained(None, config=config, state_dict=trunk, dtype=dtype or store.dtype,
                                                  experts_implementation=EXPERTS_IMPLEMENTATION)
    return model.to(device).eval()


def dequantize_trunk(config, trunk: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """A quantised checkpoint's trunk in the model dtype, and its config without the
    quantisation: FP8 linear weights (DeepSeek-V3's and Qwen3-FP8's attention) dequantised
    with transformers' arithmetic (models/expert_format.py), so no quantiser runs at load
    and none replaces the experts modules (their shards are dequantised by the cache)."""
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        return
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    if method not in ("fp8", "mxfp4"):
        raise StoreError(f"quantization method {method!r} is not one cadre can load (fp8, mxfp4)")
    for scale_key in [k for k in trunk if k.endswith(".weight_scale_inv")]:
        weight_key = scale_key.removesuffix("_scale_inv")
        trunk[weight_key] = dequantize_fp8(trunk[weight_key], trunk.pop(scale_key), dtype)
    del config.quantization_config


def keeps_own_router(block: torch.nn.Module, spec: RoutingSpec) -> bool:
    """Routers cadre leaves as transformers wrote them, since no mask can steer them: the
    "native" kind (ZAYA) and DeepSeek-V4's hash layers, whose experts come from a token-id table."""
    return spec.kind == "native" or hasattr(getattr(block, "gate", None), "tid2eid")


def install_router(block: torch.nn.Module, route_fn, spec: RoutingSpec) -> None:
    """Make the block's routing choose with `route_fn(logits, router, hidden_dtype, bias)`.

    The logits are computed exactly as the family's router computes them (DeepSeek's and
    GLM's in float32, gpt-oss's with its bias, Granite's cast to float32 after the
    product), so `exact` routing reproduces transformers' choices bit for bit. What the
    router returns, and in which order, differs between families and transformers
    versions ((logits, weights, indices) mostly; Granite 5.17 (indices, weights, logits);
    Jamba 5.17 a plain linear whose logits the block routes in `route_tokens_to_experts`):
    the order is read once from the family's own code on a probe input and kept. LFM2
    hands its router the block's expert bias as an argument; it is passed on as the bias."""
    router = router_of(block)
    logits_of = _logits_fn(spec)
    hidden = router.weight.shape[-1]
    probe = torch.zeros(2, hidden, dtype=router.weight.dtype, device=router.weight.device)  # [2,H]
    # a bias the block hands its router: LFM2's expert_bias, MiniMax-M2's e_score_correction_bias
    bias = getattr(block, "expert_bias", None)
    if bias is None:
        bias = getattr(block, "e_score_correction_bias", None)
    with torch.no_grad():
        try:
            probed = router(probe, bias) if bias is not None else router(probe)
        except ValueError:  # AFMoE's router unpacks [B,S,H] hidden states
            probed = router(probe[None], bias) if bias is not None else router(probe[None])
    if torch.is_tensor(probed):  # a plain linear router: the block routes its logits
        _install_block_routing(block, router, route_fn, probe, probed)
        return
    order = _output_order(probed, spec.num_experts)

    def forward(self, hidden_states, expert_bias=None):
        logits = logits_of(self, hidden_states.reshape(-1, hidden))  # [T,E]
        weights, indices = route_fn(logits, self, hidden_states.dtype, expert_bias)
        named = {"logits": logits, "weights": weights, "indices": indices}
        return tuple(named[name] for name in order)

    router.forward = types.MethodType(forward, router)


def _logits_fn(spec: RoutingSpec):
    in_float32 = spec.logits == "float32_out" or \
        spec.kind in ("sigmoid_group_topk", "softmax_group_topk", "softmax_bias_topk") or \
        (spec.kind == "softmax_topk" and spec.weights_in_hidden_dtype)  # Lara-Mini
    # Granite, Flint, Laguna: F.linear(...).float(); Laguna may soft-cap them after
    float_after = spec.kind == "sigmoid_sorted_topk" or (spec.kind == "topk_softmax" and spec.weights_in_hidden_dtype)
    cap = spec.logit_softcap

    def logits_of(router, hidden_states):  # [T,H] -> [T,E]
        if spec.logits == "float32_out" and hidden_states.is_cuda and hidden_states.dtype == router.weight.dtype \
                and not torch.is_grad_enabled():
            # Kolibri's own CUDA branch (torch >= 2.8, as cadre's pins are): a GEMM in the model dtype
            # accumulated into float32, which differs from the float32 GEMM in the last bits
            return torch.mm(hidden_states, router.weight.t(), out_dtype=torch.float32)
        if in_float32:
            return F.linear(hidden_states.type(torch.float32), router.weight.type(torch.float32))
        # in the weight's dtype (a no-op but for HunYuan's float32 router under a bf16 model)
        logits = F.linear(hidden_states.to(router.weight.dtype), router.weight, getattr(router, "bias", None))
        logits = logits.float() if float_after else logits
        return torch.tanh(logits / cap) * cap if cap > 0 else logits

    return logits_of


def _output_order(outputs, num_experts: int) -> tuple[str, ...]:
    """Names of a routing output tuple's items: integer [T,K] indices, [T,E] logits, [T,K] weights."""
    def name(item):
        if not item.is_floating_point():
            return "indices"
        return "logits" if item.shape[-1] == num_experts else "weights"

    order = tuple(name(item) for item in outputs)
    assert sorted(order) in (["indices", "logits", "weights"], ["indices", "weights"]), order
    return order


def _install_block_routing(block, router, route_fn, probe, probe_logits) -> None:
    if not hasattr(block, "route_tokens_to_experts"):
        raise StoreError(f"{type(block).__name__}: its router returns logits but the block has no "
                         "route_tokens_to_experts to route them")
    with torch.no_grad():
        order = _output_order(block.route_tokens_to_experts(probe, probe_logits), router.weight.shape[0])

    def route_tokens_to_experts(hidden_states, router_logits):
        weights, indices = route_fn(router_logits, router, hidden_states.dtype, None)
        named = {"weights": weights, "indices": indices}
        return tuple(named[name] for name in order)

    block.route_tokens_to_experts = route_tokens_to_experts


def cache_keyword(model) -> str:
    """The forward's KV-cache keyword: `cache` since transformers renamed it (5.2x), where
    `past_key_values` warns and goes in 5.40; `past_key_values` on the versions before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_of(output):
    """The KV cache a forward returned, under either name (see cache_keyword)."""
    return next(value for key, value in output.items() if key in ("cache", "past_key_values"))
