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
from .formats import DENSE, FP8, FP8_DTYPE, PROJECTIONS, manifest_entry, tensor_names
from .safetensors_format import CASTABLE, DTYPES, TORCH_NAMES, itemsize
from .spec import Ranges, resolve_spec
from .store import FORMAT_VERSION, expert_relpath

# "fp8": experts written as float8_e4m3fn with block scales (--fp8-block), trunk unchanged
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32", "fp8")
FP8_BLOCK = (128, 128)  # DeepSeek-V3's and Qwen3-FP8's block


@dataclass(frozen=True)
class OutTensor:
    """One tensor of an expert shard: from which source piece, in which dtype, made how."""

    name: str
    piece: Piece
    dtype: str  # safetensors name written
    op: str = "copy"  # "copy" (cast if dtype differs) | "fp8" weight | "fp8_scale" (of the same piece)
    block: tuple[int, int] | None = None  # fp8 / fp8_scale: rows, cols per scale

    @property
    def shape(self) -> tuple[int, ...]:
        if self.op == "fp8_scale":
            out, inp = self.piece.out_shape
            return (out // self.block[0], inp // self.block[1])
        return self.piece.out_shape

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


@dataclass(frozen=True)
class ExpertJob:
    layer: int
    expert: int
    tensors: tuple[OutTensor, ...]  # in shard order (formats.tensor_names)

    @property
    def relpath(self) -> str:
        return expert_relpath(self.layer, self.expert)

    @property
    def pieces(self) -> list[Piece]:
        """The distinct source pieces (an fp8 weight and its scale read the same one)."""
        return list({t.piece: None for t in self.tensors})

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

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
    expert_format: dict | None  # the manifest's "expert_format" (None: dense, no biases)

    @property
    def output_bytes(self) -> int:
        return sum(job.tensor_bytes for job in self.expert_jobs) + sum(e.nbytes for e in self.trunk)


def make_plan(ckpt: Checkpoint, experts: Ranges | dict[int, list[int]], layers: Ranges, dtype: str,
              fp8_block: tuple[int, int] = FP8_BLOCK) -> Plan:
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
    weights = FP8 if dtype == "fp8" else ckpt.weights
    if dtype == "fp8" and ckpt.weights != DENSE:
        raise ExtractError(f"{ckpt.root}: --dtype fp8 needs dense experts, these are {ckpt.weights}")
    shard_dtype = _shard_dtype(ckpt, chosen, "auto" if dtype == "fp8" else dtype)
    block = tuple(fp8_block) if dtype == "fp8" else None
    jobs = [ExpertJob(layer, expert, _out_tensors(ckpt, ckpt.experts[layer, expert], weights, shard_dtype, block))
            for layer, expert in chosen]
    if block is not None:
        _check_fp8_block(ckpt, jobs[:1], block)
    trunk_request = "auto" if dtype == "fp8" else dtype
    return Plan(
        checkpoint=ckpt,
        dtype=_compute_dtype(ckpt, shard_dtype, trunk_request),
        experts={layer: per_layer[layer] if layer in layer_ids else [] for layer in ckpt.moe_layers},
        expert_jobs=sorted(jobs, key=lambda job: job.source_position),
        trunk=[TrunkEntry(t, _trunk_dtype(ckpt, t, trunk_request)) for t in ckpt.trunk],
        fingerprint=_fingerprint(ckpt, dtype if block is None else f"fp8:{block[0]}x{block[1]}"),
        expert_format=manifest_entry(weights, ckpt.bias, list(block or ckpt.fp8_block or []) or None),
    )


def _out_tensors(ckpt: Checkpoint, pieces: dict[str, Piece], weights: str, dtype: str,
                 block: tuple[int, int] | None) -> tuple[OutTensor, ...]:
    """The shard's tensors: weights and biases cast to `dtype` (a quantised source keeps its
    weights and scales as they are), or weights quantised to FP8 with `block` scales."""
    out = []
    for name in tensor_names(weights, ckpt.bias):
        if block is not None and name.endswith("_scale_inv"):
            out.append(OutTensor(name, pieces[name.removesuffix("_scale_inv")], "F32", "fp8_scale", block))
        elif block is not None and name in PROJECTIONS:
            out.append(OutTensor(name, pieces[name], FP8_DTYPE, "fp8", block))
        else:
            piece = pieces[name]
            castable = piece.dtype in CASTABLE and (ckpt.weights == DENSE or name.endswith("_bias"))
            out.append(OutTensor(name, piece, dtype if castable else piece.dtype))
    return tuple(out)


def _check_fp8_block(ckpt: Checkpoint, jobs: list[ExpertJob], block: tuple[int, int]) -> None:
    for tensor in (t for job in jobs for t in job.tensors if t.op == "fp8"):
        out, inp = tensor.piece.out_shape
        if out % block[0] or inp % block[1]:
            raise ExtractError(f"{ckpt.root}: --fp8-block {block[0]}x{block[1]} does not divide the experts' "
                               f"{tensor.name} [{out}, {inp}]; pass a block that divides both")


def _compute_dtype(ckpt: Checkpoint, shard_dtype: str, request: str) -> str:
    """The manifest's "dtype": what the runtime computes in (dense experts: theirs)."""
    if ckpt.weights == DENSE:
        return DTYPES[shard_dtype][0]
    if request != "auto":
        return request
    declared = ckpt.config.get("torch_dtype") or ckpt.config.get("dtype")
    if declared in ("bfloat16", "float16", "float32"):
        return declared
    trunk = next((t.info.dtype for t in ckpt.trunk if t.info.dtype in CASTABLE), "BF16")
    return DTYPES[trunk][0]


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
    """Dtype of the float tensors of the shards (dense weights, biases)."""
    names = PROJECTIONS if ckpt.weights == DENSE else tuple(f"{p}_bias" for p in PROJECTIONS)
    sources = {ckpt.experts[key][n].dtype for key in chosen for n in names if n in ckpt.experts[key]}
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
    # what transformers loads in float32 at any dtype (the family row's suffixes, the model's strict
    # fp32 patterns) stays so: cast to bf16 in the store and upcast again at load, it would differ
    # from transformers' own load of the checkpoint (a float32 router weight: logits ~4e-3 off)
    kept_fp32 = tensor.keep_fp32 or info.name.endswith(ckpt.family.keep_fp32)
    keep = request == "auto" or info.dtype not in CASTABLE or kept_fp32
    return info.dtype if keep else TORCH_NAMES[request]


def _fingerprint(ckpt: Checkpoint, request: str) -> str:
    """Identifies the bytes a run would write; a resumed run reuses only files it vouches for."""
    sources = [(path.name, stat.st_size, stat.st_mtime_ns) for path in ckpt.files for stat in [path.stat()]]
    blob = json.dumps([FORMAT_VERSION, ckpt.config_sha256, request, sources])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
