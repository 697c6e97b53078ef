"""What a model needs in memory, read off transformers' own model on the meta device.

    facts = facts_from_config(json.load(open("config.json")), torch.bfloat16)
    facts.trunk_bytes, facts.expert_bytes, facts.kv_bytes_per_token

The model is built on the meta device (shapes, no storage) from config.json, so any
family transformers runs is measured the same way: parameters under a module named
`experts` are routed experts, everything else is the trunk. The KV cost per token is
what transformers' cache actually holds, found by running the meta model on 2 and then
3 tokens and differencing the bytes of every tensor its cache keeps: per-head keys and
values for ordinary attention, the compressed latents for DeepSeek's MLA (transformers
5.17 and 5.24 both cache `kv_lora_rank + qk_rope_head_dim` per token, not the
decompressed heads), and nothing per token for recurrent layers, whose fixed state
shows up as the per-sequence constant instead.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from functools import lru_cache

import torch

from extractor.families import per_layer_value
from extractor.formats import DENSE

from .loading import cache_of

logger = logging.getLogger("cadre.plan")

LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "top_k")


class FootprintError(ValueError):
    """transformers cannot build the model this config describes."""


@dataclass(frozen=True)
class ModelFacts:
    """Sizes of one model in one compute dtype."""

    model_type: str
    itemsize: int  # bytes per element of the compute dtype
    trunk_bytes: int  # every parameter and buffer that is not a routed expert
    expert_bytes: int  # one routed expert (gate, up, down, biases) as a device slot holds it
    experts_present: dict[int, int]  # MoE layer -> routed experts available (the store's, or all)
    num_experts: int
    top_k: int
    kv_bytes_per_token: int  # every layer's cache entry for one more token
    kv_bytes_per_sequence: int  # fixed per-sequence cache state (recurrent layers), 0 for attention-only
    context: int  # max_position_embeddings
    hidden_size: int
    vocab_size: int
    num_heads: int
    head_dims: tuple[int, int]  # (key, value) per head, as attention reads them (MLA: decompressed)
    dense_intermediate: int  # largest dense MLP beside the experts (dense layers, shared experts), 0 if none
    expert_intermediate: int
    kv_measured: bool  # False: the meta forward failed and kv_bytes_per_token is the formula's
    host_entry_bytes: int = 0  # one expert in the pinned host tier (quantised stores: as stored); 0 = expert_bytes
    quantised_experts: bool = False  # dequantised on the device after each copy (models/quantised_fill.py)

    @property
    def host_bytes_per_expert(self) -> int:
        return self.host_entry_bytes or self.expert_bytes

    @property
    def moe_layers(self) -> list[int]:
        return sorted(self.experts_present)

    @property
    def total_experts(self) -> int:
        return sum(self.experts_present.values())

    @property
    def working_set(self) -> int:
        """Experts one token needs: its top-k in every MoE layer (capped at what the layer has)."""
        return sum(min(self.top_k, n) for n in self.experts_present.values())


def hf_config(config: dict):
    """transformers' config object for a config.json dict."""
    from transformers import AutoConfig

    fields = decode_special_floats(dict(config))
    model_type = fields.pop("model_type", None)
    if model_type is None:
        raise FootprintError("config.json has no model_type")
    try:
        return AutoConfig.for_model(model_type, **fields)
    except (KeyError, ValueError) as exc:
        raise FootprintError(f"transformers does not know model_type {model_type!r}: {exc}") from None


def decode_special_floats(value):
    """config.json as transformers writes it holds infinities and NaN as {"__float__": "Infinity"}
    (JSON has no such numbers; Granite-MoE-hybrid's time_step_limit is (0, inf)): back to floats,
    as transformers' own from_pretrained reads them."""
    if isinstance(value, dict):
        if set(value) == {"__float__"}:
            return float(value["__float__"])
        return {key: decode_special_floats(item) for key, item in value.items()}
    if isinstance(value, list):
        return [decode_special_floats(item) for item in value]
    return value


def facts_from_config(config: dict, dtype: torch.dtype) -> ModelFacts:
    """Facts for every routed expert of the model `config` (config.json as a dict) describes."""
    return _facts(json.dumps(config, sort_keys=True), dtype)


def facts_from_store(store, dtype: torch.dtype) -> ModelFacts:
    """Facts for an expert store: its experts present, the expert cache's slot size in `dtype`
    and what the host tier keeps per expert (models.cache measures both from the shards)."""
    from dataclasses import replace

    from .cache import host_entry_bytes, slot_bytes

    facts = facts_from_config(store.config, dtype)
    present = {layer: len(store.experts_present(layer)) for layer in store.moe_layers}
    return replace(facts, experts_present=present, num_experts=store.num_experts, top_k=store.top_k,
                   expert_bytes=slot_bytes(store, dtype), host_entry_bytes=host_entry_bytes(store, dtype),
                   quantised_experts=store.expert_format["weights"] != DENSE)


@lru_cache(maxsize=16)
def _facts(config_json: str, dtype: torch.dtype) -> ModelFacts:
    config = hf_config(json.loads(config_json))
    model = _meta_model(config)
    text = config.get_text_config()
    trunk, routed = _split_parameters(model)
    if not routed:
        raise FootprintError(f"{config.model_type}: {type(model).__name__} has no routed experts (no module named "
                             "'experts'): not a Mixture-of-Experts model")
    num_experts = max(count for _, count in routed.values())
    expert_elements = max(elements // count for elements, count in routed.values())
    per_token, per_sequence, measured = _kv_cost(model, text)
    return ModelFacts(
        model_type=config.model_type, itemsize=dtype.itemsize, trunk_bytes=trunk * dtype.itemsize,
        expert_bytes=expert_elements * dtype.itemsize,
        experts_present={layer: count for layer, (_, count) in sorted(routed.items())}, num_experts=num_experts,
        top_k=_top_k(text), kv_bytes_per_token=per_token * dtype.itemsize,
        kv_bytes_per_sequence=per_sequence * dtype.itemsize,
        context=int(getattr(text, "max_position_embeddings", 0) or 0) or 2048,
        hidden_size=text.hidden_size, vocab_size=text.vocab_size,
        num_heads=max(layer.num_attention_heads for layer in _layer_configs(text)),
        head_dims=tuple(max(dims) for dims in zip(*map(_head_dims, _layer_configs(text)))),
        dense_intermediate=_dense_intermediate(text),
        expert_intermediate=expert_elements // (3 * text.hidden_size), kv_measured=measured,
    )


def _meta_model(config):
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            # bfloat16: the meta kernel of grouped_mm (the experts' default path) takes only bf16;
            # sizes are counted in elements and scaled to the compute dtype afterwards
            return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    except Exception as exc:  # noqa: BLE001 - any failure means the model cannot be planned
        raise FootprintError(f"{config.model_type}: transformers cannot build the model: {exc}") from None


def _split_parameters(model) -> tuple[int, dict[int, tuple[int, int]]]:
    """(trunk elements, {layer: (routed-expert elements, experts)}); tied weights counted once."""
    routed: dict[int, tuple[int, int]] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        match = LAYER_INDEX.search(f".{name}")
        params = list(module.parameters())
        if name.rsplit(".", 1)[-1] != "experts" or match is None or not params:
            continue
        routed[int(match[1])] = (sum(p.numel() for p in params), _experts_in(module, params))
        seen.update(id(p) for p in params)
    trunk = sum(p.numel() for p in model.parameters() if id(p) not in seen)
    trunk += sum(b.numel() for b in model.buffers())
    return trunk, routed


def _experts_in(module, params) -> int:
    """Experts of one experts module: fused [E, ...] tensors (transformers 5) or a ModuleList."""
    if isinstance(module, torch.nn.ModuleList):
        return len(module)
    return int(max(p.shape[0] for p in params if p.dim() == 3))


def _kv_cost(model, text) -> tuple[int, int, bool]:
    """(elements per token, elements per sequence, measured?) of transformers' cache for this model."""
    try:
        two, three = (_cache_elements(model, tokens) for tokens in (2, 3))
    except Exception as exc:  # noqa: BLE001 - a family whose forward will not run on meta: use the formula
        logger.warning("%s: cannot measure the KV cache on the meta device (%s); sizing it from the config",
                       text.model_type, exc)
        return _kv_formula(text), 0, False
    per_token = three - two
    return per_token, two - 2 * per_token, True


def _cache_elements(model, tokens: int) -> int:
    ids = torch.zeros((1, tokens), dtype=torch.long, device="meta")
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    cache = cache_of(out)
    return sum(_tensor_elements(layer) for layer in getattr(cache, "layers", [cache]))


def _tensor_elements(holder) -> int:
    values = vars(holder).values()
    return sum(v.numel() for v in values if isinstance(v, torch.Tensor)) + sum(
        t.numel() for v in values if isinstance(v, (list, tuple)) for t in v if isinstance(t, torch.Tensor))


def _kv_formula(text) -> int:
    """Keys and values of every layer: what transformers caches for plain or grouped-query attention,
    and the compressed latents for MLA."""
    return sum(map(_kv_of_layer, _layer_configs(text)))


def _kv_of_layer(layer) -> int:
    if getattr(layer, "kv_lora_rank", None):
        return layer.kv_lora_rank + layer.qk_rope_head_dim
    heads = getattr(layer, "num_key_value_heads", None) or layer.num_attention_heads
    return 2 * heads * _head_dims(layer)[0]


def _layer_configs(text) -> list:
    """One config per layer: a heterogeneous config's own (dots.note 3's sliding layers have their
    own head counts, and transformers refuses to read those attributes globally), else the config
    itself for every layer."""
    if getattr(text, "is_heterogeneous", False):
        return list(text.per_layer_config)
    return [text] * text.num_hidden_layers


def _top_k(text) -> int:
    for key in TOP_K_KEYS:
        value = per_layer_value(getattr(text, key, None))
        if isinstance(value, int) and value > 0:
            return value
    raise FootprintError(f"{text.model_type}: config names no experts-per-token count ({', '.join(TOP_K_KEYS)})")


def _head_dims(text) -> tuple[int, int]:
    if getattr(text, "kv_lora_rank", None):  # MLA: attention reads decompressed per-head keys and values
        return text.qk_nope_head_dim + text.qk_rope_head_dim, text.v_head_dim
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return head_dim, head_dim


def _dense_intermediate(text) -> int:
    sizes = [getattr(text, key, 0) or 0 for key in ("intermediate_size", "shared_expert_intermediate_size")]
    shared = (getattr(text, "n_shared_experts", 0) or 0) * (getattr(text, "moe_intermediate_size", 0) or 0)
    return max(*sizes, shared)
