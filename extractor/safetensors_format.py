"""The safetensors format as a byte stream: read a header, write a file tensor by tensor.

A file is an 8-byte little-endian header length N, N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`), then
the tensors' bytes, offsets counted from the end of the header
(https://github.com/huggingface/safetensors#format).

The extractor needs two things the library does not offer: each tensor's byte range,
so a slice is copied with `pread` into a reused buffer instead of mapping whole
checkpoint shards into the process (mapped pages count towards RSS until unmapped), and
a header computed before any data exists, so the trunk is written tensor by tensor
without being held. Both sides are checked against the library in the tests.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import Executor, wait
from dataclasses import dataclass
from pathlib import Path

# safetensors dtype name: (torch attribute name, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U64": ("uint64", 8), "U32": ("uint32", 4), "U16": ("uint16", 2), "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
TORCH_NAMES = {torch_name: st_name for st_name, (torch_name, _) in DTYPES.items()}
# dtypes --dtype may convert between (fp8 without its scales is not a weight on its own)
CASTABLE = frozenset({"F64", "F32", "F16", "BF16"})
MAX_HEADER_BYTES = 100 << 20  # the library refuses larger headers too
HEADER_ALIGN = 8  # the library pads the JSON with spaces so tensor data starts 8-aligned
READ_CHUNK_BYTES = 1 << 20  # a parallel read's unit: a bf16 Qwen3-30B-A3B expert (9 MiB) is 9 of them


class SafetensorsFormatError(ValueError):
    """The file is not a complete, well-formed safetensors file."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute offset in the file
    nbytes: int

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1]


def itemsize(dtype: str) -> int:
    return DTYPES[dtype][1]


def pread_into(fd: int, out: memoryview, offset: int) -> None:
    """Fill `out` from the file at `offset` (preadv releases the GIL: several threads read at
    once); EOFError saying where, if the file ends first."""
    while out:
        n = os.preadv(fd, [out], offset)
        if n == 0:
            raise EOFError(f"ended at byte {offset}")
        out, offset = out[n:], offset + n


def pread_spans_into(fd: int, spans: list[tuple[memoryview, int]], readers: "Executor | None" = None,
                     chunk_bytes: int = READ_CHUNK_BYTES) -> None:
    """Fill each (destination, file offset) span of `spans`; with `readers`, in chunks of
    `chunk_bytes` read by its threads at once. An expert a decode step misses in every memory
    tier is on that step's critical path, and a layer rarely misses more than one, so parallel
    loader threads do not shorten it; parallel chunks of the one read do (at full depth under
    24 GiB: 9-17% more decode tok/s, docs/memory-plan.md)."""
    if readers is None:
        for out, offset in spans:
            pread_into(fd, out, offset)
        return
    chunks = [(out[start:start + chunk_bytes], offset + start)
              for out, offset in spans for start in range(0, len(out), chunk_bytes)]
    futures = [readers.submit(pread_into, fd, out, offset) for out, offset in chunks]
    wait(futures)  # every read finished before any error surfaces: the caller then closes fd
    for future in futures:
        future.result()


def read_header(path: Path) -> list[TensorInfo]:
    """Every tensor of `path` in file order; SafetensorsFormatError if the file is truncated,
    has holes or overlaps, or its header does not parse."""
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise SafetensorsFormatError(f"truncated: {file_size} bytes, not even a header length")
        header_len = int.from_bytes(prefix, "little")
        if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
            raise SafetensorsFormatError(f"header length {header_len} does not fit in a {file_size}-byte file")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsFormatError(f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError("header is not a JSON object")
    data_start = 8 + header_len
    tensors = sorted(
        (_tensor_info(name, entry, data_start) for name, entry in header.items() if name != "__metadata__"),
        key=lambda t: t.begin,
    )
    _check_contiguous(tensors, data_start, file_size)
    return tensors


def _tensor_info(name: str, entry: object, data_start: int) -> TensorInfo:
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        ok = dtype in DTYPES and all(isinstance(d, int) and d >= 0 for d in shape)
        ok = ok and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end
    except (TypeError, KeyError, ValueError):
        ok = False
    if not ok:
        raise SafetensorsFormatError(f"tensor '{name}': malformed header entry {entry!r:.200}")
    if end - begin != math.prod(shape) * DTYPES[dtype][1]:
        raise SafetensorsFormatError(f"tensor '{name}': {end - begin} bytes do not hold {dtype}{list(shape)}")
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, end - begin)


def _check_contiguous(tensors: list[TensorInfo], data_start: int, file_size: int) -> None:
    position = data_start
    for t in tensors:
        if t.begin != position:
            raise SafetensorsFormatError(f"tensor '{t.name}' starts at byte {t.begin}, expected {position}")
        position += t.nbytes
    if position != file_size:
        kind = "truncated" if position > file_size else "trailing bytes"
        raise SafetensorsFormatError(f"{kind}: tensor data ends at byte {position}, file has {file_size}")


def encode_header(tensors: list[tuple[str, str, tuple[int, ...]]]) -> bytes:
    """The 8-byte length and JSON header for (name, dtype, shape) laid out in this order."""
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * DTYPES[dtype][1]
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % HEADER_ALIGN)
    return len(raw).to_bytes(8, "little") + raw
