"""Where a model keeps its routed experts, read from transformers' own description of it.

The model is built from config.json on the meta device (nothing is allocated), and its
routed-experts modules are the ones `@use_experts_implementation` decorated: each
carries `is_concatenated`, `is_transposed`, `has_bias`, `has_gate`. Transformers'
conversion mapping (the renamings and converters `from_pretrained` applies to checkpoint
keys, transformers/conversion_mapping.py) then says which checkpoint key fills which
fused parameter, and how:

  per-expert keys  `...experts.E.<gate>.weight`, `...experts.E.<up>.weight`, merged over E
                   (MergeModulelist) and concatenated gate-then-up (Concatenate(dim=1)):
                   each key already is one expert's [out, in] matrix
  fused 3D keys    `...experts.gate_up_proj` etc. in the module's own layout, or with dims
                   1 and 2 swapped (a converter with Transpose(1, 2))

Any other conversion op on an experts parameter is a layout cadre does not know, and the
checkpoint is refused naming it. Quantisation companions ride on the key they scale:
`<weight>_scale_inv` (FP8 block scales) and `<param>_blocks` / `<param>_scales` (MXFP4).

The functions used here (`get_model_conversion_mapping`, `rename_source_key`, the
converters' `operations`) are not documented API: TESTED_TRANSFORMERS pins the versions
they were checked on, and `check_transformers` refuses others with one line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ExtractError

# transformers versions whose conversion-mapping internals this module was checked on
TESTED_TRANSFORMERS = ("5.17", "5.18", "5.19", "5.20", "5.21", "5.22", "5.23", "5.24")
# quantisation companions: suffix of the checkpoint key -> suffix of the key it scales
QUANT_SUFFIXES = {"_scale_inv": "", "_blocks": "", "_scales": ""}
EXPERT_PARAMS = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class Site:
    """One routed-experts module of the model."""

    layer: int
    path: str  # module path in the model, e.g. "model.layers.3.mlp.experts"
    num_experts: int
    hidden: int
    intermediate: int
    concatenated: bool  # gate rows then up rows (False: interleaved gate0, up0, gate1, ...)
    transposed: bool  # parameters are [E, in, out] instead of [E, out, in]
    bias: bool


@dataclass(frozen=True)
class Role:
    """What one checkpoint key is to the routed experts."""

    site: Site
    param: str  # one of EXPERT_PARAMS
    expert: int | None  # per-expert key: its expert id; None: a fused [E, ...] tensor
    part: int | None  # per-expert gate/up sources: 0 gate, 1 up; None: the whole parameter
    swapped: bool  # fused key stored with dims 1 and 2 swapped against the module
    suffix: str  # "" or a quantisation companion ("_scale_inv", "_blocks", "_scales")


@dataclass(frozen=True)
class Layout:
    model_type: str
    sites: dict[int, Site]  # layer -> its routed-experts module
    _renamings: tuple
    _converters: tuple
    _base_prefix: str
    _params: dict  # every parameter/buffer name of the meta model (transformers' prefix test reads it)
    # the model's `_keep_in_fp32_modules_strict` (its submodules' included): name patterns whose
    # tensors transformers loads in float32 whatever dtype is asked for (DeepSeek's gate.weight)
    keep_fp32: tuple[str, ...] = ()

    def role(self, key: str) -> Role | None:
        """The key's role among the routed experts, None for a trunk key; ExtractError for a
        key inside an experts module that cadre cannot place."""
        suffix = next((s for s in QUANT_SUFFIXES if key.endswith(s)), "")
        base = key[: len(key) - len(suffix)] if suffix else key
        target, converter, pattern = self._rename(base)
        site, param = self._site_of(target)
        if site is None:
            return None
        if param not in EXPERT_PARAMS:
            raise ExtractError(f"'{key}' sits in the routed experts as '{param}', which cadre does not know")
        return _role(site, param, key, converter, pattern, suffix)

    def keeps_fp32(self, key: str) -> bool:
        """Whether transformers loads this trunk key in float32 whatever dtype is asked for: one of
        the model's strict fp32 patterns in the key as renamed (where transformers matches it) or
        as stored."""
        if not self.keep_fp32:
            return False
        target = self._rename(key)[0]
        return any(pattern in target or pattern in key for pattern in self.keep_fp32)

    def _rename(self, key: str):
        from transformers.core_model_loading import rename_source_key

        target, pattern = rename_source_key(key, list(self._renamings), list(self._converters),
                                            self._base_prefix, self._params)
        if pattern is None:
            return target, None, None
        converter = next(c for c in self._converters if pattern in c.source_patterns)
        return target, converter, pattern

    def _site_of(self, target: str) -> tuple[Site | None, str]:
        match = _LAYER.search(target)
        site = self.sites.get(int(match[1])) if match else None
        if site is None or not target.startswith(site.path + "."):
            return None, ""
        return site, target[len(site.path) + 1:]


def _role(site: Site, param: str, key: str, converter, pattern: str | None, suffix: str) -> Role:
    ops = [type(op).__name__ for op in converter.operations] if converter is not None else []
    if pattern is not None and "*" in pattern:
        if ops[:1] != ["MergeModulelist"] or any(op not in ("MergeModulelist", "Concatenate", "Transpose") for op in ops):
            raise ExtractError(f"'{key}': transformers builds '{param}' with {ops}, a layout cadre does not know")
        # the source pattern is a regex to transformers (Kimi-Linear's are written as ones:
        # r"\.experts.*.w1.weight"), its "*" the expert index
        expert = int(re.search(pattern.replace("*", r"(\d+)"), key)[1])
        many = len(converter.source_patterns) > 1
        part = converter.source_patterns.index(pattern) if many else None
        if many and (ops[1:2] != ["Concatenate"] or len(converter.source_patterns) != 2):
            raise ExtractError(f"'{key}': transformers merges {converter.source_patterns} with {ops}, "
                               "not gate-then-up concatenation")
        return Role(site, param, expert, part, swapped=False, suffix=suffix)
    if ops not in ([], ["Transpose"]):
        raise ExtractError(f"'{key}': transformers converts '{param}' with {ops}, a layout cadre does not know")
    return Role(site, param, None, None, swapped=ops == ["Transpose"], suffix=suffix)


def check_transformers() -> None:
    import transformers

    version = ".".join(transformers.__version__.split(".")[:2])
    if version not in TESTED_TRANSFORMERS:
        raise ExtractError(f"transformers {transformers.__version__} is not one cadre's layout reader was tested "
                           f"on ({', '.join(TESTED_TRANSFORMERS)})")


def describe(config) -> Layout:
    """The layout of a model built from `config` (a transformers PretrainedConfig)."""
    check_transformers()
    model = meta_model(config)
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter

    transforms = get_model_conversion_mapping(model)
    sites = {}
    for path, module in model.named_modules():
        if not hasattr(module, "is_concatenated"):
            continue
        site = _site(path, module)
        if site.layer in sites:
            raise ExtractError(f"{config.model_type}: two routed-experts modules in layer {site.layer}")
        sites[site.layer] = site
    if not sites:
        raise ExtractError(f"{config.model_type}: not an MoE model: transformers builds it without a routed-experts "
                           "module (@use_experts_implementation)")
    return Layout(
        model_type=config.model_type, sites=sites,
        _renamings=tuple(t for t in transforms if not isinstance(t, WeightConverter)),
        _converters=tuple(t for t in transforms if isinstance(t, WeightConverter)),
        _base_prefix=model.base_model_prefix,
        _params=dict.fromkeys((name for name, _ in [*model.named_parameters(), *model.named_buffers()]), True),
        keep_fp32=tuple(sorted(getattr(model, "_keep_in_fp32_modules_strict", None) or ())),
    )


def meta_model(config):
    """transformers' causal-LM model for `config`, on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # transformers raises ValueError, KeyError, ImportError... for configs it cannot build
        if "Unrecognized configuration class" in str(exc):
            raise ExtractError(f"transformers has no causal-LM class for model_type '{config.model_type}' "
                               "(a multimodal wrapper: cadre serves text MoE models)") from None
        raise ExtractError(f"transformers cannot build a causal LM for model_type "
                           f"'{config.model_type}': {type(exc).__name__}: {one_line(exc)}") from None


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's message on one line (transformers' often span several)."""
    return " ".join(str(exc).split())[:limit]


def _site(path: str, module) -> Site:
    match = _LAYER.search(path + ".")
    if match is None:
        raise ExtractError(f"routed-experts module '{path}' is not inside a numbered layer")
    if not module.has_gate:
        raise ExtractError(f"{type(module).__name__}: experts without a gate projection (up/down only) are not supported")
    if getattr(module, "has_post_expert_norm", False):
        raise ExtractError(f"{type(module).__name__}: experts with a norm after each expert are not supported")
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    if gate_up is None or down is None or gate_up.dim() != 3:
        raise ExtractError(f"{type(module).__name__}: no fused gate_up_proj/down_proj parameters")
    num_experts, a, b = gate_up.shape
    out, inp = (b, a) if module.is_transposed else (a, b)  # [E, 2I, H] or transposed [E, H, 2I]
    return Site(layer=int(match[1]), path=path, num_experts=num_experts, hidden=inp, intermediate=out // 2,
                concatenated=module.is_concatenated, transposed=module.is_transposed, bias=module.has_bias)
