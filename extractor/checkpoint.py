"""A Hugging Face MoE checkpoint as a catalogue of byte ranges.

Opening one reads config.json and every safetensors header, never tensor data; the
family row (families.py) then sorts each tensor into a routed-expert projection (a
per-expert key, or one expert's rows of a fused 3D tensor) or the trunk.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import ExtractError
from .families import STORE_PROJECTIONS, Family, FamilyError, detect_family, num_experts, text_config, top_k
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
    """One expert projection, [out, in]: a contiguous byte range of one source file."""

    file: int  # index into Checkpoint.files
    begin: int
    nbytes: int
    dtype: str  # safetensors name
    shape: tuple[int, ...]


@dataclass(frozen=True)
class TrunkTensor:
    file: int
    info: TensorInfo


Expert = dict[str, Piece]  # store projection name ("gate_proj", ...) -> piece


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
    experts: dict[tuple[int, int], Expert]  # (layer, expert) -> its three projections
    trunk: list[TrunkTensor]  # every other tensor, in source order
    fused: bool

    @property
    def moe_layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.experts})


def open_checkpoint(model_dir: str | Path) -> Checkpoint:
    root = Path(model_dir)
    if not root.is_dir():
        raise ExtractError(f"{root}: checkpoint directory not found")
    raw, config = _read_config(root / "config.json")
    family, n_experts, k, n_layers = _describe(config, root / "config.json")
    files, located = _catalogue(root)
    experts, trunk, fused = _classify(located, family, files)
    for (layer, expert), projections in sorted(experts.items()):
        _check_expert(layer, expert, projections, n_experts, n_layers, files)
    if not experts:
        pattern = family.expert_key_pattern().pattern
        raise ExtractError(f"{root}: no routed-expert tensors for family '{family.name}' (keys like {pattern})")
    return Checkpoint(
        root=root, config=config, config_sha256=hashlib.sha256(raw).hexdigest(), family=family,
        num_layers=n_layers, num_experts=n_experts, top_k=k, files=files, experts=experts,
        trunk=trunk, fused=fused,
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


def _describe(config: dict, path: Path) -> tuple[Family, int, int, int]:
    try:
        family = detect_family(config)
        n_experts, k = num_experts(config, family), top_k(config, family)
        n_layers = text_config(config, family).get("num_hidden_layers")
    except FamilyError as exc:
        raise ExtractError(f"{path}: {exc}") from None
    if not isinstance(n_layers, int) or n_layers <= 0:
        raise ExtractError(f"{path}: num_hidden_layers is missing or not a positive integer")
    return family, n_experts, k, n_layers


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


def _classify(located, family: Family, files: list[Path]) -> tuple[dict, list[TrunkTensor], bool]:
    per_expert, fused_key = family.expert_key_pattern(), family.fused_key_pattern()
    namespace = family.experts_namespace_pattern()
    experts: dict[tuple[int, int], Expert] = {}
    fused: dict[int, dict[str, tuple[int, TensorInfo]]] = {}
    trunk, prefixes = [], set()
    for file, info in located:
        if match := per_expert.match(info.name):
            key = (int(match["layer"]), int(match["expert"]))
            experts.setdefault(key, {})[family.store_projection(match["proj"])] = Piece(
                file, info.begin, info.nbytes, info.dtype, info.shape)
        elif match := fused_key.match(info.name):
            fused.setdefault(int(match["layer"]), {})[match["proj"]] = (file, info)
        elif namespace.match(info.name):
            raise ExtractError(f"{files[file]}: '{info.name}' sits among the routed experts but is not one of "
                               f"their {'/'.join(family.projections)} weights (quantised checkpoints are not supported)")
        else:
            trunk.append(TrunkTensor(file, info))
            continue
        prefixes.add(match["prefix"])
    if len(prefixes) > 1:
        raise ExtractError(f"{files[0].parent}: routed experts under several prefixes {sorted(prefixes)}")
    for layer, parts in sorted(fused.items()):
        if any(key[0] == layer for key in experts):
            raise ExtractError(f"{files[0].parent}: layer {layer} holds both per-expert and fused 3D expert tensors")
        experts.update(_split_fused(layer, parts, files))
    return experts, trunk, bool(fused)


def _split_fused(layer: int, parts: dict[str, tuple[int, TensorInfo]], files: list[Path]) -> dict:
    """Per-expert pieces of gate_up_proj [E, 2I, H] (gate rows first) and down_proj [E, H, I].

    Expert e's rows of each are contiguous, so every piece is a plain byte range and the
    3D tensor is never materialised."""
    if set(parts) != {"gate_up_proj", "down_proj"}:
        raise ExtractError(f"{files[0].parent}: layer {layer} has fused {sorted(parts)} but needs gate_up_proj and down_proj")
    (gu_file, gate_up), (d_file, down) = parts["gate_up_proj"], parts["down_proj"]
    if len(gate_up.shape) != 3 or len(down.shape) != 3 or gate_up.dtype != down.dtype:
        raise ExtractError(f"{files[gu_file]}: layer {layer} fused experts are not 3D tensors of one dtype")
    n, two_i, h = gate_up.shape  # [E, 2I, H]
    n_down, h_down, i = down.shape  # [E, H, I]
    if (n_down, h_down, two_i) != (n, h, 2 * i):
        raise ExtractError(f"{files[gu_file]}: layer {layer} gate_up_proj {list(gate_up.shape)} and down_proj "
                           f"{list(down.shape)} are not [E, 2I, H] and [E, H, I]")
    size = gate_up.itemsize * i * h  # bytes of one [I, H] or [H, I] matrix
    pieces = {}
    for e in range(n):
        gate_begin = gate_up.begin + e * 2 * size
        pieces[(layer, e)] = {
            "gate_proj": Piece(gu_file, gate_begin, size, gate_up.dtype, (i, h)),  # [I, H]
            "up_proj": Piece(gu_file, gate_begin + size, size, gate_up.dtype, (i, h)),  # [I, H]
            "down_proj": Piece(d_file, down.begin + e * size, size, down.dtype, (h, i)),  # [H, I]
        }
    return pieces


def _check_expert(layer: int, expert: int, projections: Expert, n_experts: int, n_layers: int, files) -> None:
    where = f"{files[0].parent}: expert {expert} of layer {layer}"
    if layer >= n_layers or expert >= n_experts:
        raise ExtractError(f"{where} is outside the config's {n_layers} layers x {n_experts} experts")
    if set(projections) != set(STORE_PROJECTIONS):
        raise ExtractError(f"{where} lacks {sorted(set(STORE_PROJECTIONS) - set(projections))}")
    gate, up, down = (projections[name] for name in STORE_PROJECTIONS)
    if len(gate.shape) != 2 or gate.shape != up.shape or down.shape != gate.shape[::-1]:
        raise ExtractError(f"{where}: shapes {gate.shape}, {up.shape}, {down.shape} are not [I,H], [I,H], [H,I]")
    if not gate.dtype == up.dtype == down.dtype:
        raise ExtractError(f"{where}: projections have different dtypes")
