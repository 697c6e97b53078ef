"""MoE families as data: one table row per family, no per-family code paths.

A row says where a family keeps its routed experts in a checkpoint, what it calls the
three projections, which config keys hold expert count and top-k, and how its router
turns logits into expert choices (the runtime and router read `routing`).

Adding a family is adding a row. Families nested inside a larger model (a multimodal
"thinker" wrapping a text MoE) are rows too: `config_path` says where the text config
sits inside config.json, and expert keys may carry any prefix before `layers.`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

STORE_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class FamilyError(ValueError):
    """The checkpoint's config does not describe a supported MoE model."""


@dataclass(frozen=True)
class Family:
    name: str
    # checkpoint module that holds `experts` in each decoder layer
    container: str = "mlp"
    # module that holds `experts` in fused 3D checkpoints (transformers renames some
    # families on load, e.g. Mixtral's block_sparse_moe -> mlp); None: same as container
    fused_container: str | None = None
    # checkpoint names of (gate, up, down) in per-expert keys
    projections: tuple[str, str, str] = STORE_PROJECTIONS
    # the only prefix routed-expert keys may carry before `layers.` (None: any), so a
    # multimodal checkpoint's other MoE towers stay in the trunk instead of colliding
    key_prefix: str | None = None
    # trunk tensors (key suffixes) that --dtype leaves in their source dtype, because
    # transformers keeps them in float32 whatever the model dtype
    # (`_keep_in_fp32_modules_strict`)
    keep_fp32: tuple[str, ...] = ()
    num_experts_keys: tuple[str, ...] = ("num_experts", "num_local_experts")
    top_k_key: str = "num_experts_per_tok"
    # "softmax_topk": softmax over logits, top-k, renormalise if `renormalize` says so.
    # "sigmoid_group_topk": DeepSeek-V3 (sigmoid + correction bias + group-limited
    # top-k + routed scaling factor).
    routing: str = "softmax_topk"
    # config key (bool) that turns renormalisation on, or True/False when fixed
    renormalize: str | bool = "norm_topk_prob"
    # keys into config.json leading to the text model's config ((): the top level)
    config_path: tuple[str, ...] = ()
    # the transformers model_type to build the text model with (defaults to name)
    text_model_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def _prefix_regex(self) -> str:
        return "(?:.*\\.)?" if self.key_prefix is None else re.escape(self.key_prefix)

    def expert_key_pattern(self) -> re.Pattern:
        """Per-expert key: PREFIX layers.L.CONTAINER.experts.E.PROJ.weight."""
        projs = "|".join(map(re.escape, self.projections))
        return re.compile(
            rf"^(?P<prefix>{self._prefix_regex()})layers\.(?P<layer>\d+)\.{re.escape(self.container)}"
            rf"\.experts\.(?P<expert>\d+)\.(?P<proj>{projs})\.weight$"
        )

    def fused_key_pattern(self) -> re.Pattern:
        """Fused 3D keys: PREFIX layers.L.CONTAINER.experts.{gate_up_proj [E,2I,H] | down_proj [E,H,I]}."""
        container = self.fused_container or self.container
        return re.compile(
            rf"^(?P<prefix>{self._prefix_regex()})layers\.(?P<layer>\d+)\.{re.escape(container)}"
            rf"\.experts\.(?P<proj>gate_up_proj|down_proj)$"
        )

    def experts_namespace_pattern(self) -> re.Pattern:
        """Any key under a routed-experts module; one that neither pattern above matches
        (quantisation scales, biases) is a layout the store cannot hold."""
        containers = {self.container, self.fused_container or self.container}
        alternatives = "|".join(map(re.escape, sorted(containers)))
        return re.compile(rf"^{self._prefix_regex()}layers\.\d+\.(?:{alternatives})\.experts\.")

    def store_projection(self, checkpoint_name: str) -> str:
        return STORE_PROJECTIONS[self.projections.index(checkpoint_name)]


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("qwen3_moe"),
        Family("qwen2_moe"),  # shared_expert + shared_expert_gate stay in the trunk
        Family("olmoe"),
        Family(
            "mixtral", container="block_sparse_moe", fused_container="mlp",
            projections=("w1", "w3", "w2"), renormalize=True,
        ),
        Family(
            "deepseek_v3",
            num_experts_keys=("n_routed_experts", "num_local_experts"),
            routing="sigmoid_group_topk",
            keep_fp32=("e_score_correction_bias",),
        ),
        # Qwen3-Omni-MoE: a thinker wrapping a Qwen3-MoE-style text model
        Family(
            "qwen3_omni_moe",
            config_path=("thinker_config", "text_config"),
            text_model_type="qwen3_moe",
            key_prefix="thinker.model.",
        ),
    )
}


def text_config(config: dict, family: Family) -> dict:
    """The (possibly nested) text-model section of config.json."""
    section = config
    for key in family.config_path:
        if not isinstance(section, dict) or key not in section:
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
        raise FamilyError(f"unknown or non-MoE model_type '{model_type}' (supported: {supported})")
    return family


def num_experts(config: dict, family: Family) -> int:
    section = text_config(config, family)
    for key in family.num_experts_keys:
        value = section.get(key)
        if isinstance(value, int) and value > 0:
            return value
    raise FamilyError(f"config is not an MoE model: none of {family.num_experts_keys} is a positive integer")


def top_k(config: dict, family: Family) -> int:
    value = text_config(config, family).get(family.top_k_key)
    if not isinstance(value, int) or value <= 0:
        raise FamilyError(f"config is not an MoE model: '{family.top_k_key}' is missing or not positive")
    return value


def renormalizes(config: dict, family: Family) -> bool:
    if isinstance(family.renormalize, bool):
        return family.renormalize
    return bool(text_config(config, family).get(family.renormalize, False))
