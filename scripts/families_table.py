"""Print docs/families.md's table: every transformers MoE family with the experts interface.

    python scripts/families_table.py > /tmp/table.md

For each model whose modeling file decorates an experts class with
@use_experts_implementation, in the installed transformers: build it from its default
config on the meta device and ask cadre's layout reader (extractor/layout.py) about it,
then look its model_type up in cadre's routing table (extractor/families.py). A family
with a routing row and a parity test is "supported"; one the layout reader refuses is
"refused" with its one-line reason; the rest are "untested".
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import transformers  # noqa: E402
from transformers import AutoConfig  # noqa: E402

from extractor.errors import ExtractError  # noqa: E402
from extractor.families import FAMILIES  # noqa: E402
from extractor.layout import describe  # noqa: E402

PARITY = "tests/test_runtime_parity.py"
TESTS = {
    "qwen3_moe": PARITY, "qwen2_moe": PARITY, "mixtral": PARITY, "olmoe": PARITY, "deepseek_v3": PARITY,
    "glm4_moe": PARITY, "gpt_oss": PARITY, "deepseek_v2": PARITY, "phimoe": PARITY, "granitemoe": PARITY,
    "minimax": PARITY, "qwen3_next": PARITY, "jamba": PARITY, "lfm2_moe": PARITY,
    "flex_olmo": PARITY, "granitemoeshared": PARITY, "granitemoehybrid": PARITY, "glm4_moe_lite": PARITY,
    "exaone_moe": PARITY, "ernie4_5_moe": PARITY, "deepseek_v32": PARITY, "dots1": PARITY, "kimi_linear": PARITY,
    "minimax_m2": PARITY, "cohere2_moe": PARITY + ", tests/test_routing_selection_fn.py",
    "hunyuan_v1_moe": PARITY, "axk1": PARITY, "bailing_hybrid": PARITY,
    "glm_moe_dsa": PARITY, "hy_v4": PARITY, "hy_v3": PARITY, "granitemoe_swa": PARITY,
    "flint": PARITY, "laguna": PARITY, "mellum": PARITY, "solar_open": PARITY, "mimo_v2_flash": PARITY,
    "lara_mini": PARITY + ", tests/test_bf16_router_dtypes.py",
    "afmoe": PARITY + ", tests/test_router_family_variants.py, tests/test_bf16_router_dtypes.py",
    "kolibri1": PARITY + ", tests/test_router_family_variants.py, tests/test_bf16_router_dtypes.py",
    "axk2": PARITY + ", tests/test_router_family_variants.py",
    "beam": PARITY + ", tests/test_router_family_variants.py",
    "deepseek_v4": PARITY + ", tests/test_router_family_variants.py, tests/test_bf16_router_dtypes.py",
    "zaya": PARITY + ", tests/test_router_family_variants.py",
    "dots3_note": "tests/test_multimodal_text_model.py (its text model; dots3_note_text: " + PARITY
                  + ", tests/test_memory_plan.py)",
    "qwen4_exp": "tests/test_multimodal_text_model.py (its text model; qwen4_exp_text: " + PARITY + ")",
    "qwen3_5_moe": "tests/test_multimodal_text_model.py (its text model; qwen3_5_moe_text: " + PARITY + ")",
}
EXTRACTION_ONLY = {"qwen3_omni_moe": "its thinker extracts (tests/test_extract_families.py); not served: "
                                    "transformers has no causal-LM class for it"}


def tiny_or_default_config(model_type: str):
    """The parity tests' tiny config where there is one (some defaults do not build), else the default."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_models import FAMILY_CONFIGS, tiny_config, tiny_multimodal_config

    if model_type in FAMILY_CONFIGS:
        return tiny_config(model_type)
    if f"{model_type}_text" in FAMILY_CONFIGS and model_type in FAMILIES:  # a vision-language checkpoint
        # whose text model cadre serves
        return tiny_multimodal_config(model_type)
    return AutoConfig.for_model(model_type)


def decorated_families() -> list[str]:
    root = Path(transformers.__file__).parent / "models"
    found = []
    for path in sorted(root.glob("*/modeling_*.py")):
        if re.search(r"^@use_experts_implementation", path.read_text(), re.M):
            found.append(path.parent.name)
    return found


def declared_model_types(directory: str) -> list[str]:
    """The top-level model_types a model directory's configuration declares (not its towers')."""
    source = (Path(transformers.__file__).parent / "models" / directory / f"configuration_{directory}.py").read_text()
    towers = ("_text", "_vision", "_audio", "_encoder")
    return [t for t in re.findall(r'^\s+model_type = "([^"]+)"', source, re.M) if not t.endswith(towers)]


def row(model_type: str) -> str:
    if model_type in EXTRACTION_ONLY:
        return f"| {model_type} | extraction only | {EXTRACTION_ONLY[model_type]} |"
    try:
        config = tiny_or_default_config(model_type)
    except ValueError:  # a directory whose model_types are named otherwise (inkling: inkling_mm_model)
        declared = declared_model_types(model_type)
        if not declared:
            return f"| {model_type} | untested | no config class of that model_type |"
        config = AutoConfig.for_model(declared[0])
    try:
        layout = describe(config)
        site = next(iter(layout.sites.values()))
        shape = ("concatenated" if site.concatenated else "interleaved") + (", transposed" if site.transposed else "") \
            + (", biases" if site.bias else "")
    except ExtractError as exc:
        if "cannot build a causal LM" in str(exc):  # the default config is incomplete, not the family refused
            return f"| {model_type} | untested | its default config does not build (needs a real config.json) |"
        return f"| {model_type} | refused | {exc} |"
    if model_type in FAMILIES and model_type in TESTS:
        return f"| {model_type} | supported ({FAMILIES[model_type].routing}) | {shape}; {TESTS[model_type]} |"
    return f"| {model_type} | untested | layout read ({shape}); no routing row yet |"


def main() -> None:
    print(f"| model_type | status | layout / reason (transformers {transformers.__version__}) |")
    print("| --- | --- | --- |")
    for model_type in decorated_families():
        print(row(model_type))


if __name__ == "__main__":
    main()
