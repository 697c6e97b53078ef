"""The expert store: layout, manifest and the reader that the runtime uses.

Layout (contract, see shared/DESIGN.md):

    STORE/manifest.json
    STORE/config.json, generation_config.json, tokenizer files
    STORE/trunk.safetensors                      every non-routed-expert tensor
    STORE/experts/layer_LLL/expert_EEE.safetensors   gate_proj, up_proj, down_proj [out, in]

The manifest is written last, so a store without one is not a store; it vouches for
every file with its byte size and sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open

from .families import Family, detect_family
from .formats import DENSE, tensor_names
from .safetensors_format import TORCH_NAMES, TensorInfo, pread_spans_into, read_header

if TYPE_CHECKING:  # imported where tensors are made: the extractor copies bytes without its ~200 MB
    from concurrent.futures import Executor

    import torch

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TRUNK = "trunk.safetensors"
HASH_CHUNK = 8 << 20


class StoreError(RuntimeError):
    """A store is missing, incomplete or does not match its manifest."""


def expert_relpath(layer: int, expert: int) -> str:
    return f"experts/layer_{layer:03d}/expert_{expert:03d}.safetensors"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ExpertStore:
    """Read-only view of an extracted store (manifest parsed once)."""

    root: Path
    manifest: dict
    config: dict
    family: Family
    # shard path -> its tensors by name, parsed once: a read on a decode step's critical path
    # otherwise opened and parsed the header first (the store is read-only while in use)
    _headers: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def open(cls, root: str | Path) -> "ExpertStore":
        root = Path(root)
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            raise StoreError(f"{root}: not an expert store (no {MANIFEST}; extraction incomplete?)")
        try:
            manifest = json.loads(manifest_path.read_text())
            config = json.loads((root / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise StoreError(f"{root}: unreadable manifest or config: {exc}") from exc
        if manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{manifest_path}: format_version {manifest.get('format_version')} != {FORMAT_VERSION}")
        return cls(root=root, manifest=manifest, config=config, family=detect_family(config))

    # --- what the store holds ------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.manifest["num_layers"])

    @property
    def moe_layers(self) -> list[int]:
        return [int(layer) for layer in self.manifest["moe_layers"]]

    @property
    def num_experts(self) -> int:
        return int(self.manifest["num_experts"])

    @property
    def top_k(self) -> int:
        return int(self.manifest["top_k"])

    @property
    def dtype(self) -> "torch.dtype":
        import torch

        return getattr(torch, self.manifest["dtype"])

    @property
    def expert_format(self) -> dict:
        """{"weights": dense|fp8|mxfp4, "tensors": [shard tensor names], "block_size"?}."""
        entry = self.manifest.get("expert_format")
        return entry if entry is not None else {"weights": DENSE, "tensors": tensor_names(DENSE, False)}

    def experts_present(self, layer: int) -> list[int]:
        return list(self.manifest["experts"].get(str(layer), []))

    def has_expert(self, layer: int, expert: int) -> bool:
        return expert in self.experts_present(layer)

    @property
    def trunk_path(self) -> Path:
        return self.root / TRUNK

    def expert_path(self, layer: int, expert: int) -> Path:
        return self.root / expert_relpath(layer, expert)

    def expert_nbytes(self, layer: int, expert: int) -> int:
        """Bytes of the shard's tensors (file size minus the small safetensors header): what a
        miss moves, in the store's own (possibly quantised) format."""
        entry = self.manifest["files"][expert_relpath(layer, expert)]
        return int(entry.get("tensor_bytes", entry["bytes"]))

    # --- reading --------------------------------------------------------------
    def load_expert(self, layer: int, expert: int, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The expert's tensors: gate_proj, up_proj, down_proj ([out, in]) and the format's
        scales and biases (expert_format["tensors"]); StoreError names the shard."""
        if not self.has_expert(layer, expert):
            raise StoreError(f"{self.root}: expert {expert} of layer {layer} is not in this store")
        path = self.expert_path(layer, expert)
        try:
            with safe_open(path, framework="pt", device=str(device)) as f:
                tensors = {name: f.get_tensor(name) for name in self.expert_format["tensors"]}
        except (OSError, SafetensorError, KeyError, RuntimeError) as exc:
            raise StoreError(f"{path}: cannot load expert shard: {exc}") from exc
        return tensors

    def read_expert_into(self, layer: int, expert: int, out: dict[str, "torch.Tensor"],
                         readers: "Executor | None" = None) -> None:
        """Read the shard's tensors straight into `out` ({name: contiguous CPU tensor} of the
        stored dtypes and shapes, e.g. a pinned host-tier entry) with pread: a page-cache or
        disk read straight into the destination, no memory map to fault in and no
        intermediate copy (what load_expert + a copy cost); with `readers`, in chunks read by
        its threads at once (pread_spans_into). StoreError names the shard and what does not
        match."""
        path = self.expert_path(layer, expert)
        try:
            stored = self._headers.get(path)
            if stored is None:
                stored = self._headers[path] = {info.name: info for info in read_header(path)}
            spans = [(_bytes_of(tensor), _matching(stored, name, tensor).begin) for name, tensor in out.items()]
            fd = os.open(path, os.O_RDONLY)
            try:
                pread_spans_into(fd, spans, readers)
            finally:
                os.close(fd)
        except (OSError, ValueError, KeyError, EOFError) as exc:
            raise StoreError(f"{path}: cannot read expert shard: {exc}") from exc

    def verify(self) -> list[str]:
        """Re-hash every file the manifest vouches for; one message per mismatch."""
        problems = []
        for rel, entry in sorted(self.manifest["files"].items()):
            path = self.root / rel
            if not path.is_file():
                problems.append(f"{path}: missing")
            elif path.stat().st_size != entry["bytes"]:
                problems.append(f"{path}: size {path.stat().st_size} != {entry['bytes']}")
            elif sha256_file(path) != entry["sha256"]:
                problems.append(f"{path}: sha256 mismatch")
        return problems


def _matching(stored: dict[str, TensorInfo], name: str, tensor: "torch.Tensor") -> TensorInfo:
    """The shard's tensor `name`, checked against the destination it is read into."""
    info = stored[name]
    if TORCH_NAMES.get(str(tensor.dtype).removeprefix("torch.")) != info.dtype or info.shape != tuple(tensor.shape):
        raise ValueError(f"{name} is {info.dtype} {list(info.shape)}, the destination "
                         f"{tensor.dtype} {list(tensor.shape)}")
    return info


def _bytes_of(tensor: "torch.Tensor") -> memoryview:
    """A contiguous CPU tensor's bytes, writable in place."""
    import torch  # only where tensors are made (see TYPE_CHECKING above)

    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
