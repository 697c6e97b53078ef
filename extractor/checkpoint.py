"""A Hugging Face MoE checkpoint as a catalogue of byte ranges.

Opening one reads config.json and every safetensors header, never tensor data; the
model's layout as transformers describes it (layout.py) then sorts each tensor into a
routed-expert tensor (a per-expert key, or one expert's block of a fused 3D tensor) or
the trunk.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import ExtractError
from .families import Family, FamilyError, detect_family, text_config, top_k
from .formats import DENSE, FP8, MXFP4, MXFP4_BLOCK, expected_shapes, weight_format
from .layout import Layout, Role, describe, one_line
from .safetensors_format import SafetensorsFormatError, TensorInfo, read_header

INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# copied verbatim into the store when present: what transformers needs to rebuild the
# model skeleton, generate, and tokenize
COPIED_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
    "chat_template.jinja", "chat_template.json",
)


@dataclass(frozen=True)
class Piece:
    """One expert tensor: a contiguous block of one source file, and how to read it.

    `shape` is the block's; the stored tensor is the block with `select` (start, stop,
    step) taken along `out_axis` (output features) and that axis moved first. A plain
    piece (out_axis 0, no select) is copied byte for byte."""

    file: int  # index into Checkpoint.files
    begin: int
    nbytes: int
    dtype: str  # safetensors name
    shape: tuple[int, ...]
    out_axis: int = 0
    select: tuple[int, int, int] | None = None

    @property
    def is_plain(self) -> bool:
        return self.out_axis == 0 and self.select is None

    @property
    def out_shape(self) -> tuple[int, ...]:
        dims = list(self.shape)
        if self.select is not None:
            start, stop, step = self.select
            dims[self.out_axis] = len(range(start, stop, step))
        return (dims.pop(self.out_axis), *dims)

    def narrowed(self) -> "Piece":
        """A contiguous row range of an out-first block is itself a plain byte range."""
        if self.out_axis != 0 or self.select is None or self.select[2] != 1:
            return self
        start, stop, _ = self.select
        row = self.nbytes // self.shape[0]
        return Piece(self.file, self.begin + start * row, (stop - start) * row, self.dtype,
                     (stop - start, *self.shape[1:]))


@dataclass(frozen=True)
class TrunkTensor:
    file: int
    info: TensorInfo
    keep_fp32: bool = False  # transformers loads it in float32 at any dtype (Layout.keeps_fp32)


Expert = dict[str, Piece]  # shard tensor name ("gate_proj", "gate_proj_scale_inv", ...) -> piece


@dataclass(frozen=True)
class Checkpoint:
    root: Path
    config: dict
    config_sha256: str
    family: Family
    num_layers: int
    num_experts: int
    top_k: int
    files: list[Path]
    experts: dict[tuple[int, int], Expert]  # (layer, expert) -> its shard tensors
    trunk: list[TrunkTensor]  # every other tensor, in source order
    fused: bool
    weights: str  # formats.DENSE | FP8 | MXFP4
    bias: bool  # the experts have biases
    fp8_block: list[int] | None  # FP8 checkpoints: [rows, cols] per scale

    @property
    def moe_layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.experts})


def open_checkpoint(model_dir: str | Path) -> Checkpoint:
    root = Path(model_dir)
    if not root.is_dir():
        raise ExtractError(f"{root}: checkpoint directory not found")
    raw, config = _read_config(root / "config.json")
    family, k, n_layers = _describe(config, root / "config.json")
    layout = _layout(root, config, family)
    n_experts = _num_experts(layout, root)
    files, located = _catalogue(root)
    experts, trunk, fused = _classify(located, family, layout, files)
    if not experts:
        raise ExtractError(f"{root}: no routed-expert tensors for '{family.name}' (transformers expects them "
                           f"under {', '.join(site.path for site in list(layout.sites.values())[:2])}, ...)")
    weights, bias = _expert_format(experts, layout, root)
    block = _fp8_block(config, family, root) if weights == FP8 else None
    for (layer, expert), tensors in sorted(experts.items()):
        _check_expert(layer, expert, tensors, layout, n_layers, weights, bias, block, files)
    return Checkpoint(
        root=root, config=config, config_sha256=hashlib.sha256(raw).hexdigest(), family=family,
        num_layers=n_layers, num_experts=n_experts, top_k=k, files=files, experts=experts,
        trunk=trunk, fused=fused, weights=weights, bias=bias, fp8_block=block,
    )


def _read_config(path: Path) -> tuple[bytes, dict]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ExtractError(f"{path}: missing, not a Hugging Face checkpoint directory") from None
    except OSError as exc:
        raise ExtractError(f"{path}: unreadable ({exc.strerror})") from None
    try:
        config = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExtractError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ExtractError(f"{path}: not a JSON object")
    return raw, config


def _describe(config: dict, path: Path) -> tuple[Family, int, int]:
    try:
        family = detect_family(config)
        k = top_k(config, family)
        n_layers = text_config(config, family).get("num_hidden_layers")
    except FamilyError as exc:
        raise ExtractError(f"{path}: {exc}") from None
    if not isinstance(n_layers, int) or n_layers <= 0:
        raise ExtractError(f"{path}: num_hidden_layers is missing or not a positive integer")
    return family, k, n_layers


def _layout(root: Path, config: dict, family: Family) -> Layout:
    """transformers' description of the model's experts (its text model's, for a nested family)."""
    from transformers import AutoConfig

    try:
        if family.config_path:
            section = {k: v for k, v in text_config(config, family).items() if k != "model_type"}
            hf_config = AutoConfig.for_model(family.text_model_type, **section)
        else:
            hf_config = AutoConfig.from_pretrained(root)
    except Exception as exc:  # transformers' config classes raise many types on bad values
        raise ExtractError(f"{root / 'config.json'}: transformers cannot read it: {type(exc).__name__}: "
                           f"{one_line(exc)}") from None
    try:
        return describe(hf_config)
    except ExtractError as exc:
        raise ExtractError(f"{root / 'config.json'}: {exc}") from None


def _num_experts(layout: Layout, root: Path) -> int:
    counts = {site.num_experts for site in layout.sites.values()}
    if len(counts) != 1:
        raise ExtractError(f"{root}: MoE layers have different expert counts {sorted(counts)}")
    return counts.pop()


def _catalogue(root: Path) -> tuple[list[Path], list[tuple[int, TensorInfo]]]:
    """Source files and (file index, tensor) for every tensor the checkpoint names."""
    weight_map = _read_index(root / INDEX) if (root / INDEX).is_file() else None
    if weight_map is not None:
        names = sorted(set(weight_map.values()))
    elif (root / SINGLE_FILE).is_file():
        names = [SINGLE_FILE]
    else:
        raise ExtractError(f"{root}: no {SINGLE_FILE} or {INDEX} (only safetensors checkpoints are supported)")
    files = [root / name for name in names]
    located = []
    for index, path in enumerate(files):
        for info in _read_file_header(path):
            if weight_map is None or weight_map.get(info.name) == names[index]:
                located.append((index, info))
    if weight_map is not None and len(located) != len(weight_map):
        found = {info.name for _, info in located}
        absent = sorted(set(weight_map) - found)
        raise ExtractError(f"{root / INDEX}: {len(absent)} tensors are not in the shards it names, e.g. '{absent[0]}'")
    return files, located


def _read_index(path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_bytes())["weight_map"]
    except OSError as exc:
        raise ExtractError(f"{path}: unreadable ({exc.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ExtractError(f"{path}: not a safetensors index ({type(exc).__name__}: {exc})") from None
    if not isinstance(weight_map, dict) or not all(
        isinstance(v, str) and Path(v).name == v and v.endswith(".safetensors") for v in weight_map.values()
    ):
        raise ExtractError(f"{path}: weight_map must map tensor names to .safetensors files in the same directory")
    return weight_map


def _read_file_header(path: Path) -> list[TensorInfo]:
    try:
        return read_header(path)
    except FileNotFoundError:
        raise ExtractError(f"{path}: named by {INDEX} but missing") from None
    except OSError as exc:
        raise ExtractError(f"{path}: unreadable ({exc.strerror})") from None
    except SafetensorsFormatError as exc:
        raise ExtractError(f"{path}: corrupt safetensors file: {exc}") from None


def _classify(located, family: Family, layout: Layout, files: list[Path]) -> tuple[dict, list[TrunkTensor], bool]:
    experts: dict[tuple[int, int], Expert] = {}
    fused: dict[int, list[tuple[Role, int, TensorInfo]]] = {}
    trunk = []
    for file, info in located:
        role = None
        if info.name.startswith(family.key_prefix):
            try:
                role = layout.role(info.name[len(family.key_prefix):])
            except ExtractError as exc:
                raise ExtractError(f"{files[file]}: {exc}") from None
        if role is None:
            trunk.append(TrunkTensor(file, info, layout.keeps_fp32(info.name[len(family.key_prefix):])))
        elif role.expert is not None:
            for name, piece in _expert_pieces(role, Piece(file, info.begin, info.nbytes, info.dtype, info.shape)):
                experts.setdefault((role.site.layer, role.expert), {})[name] = piece
        else:
            fused.setdefault(role.site.layer, []).append((role, file, info))
    for layer, parts in sorted(fused.items()):
        if any(key[0] == layer for key in experts):
            raise ExtractError(f"{files[0].parent}: layer {layer} holds both per-expert and fused 3D expert tensors")
        for role, file, info in parts:
            experts.update(_split_fused(role, file, info, experts, files))
    return experts, trunk, bool(fused)


def _store_name(role: Role, part: int | None) -> str:
    """Shard tensor name: gate_proj / up_proj / down_proj, then the bias or scale suffix."""
    proj = "down_proj" if role.param.startswith("down_proj") else ("gate_proj", "up_proj")[part]
    bias = "_bias" if role.param.endswith("_bias") else ""
    scale = {"_scale_inv": "_scale_inv", "_scales": "_scales"}.get(role.suffix, "")
    return proj + bias + scale


def _expert_pieces(role: Role, block: Piece) -> list[tuple[str, Piece]]:
    """The shard tensors in one expert's block; gate_up blocks split along output features."""
    if role.param.startswith("down_proj"):
        return [(_store_name(role, None), block)]
    if role.part is not None:  # one of two per-expert sources: already gate or up
        return [(_store_name(role, role.part), block)]
    rows = block.shape[block.out_axis]
    if rows % 2:
        raise ExtractError(f"{role.site.path}.{role.param}: {rows} output rows cannot split into gate and up")
    half = rows // 2
    selects = ((0, half, 1), (half, rows, 1)) if role.site.concatenated else ((0, rows, 2), (1, rows, 2))
    return [(_store_name(role, part), replace(block, select=sel).narrowed()) for part, sel in enumerate(selects)]


def _out_axis(role: Role, ndim: int) -> int:
    """Axis of output features in one expert's block of a fused tensor.

    MXFP4 blocks and scales are output-first whatever the module's layout (transformers
    transposes after dequantising); biases are 1D; weights follow the module's layout,
    or the opposite when the checkpoint is stored swapped."""
    if role.suffix in ("_blocks", "_scales") or ndim == 1:
        return 0
    transposed = role.site.transposed != role.swapped
    return 1 if transposed else 0


def _split_fused(role: Role, file: int, info: TensorInfo, experts: dict, files: list[Path]) -> dict:
    """Every expert's pieces of one fused [E, ...] tensor: expert e's block is contiguous,
    so no 3D tensor is ever materialised."""
    if len(info.shape) < 2 or info.shape[0] != role.site.num_experts:
        raise ExtractError(f"{files[file]}: '{info.name}' {list(info.shape)} is not [{role.site.num_experts}, ...] "
                           "(one block per expert)")
    block_shape = tuple(info.shape[1:])
    size = info.nbytes // info.shape[0]
    out_axis = _out_axis(role, len(block_shape))
    pieces: dict[tuple[int, int], Expert] = {}
    for e in range(info.shape[0]):
        block = Piece(file, info.begin + e * size, size, info.dtype, block_shape, out_axis)
        target = pieces.setdefault((role.site.layer, e), dict(experts.get((role.site.layer, e), {})))
        target.update(_expert_pieces(role, block))
    return pieces


def _expert_format(experts: dict, layout: Layout, root: Path) -> tuple[str, bool]:
    formats = {weight_format({name: p.dtype for name, p in tensors.items()}) for tensors in experts.values()}
    if len(formats) != 1:
        raise ExtractError(f"{root}: experts mix weight formats {sorted(formats)}")
    biases = {any(name.endswith("_bias") for name in tensors) for tensors in experts.values()}
    return formats.pop(), any(biases)


def _fp8_block(config: dict, family: Family, root: Path) -> list[int]:
    quant = text_config(config, family).get("quantization_config") or config.get("quantization_config") or {}
    block = quant.get("weight_block_size")
    if quant.get("quant_method") != "fp8" or not (isinstance(block, list) and len(block) == 2):
        raise ExtractError(f"{root / 'config.json'}: experts carry FP8 scales but quantization_config is not "
                           "fp8 with a weight_block_size [rows, cols]")
    return [int(b) for b in block]


def _check_expert(layer: int, expert: int, tensors: Expert, layout: Layout, n_layers: int, weights: str,
                  bias: bool, block: list[int] | None, files) -> None:
    where = f"{files[0].parent}: expert {expert} of layer {layer}"
    site = layout.sites[layer]
    if layer >= n_layers or expert >= site.num_experts:
        raise ExtractError(f"{where} is outside the config's {n_layers} layers x {site.num_experts} experts")
    if weights == MXFP4 and (site.intermediate % MXFP4_BLOCK or site.hidden % MXFP4_BLOCK):
        raise ExtractError(f"{where}: MXFP4 experts need input features divisible by {MXFP4_BLOCK}; the config's "
                           f"are {site.hidden} (gate/up) and {site.intermediate} (down)")
    shapes = expected_shapes(weights, site.intermediate, site.hidden, block)
    wanted = [n for n in shapes if (not n.endswith("_bias") or bias)
              and (weights == FP8 or not n.endswith("_scale_inv")) and (weights == MXFP4 or not n.endswith("_scales"))]
    if set(tensors) != set(wanted):
        missing, extra = sorted(set(wanted) - set(tensors)), sorted(set(tensors) - set(wanted))
        raise ExtractError(f"{where}: lacks {missing}" if missing else f"{where}: unexpected {extra}")
    for name in wanted:
        if tensors[name].out_shape != shapes[name]:
            raise ExtractError(f"{where}: '{name}' is {list(tensors[name].out_shape)}, expected {list(shapes[name])}")
    projections = {tensors[p].dtype for p in ("gate_proj", "up_proj", "down_proj")}
    if len(projections) != 1:
        raise ExtractError(f"{where}: projections have different dtypes")
    if weights == DENSE and projections.pop() in ("U8", "F8_E4M3", "I8"):
        raise ExtractError(f"{where}: quantised weights without their scales")
