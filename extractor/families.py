"""MoE families as data: how each routes, plus the few exceptions to transformers' description.

Where a family keeps its routed experts, what its checkpoint keys are called and how they
are laid out (per-expert or fused, transposed, gate/up concatenated or interleaved,
biases) is read from transformers itself (layout.py). What transformers does not describe
is how a router picks experts, and cadre must reproduce that exactly while masking
experts the store lacks: so a row names the family's routing kind (router/exact.py
implements each) and the config keys it reads. A model_type without a row is refused at
extraction with one line; docs/families.md lists every transformers MoE family.

Routing kinds:
  softmax_topk        softmax over logits, top-k, renormalised if `renormalize` says so
  sigmoid_group_topk  DeepSeek-V3: sigmoid + correction bias + group-limited top-k + scaling
  softmax_group_topk  DeepSeek-V2: softmax, greedy or group-limited top-k, scaling, no renorm
  topk_softmax        top-k of the logits (router bias included), softmax over those k
  sigmoid_topk        LFM2-MoE: sigmoid, top-k of sigmoid + expert bias, renorm, scaling
  sparsemixer         PhiMoE: top-2 by sparsemixer's masked softmax (inference form)
  softmax_bias_topk   ERNIE 4.5: softmax, top-k of probabilities + correction bias, renorm
  sigmoid_bias_topk   MiniMax-M2: sigmoid, top-k of scores + the block's correction bias, renorm
  topk_sigmoid        top-k of the logits (+ correction bias: Kolibri), sigmoid over those k (Cohere2-MoE's
                      sigmoid selection: its row says topk_softmax and expert_selection_fn switches)
  sigmoid_sorted_topk Flint, Laguna, AFMoE: sigmoid, sorted top-k (+ correction bias), renorm, optional
                      soft-cap and scaling
  score_bias_topk     DeepSeek-V4: the config's score function, top-k of scores + correction bias, renorm,
                      scaling (its hash-routed layers keep transformers' router: experts by token id)
  native              transformers' own router, left in place, for a router cadre cannot mask (ZAYA's MLP
                      carrying state from layer to layer, with a "skip" class): exact, but a store must hold
                      every expert (the budget still holds only some of them on the device)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

STORE_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
ROUTING_KINDS = ("softmax_topk", "sigmoid_group_topk", "softmax_group_topk", "topk_softmax", "sigmoid_topk",
                 "sparsemixer", "softmax_bias_topk", "sigmoid_bias_topk", "topk_sigmoid",
                 "sigmoid_sorted_topk", "score_bias_topk", "native")


class FamilyError(ValueError):
    """The checkpoint's config does not describe a supported MoE model."""


@dataclass(frozen=True)
class Family:
    name: str
    routing: str = "softmax_topk"  # one of ROUTING_KINDS
    # config key (bool) that turns renormalisation on, or True/False when fixed
    renormalize: str | bool = "norm_topk_prob"
    # dtype of the routing weights the router returns: "logits" (the router logits'),
    # "float32" (Mixtral, MiniMax keep them in float32) or "hidden" (the hidden states')
    weights_dtype: str = "logits"
    # trunk tensors (key suffixes) that --dtype leaves in their source dtype, because
    # transformers keeps them in float32 whatever the model dtype
    # (`_keep_in_fp32_modules_strict`)
    keep_fp32: tuple[str, ...] = ()
    num_experts_keys: tuple[str, ...] = ("num_experts", "num_local_experts", "n_routed_experts")
    top_k_key: str = "num_experts_per_tok"
    # config key of the factor the router scales its weights by (HY-V3: router_scaling_factor);
    # None where the router does not scale (a block that scales its output does it itself)
    scaling_key: str | None = "routed_scaling_factor"
    # details of a routing kind that some families do differently (router/exact.py RoutingSpec)
    group_fill: float = float("-inf")  # the score of experts outside the chosen groups
    sorted_topk: bool = False  # group-limited top-ks sorted
    renorm_epsilon: float = 0.0  # added to the renormalising sum (sigmoid top-k kinds)
    logits: str = ""  # "" (the kind's dtype) | "float32_out" (float32; on CUDA a bf16 GEMM out in float32)
    # exceptions for a text model nested in a larger checkpoint (a multimodal "thinker"):
    # keys into config.json leading to the text config, the model_type to build it as, and
    # the key prefix of its tensors (stripped before transformers' renaming; other keys,
    # e.g. another tower's experts, stay in the trunk)
    config_path: tuple[str, ...] = ()
    text_model_type: str | None = None
    key_prefix: str = ""
    # key prefixes of a multimodal checkpoint's other towers: kept in the store's trunk, not loaded
    # into the text model cadre serves
    other_towers: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("qwen3_moe"),
        Family("qwen2_moe"),  # shared_expert + shared_expert_gate stay in the trunk
        Family("olmoe"),
        Family("mixtral", renormalize=True, weights_dtype="float32"),
        Family("deepseek_v3", routing="sigmoid_group_topk", keep_fp32=("e_score_correction_bias",)),
        # Qwen3-Omni-MoE: a thinker wrapping a Qwen3-MoE-style text model
        Family("qwen3_omni_moe", config_path=("thinker_config", "text_config"), text_model_type="qwen3_moe",
               key_prefix="thinker."),
        Family("glm4_moe", routing="sigmoid_group_topk", keep_fp32=("e_score_correction_bias",)),
        Family("gpt_oss", routing="topk_softmax", renormalize=False),
        Family("deepseek_v2", routing="softmax_group_topk", renormalize=False),
        Family("phimoe", routing="sparsemixer", renormalize=False),
        Family("granitemoe", routing="topk_softmax", renormalize=False, weights_dtype="hidden"),
        Family("minimax", renormalize=True, weights_dtype="float32"),
        Family("qwen3_next"),
        Family("jamba", renormalize=False),  # its logits are in the hidden dtype: "logits" is "hidden"
        Family("lfm2_moe", routing="sigmoid_topk", keep_fp32=("expert_bias",)),
        # routers textually identical to a family above (read in transformers 5.24, parity-tested)
        Family("flex_olmo"),  # OLMoE's
        Family("granitemoeshared", routing="topk_softmax", renormalize=False, weights_dtype="hidden"),  # Granite's
        Family("granitemoehybrid", routing="topk_softmax", renormalize=False, weights_dtype="hidden"),  # Granite's
        Family("glm4_moe_lite", routing="sigmoid_group_topk", keep_fp32=("e_score_correction_bias",)),  # GLM-4-MoE's
        Family("exaone_moe", routing="sigmoid_group_topk", keep_fp32=("e_score_correction_bias",)),  # GLM-4-MoE's
        Family("deepseek_v32", routing="sigmoid_group_topk", keep_fp32=("e_score_correction_bias",)),  # V3's
        Family("dots1", routing="sigmoid_group_topk", keep_fp32=("e_score_correction_bias",)),  # DeepSeek-V3's
        Family("kimi_linear", routing="sigmoid_group_topk", renormalize="moe_renormalize",  # DeepSeek-V3's
               top_k_key="num_experts_per_token", keep_fp32=("e_score_correction_bias",)),
        Family("axk1", routing="sigmoid_group_topk", keep_fp32=("e_score_correction_bias",)),  # DeepSeek-V3's
        Family("bailing_hybrid", routing="sigmoid_group_topk", renormalize="moe_renormalize",  # as Kimi's
               top_k_key="num_experts_per_token", keep_fp32=("e_score_correction_bias",)),
        Family("glm_moe_dsa", routing="sigmoid_group_topk", keep_fp32=("e_score_correction_bias",)),  # V3's
        Family("hy_v4", routing="sigmoid_group_topk", keep_fp32=("e_score_correction_bias", "learnable_sink_param")),
        # HY-V3: DeepSeek-V3's routing without groups, its bias on the block, its own name for the scale
        Family("hy_v3", routing="sigmoid_group_topk", renormalize=True, keep_fp32=("expert_bias",),
               scaling_key="router_scaling_factor"),
        Family("granitemoe_swa", routing="topk_softmax", renormalize=False, weights_dtype="hidden"),  # Granite's
        Family("flint", routing="sigmoid_sorted_topk", keep_fp32=("softmax_offset",), scaling_key=None),
        # Laguna's block scales its output by moe_routed_scaling_factor, not its router
        Family("laguna", routing="sigmoid_sorted_topk", renormalize=True, weights_dtype="hidden", scaling_key=None),
        # AFMoE: Flint's kind on the block's expert bias, + 1e-20 in the renormalisation, times route_scale
        Family("afmoe", routing="sigmoid_sorted_topk", renormalize=True, renorm_epsilon=1e-20,
               scaling_key="route_scale"),
        # A.X-K2: DeepSeek-V3's, but the experts of unchosen groups score 0.0 (and no groups in its Light form)
        Family("axk2", routing="sigmoid_group_topk", group_fill=0.0),
        # Beam: DeepSeek-V3's with sorted top-ks; its block, not its router, scales by routed_scaling_factor
        Family("beam", routing="sigmoid_group_topk", sorted_topk=True, scaling_key=None),
        # Kolibri: top-k of float32 logits + correction bias, sigmoid of the chosen logits
        Family("kolibri1", routing="topk_sigmoid", logits="float32_out"),
        # DeepSeek-V4: scoring_func (sqrt(softplus)) on logits in the model dtype; hash_moe layers pick their
        # experts from a token-id table (tid2eid), so a store must hold every expert of those layers
        Family("deepseek_v4", routing="score_bias_topk", renormalize=True, renorm_epsilon=1e-20),
        # dots.note 3's text model: DeepSeek-V3's router; MLA with indexed layers and sliding layers of their own
        # head counts (per_layer_config)
        Family("dots3_note_text", routing="sigmoid_group_topk"),
        # dots.note 3 as published: vision and audio encoders (the vision one with experts of its own) beside
        # the text model at model.*; its config nests the text model, or keeps it at the top level
        Family("dots3_note", routing="sigmoid_group_topk", config_path=("text_config",),
               text_model_type="dots3_note_text", other_towers=("vision_encoder.", "audio_encoder.")),
        Family("zaya", routing="native"),  # top-1 of an MLP router's softmax + biases; the skip class weighs 0
        Family("mellum"),  # Qwen3-MoE's router
        Family("solar_open", routing="sigmoid_group_topk", keep_fp32=("e_score_correction_bias",)),  # GLM's
        Family("mimo_v2_flash", routing="sigmoid_group_topk", keep_fp32=("e_score_correction_bias",)),  # V3's
        Family("lara_mini", weights_dtype="hidden"),  # Qwen's, on float32 logits, weights in the hidden dtype
        Family("qwen4_exp_text"),  # Qwen3-Next's router
        Family("qwen4_exp", config_path=("text_config",), text_model_type="qwen4_exp_text",
               other_towers=("model.visual.",)),
        Family("qwen3_5_moe_text", renormalize=True),  # Qwen3.5-MoE's text model: always renormalised
        # Qwen3.5-MoE as published: a vision-language checkpoint; its text model is what cadre serves
        Family("qwen3_5_moe", renormalize=True, config_path=("text_config",), text_model_type="qwen3_5_moe_text",
               other_towers=("model.visual.",)),
        Family("minimax_m2", routing="sigmoid_bias_topk", renormalize=True, scaling_key=None),  # bias: the block's
        # HunYuan-MoE: Qwen's routing in float32 (its router is gate.wg), top-k per layer in moe_topk
        Family("hunyuan_v1_moe", renormalize=True, top_k_key="moe_topk", keep_fp32=("gate.wg.weight",)),
        Family("cohere2_moe", routing="topk_softmax", weights_dtype="hidden"),  # or topk_sigmoid, by its config
        # ERNIE 4.5: its config names the experts moe_num_experts / moe_k; the bias sits in gate.moe_statics
        Family("ernie4_5_moe", routing="softmax_bias_topk", renormalize=True, weights_dtype="hidden",
               keep_fp32=("e_score_correction_bias",), num_experts_keys=("moe_num_experts",), top_k_key="moe_k"),
    )
}


def text_config(config: dict, family: Family) -> dict:
    """The (possibly nested) text-model section of config.json."""
    section = config
    for key in family.config_path:
        if not isinstance(section, dict) or key not in section:
            if section is config and "num_hidden_layers" in config:
                return config  # a composite config that keeps its text model at the top level (dots.note 3)
            raise FamilyError(f"config has no '{'.'.join(family.config_path)}' section")
        section = section[key]
    return section


def detect_family(config: dict) -> Family:
    model_type = config.get("model_type")
    if model_type is None:
        raise FamilyError("config.json has no model_type")
    family = FAMILIES.get(model_type)
    if family is None:
        supported = ", ".join(sorted(FAMILIES))
        raise FamilyError(f"unknown or non-MoE model_type '{model_type}': cadre has no routing kind for it "
                          f"(supported: {supported}; see docs/families.md)")
    return family


def num_experts(config: dict, family: Family) -> int:
    section = text_config(config, family)
    for key in family.num_experts_keys:
        value = section.get(key)
        if isinstance(value, int) and value > 0:
            return value
    raise FamilyError(f"config is not an MoE model: none of {family.num_experts_keys} is a positive integer")


def top_k(config: dict, family: Family) -> int:
    value = per_layer_value(text_config(config, family).get(family.top_k_key))
    if not isinstance(value, int) or value <= 0:
        raise FamilyError(f"config is not an MoE model: '{family.top_k_key}' is missing or not positive")
    return value


def per_layer_value(value):
    """A config value given per layer (HunYuan's moe_topk: [8] * 32) as the one value all layers
    share; a list whose entries differ stays a list (and is refused by the caller)."""
    if isinstance(value, list) and value and all(item == value[0] for item in value):
        return value[0]
    return value


def renormalizes(config: dict, family: Family) -> bool:
    if isinstance(family.renormalize, bool):
        return family.renormalize
    return bool(text_config(config, family).get(family.renormalize, False))
