"""What one extraction writes: the expert shards selected, the trunk, and their dtypes.

Built entirely from headers, before any byte is written, so every bad request (ids out
of range, an expert the checkpoint lacks, mixed dtypes) fails while the output
directory is still untouched.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

from .checkpoint import Checkpoint, Piece, TrunkTensor
from .errors import ExtractError
from .families import STORE_PROJECTIONS
from .safetensors_format import CASTABLE, DTYPES, TORCH_NAMES, itemsize
from .spec import Ranges, resolve_spec
from .store import FORMAT_VERSION, expert_relpath

DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")


@dataclass(frozen=True)
class ExpertJob:
    layer: int
    expert: int
    pieces: tuple[Piece, Piece, Piece]  # gate_proj, up_proj, down_proj, each [out, in]
    dtype: str  # safetensors name written

    @property
    def relpath(self) -> str:
        return expert_relpath(self.layer, self.expert)

    @property
    def tensor_bytes(self) -> int:
        return sum(math.prod(p.shape) for p in self.pieces) * itemsize(self.dtype)

    @property
    def source_position(self) -> tuple[int, int]:
        return min((p.file, p.begin) for p in self.pieces)


@dataclass(frozen=True)
class TrunkEntry:
    tensor: TrunkTensor
    dtype: str  # safetensors name written

    @property
    def nbytes(self) -> int:
        return math.prod(self.tensor.info.shape) * itemsize(self.dtype)


@dataclass(frozen=True)
class Plan:
    checkpoint: Checkpoint
    dtype: str  # torch name of the expert shards (the manifest's "dtype")
    experts: dict[int, list[int]]  # every MoE layer -> expert ids written ([] if not selected)
    expert_jobs: list[ExpertJob]  # in source order, so reads run front to back
    trunk: list[TrunkEntry]  # in source order, which is also the trunk file's order
    fingerprint: str  # same source + same dtype request -> byte-identical files

    @property
    def output_bytes(self) -> int:
        return sum(job.tensor_bytes for job in self.expert_jobs) + sum(e.nbytes for e in self.trunk)


def make_plan(ckpt: Checkpoint, experts: Ranges | dict[int, list[int]], layers: Ranges, dtype: str) -> Plan:
    """experts: one selection for every layer, or {layer: ids} (from --experts auto:N --profile)."""
    if dtype not in DTYPE_CHOICES:
        raise ExtractError(f"{ckpt.root}: --dtype {dtype!r} is not one of {', '.join(DTYPE_CHOICES)}")
    layer_ids = set(resolve_spec(layers, ckpt.num_layers, "--layers", "layer"))
    per_layer = _per_layer_experts(ckpt, experts)
    selected = [layer for layer in ckpt.moe_layers if layer in layer_ids]
    for layer in selected:
        for expert in per_layer[layer]:
            if (layer, expert) not in ckpt.experts:
                raise ExtractError(f"{ckpt.root}: the checkpoint has no expert {expert} in layer {layer}")
    chosen = [(layer, expert) for layer in selected for expert in per_layer[layer]]
    shard_dtype = _shard_dtype(ckpt, chosen, dtype)
    jobs = [
        ExpertJob(layer, expert, tuple(ckpt.experts[layer, expert][p] for p in STORE_PROJECTIONS), shard_dtype)
        for layer, expert in chosen
    ]
    return Plan(
        checkpoint=ckpt,
        dtype=DTYPES[shard_dtype][0],
        experts={layer: per_layer[layer] if layer in layer_ids else [] for layer in ckpt.moe_layers},
        expert_jobs=sorted(jobs, key=lambda job: job.source_position),
        trunk=[TrunkEntry(t, _trunk_dtype(ckpt, t, dtype)) for t in ckpt.trunk],
        fingerprint=_fingerprint(ckpt, dtype),
    )


def _per_layer_experts(ckpt: Checkpoint, experts: Ranges | dict[int, list[int]]) -> dict[int, list[int]]:
    if not isinstance(experts, dict):
        ids = resolve_spec(experts, ckpt.num_experts, "--experts", "expert")
        return {layer: ids for layer in ckpt.moe_layers}
    missing = [layer for layer in ckpt.moe_layers if layer not in experts]
    if missing:
        raise ExtractError(f"{ckpt.root}: the usage profile has no counts for MoE layer {missing[0]}")
    for layer in ckpt.moe_layers:
        resolve_spec([(e, e) for e in experts[layer]], ckpt.num_experts, "--experts", "expert")
    return {layer: sorted(experts[layer]) for layer in ckpt.moe_layers}


def _shard_dtype(ckpt: Checkpoint, chosen: list[tuple[int, int]], request: str) -> str:
    sources = {piece.dtype for key in chosen for piece in ckpt.experts[key].values()}
    if request != "auto":
        uncastable = sources - CASTABLE
        if uncastable:
            raise ExtractError(f"{ckpt.root}: cannot convert {sorted(uncastable)} expert weights to {request}")
        return TORCH_NAMES[request]
    if len(sources) > 1:
        raise ExtractError(f"{ckpt.root}: expert weights mix dtypes {sorted(sources)}; pass --dtype")
    if sources:
        return sources.pop()
    return next((t.info.dtype for t in ckpt.trunk if t.info.dtype in CASTABLE), "F32")  # no experts chosen


def _trunk_dtype(ckpt: Checkpoint, tensor: TrunkTensor, request: str) -> str:
    info = tensor.info
    keep = request == "auto" or info.dtype not in CASTABLE or info.name.endswith(ckpt.family.keep_fp32)
    return info.dtype if keep else TORCH_NAMES[request]


def _fingerprint(ckpt: Checkpoint, request: str) -> str:
    """Identifies the bytes a run would write; a resumed run reuses only files it vouches for."""
    sources = [(path.name, stat.st_size, stat.st_mtime_ns) for path in ckpt.files for stat in [path.stat()]]
    blob = json.dumps([FORMAT_VERSION, ckpt.config_sha256, request, sources])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
