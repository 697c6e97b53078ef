"""Byte movers: source ranges in with pread, store files out atomically, hashed as written.

Memory: an expert shard is assembled in one reused per-thread buffer (header + its
three tensors); the trunk is streamed in CHUNK-sized pieces. Nothing else holds
tensor data, so peak memory is workers x largest shard + 2 x CHUNK, whatever the
checkpoint's size.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import Piece
from .errors import ExtractError
from .plan import ExpertJob, OutTensor, TrunkEntry
from .safetensors_format import DTYPES, encode_header, itemsize, pread_into

CHUNK = 16 << 20  # trunk streaming granularity: large enough for full-speed sequential I/O
PARTIAL_SUFFIX = ".partial"
PREFETCH_STEP = 2 << 20
WRITEBACK_STEP = 64 << 20  # a long file (the trunk) starts writeback every this many bytes


@dataclass(frozen=True)
class FileRecord:
    bytes: int
    sha256: str
    tensor_bytes: int | None = None  # expert shards: the three tensors' bytes

    def to_json(self) -> dict:
        entry = {"bytes": self.bytes, "sha256": self.sha256}
        if self.tensor_bytes is not None:
            entry["tensor_bytes"] = self.tensor_bytes
        return entry


class AtomicFile:
    """PATH.partial, hashed as it is written; commit() renames it to PATH.

    A reader (or a resumed run) sees either no PATH or a complete one, never a prefix:
    rename is atomic against process death. Against power loss, the extractor fsyncs
    every file once, before the manifest, instead of before each rename (one fsync per
    shard costs a device flush each and halved throughput); a resumed run re-hashes
    whatever it keeps, so a rename that outlived its data is rewritten, never trusted.
    `durable=True` (the manifest) fsyncs before the rename."""

    def __init__(self, path: Path):
        self.path = path
        self.partial = path.with_name(path.name + PARTIAL_SUFFIX)
        self._file = open(self.partial, "wb", buffering=0)
        self._hash = hashlib.sha256()
        self._bytes = 0
        self._flushed = 0  # bytes whose writeback has been started

    def write(self, data: memoryview | bytes) -> None:
        self._hash.update(data)
        view = memoryview(data)
        while view:
            view = view[self._file.write(view):]
        self._bytes += len(data)
        if self._bytes - self._flushed >= WRITEBACK_STEP:
            self._start_writeback()

    def _start_writeback(self) -> None:
        """Start writing the new bytes to disk without waiting (and drop the clean pages
        from the page cache): the fsync pass before the manifest then finds the data
        mostly on disk instead of flushing it all at the end."""
        os.posix_fadvise(self._file.fileno(), self._flushed, self._bytes - self._flushed, os.POSIX_FADV_DONTNEED)
        self._flushed = self._bytes

    def commit(self, before_rename: Callable[[], None], tensor_bytes: int | None = None,
               durable: bool = False) -> FileRecord:
        if durable:
            os.fsync(self._file.fileno())
        else:
            self._start_writeback()
        self._file.close()
        before_rename()
        os.replace(self.partial, self.path)
        return FileRecord(self._bytes, self._hash.hexdigest(), tensor_bytes)

    def abort(self) -> None:
        self._file.close()
        self.partial.unlink(missing_ok=True)


def fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fsync_path(path, directory=True)


class SourceFiles:
    """Open descriptors on the checkpoint's files; pread is safe from several threads."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self._fds = [os.open(path, os.O_RDONLY) for path in paths]

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)

    def prefetch(self, file: int, offset: int, nbytes: int) -> None:
        """Have the kernel start reading a range needed soon and return at once, so on a
        cold page cache disk reads overlap the hashing and writing of earlier shards.
        Linux reads at most one readahead window per call, hence the small steps."""
        for start in range(offset, offset + nbytes, PREFETCH_STEP):
            os.posix_fadvise(self._fds[file], start, min(PREFETCH_STEP, offset + nbytes - start), os.POSIX_FADV_WILLNEED)

    def read_into(self, out: memoryview, file: int, offset: int) -> None:
        try:
            pread_into(self._fds[file], out, offset)
        except EOFError as exc:
            raise ExtractError(f"{self.paths[file]}: {exc}, shorter than its header says "
                               "(was it changed during extraction?)") from None


class _Buffers(threading.local):
    """One growing buffer per thread: no allocation (or zero-fill) per shard."""

    def __init__(self):
        self.data = bytearray()

    def get(self, nbytes: int) -> memoryview:
        if len(self.data) < nbytes:
            self.data = bytearray(nbytes)
        return memoryview(self.data)[:nbytes]


_buffers = _Buffers()
_scratch = _Buffers()  # source bytes awaiting a dtype conversion


def convert_into(out: memoryview, source: memoryview, src_dtype: str, dst_dtype: str) -> None:
    """Cast `source` elements into `out` with torch's rounding (what .to(dtype) gives)."""
    import torch  # only conversions need it; plain copies never import it

    if not out:
        return
    dst = torch.frombuffer(out, dtype=getattr(torch, DTYPES[dst_dtype][0]))
    dst.copy_(torch.frombuffer(source, dtype=getattr(torch, DTYPES[src_dtype][0])))


def read_piece(sources: SourceFiles, out: memoryview, piece: Piece, dtype: str) -> None:
    if piece.dtype == dtype and piece.is_plain:
        sources.read_into(out, piece.file, piece.begin)
        return
    tensor = _read_tensor(sources, piece)
    if piece.dtype == dtype:
        out[:] = memoryview(tensor.numpy()).cast("B")  # [out, ...] uint8 bytes, already in order
        return
    source = memoryview(tensor.numpy()).cast("B")
    convert_into(out, source, piece.dtype, dtype)


def _read_tensor(sources: SourceFiles, piece: Piece):
    """The piece's stored tensor as bytes, [out, ...rest, itemsize] uint8: selected and out-axis
    first. Bytes, not elements, so any dtype (fp8, packed fp4) moves the same way."""
    import torch

    raw = _scratch.get(piece.nbytes)
    sources.read_into(raw, piece.file, piece.begin)
    block = torch.frombuffer(raw, dtype=torch.uint8).view(*piece.shape, itemsize(piece.dtype))
    if piece.select is not None:
        start, stop, step = piece.select
        block = block.narrow(piece.out_axis, start, stop - start)[(slice(None),) * piece.out_axis + (slice(None, None, step),)]
    return block.movedim(piece.out_axis, 0).contiguous()


def _fp8_pair(sources: SourceFiles, tensor: OutTensor):
    """(fp8 weight bytes, float32 scale_inv bytes) of a dense piece, quantised like transformers."""
    import torch

    from .quant import quantize_fp8

    raw = _read_tensor(sources, tensor.piece)
    torch_dtype = getattr(torch, DTYPES[tensor.piece.dtype][0])
    weight = raw.view(torch_dtype).reshape(tensor.piece.out_shape)  # [out, in]
    quantized, scale_inv = quantize_fp8(weight, tensor.block)
    return quantized.view(torch.uint8).numpy().tobytes(), scale_inv.numpy().tobytes()


def write_expert(sources: SourceFiles, job: ExpertJob, path: Path, before_rename: Callable[[], None]) -> FileRecord:
    """One shard: header + its tensors (formats.tensor_names order), assembled in memory, written once."""
    header = encode_header([(t.name, t.dtype, t.shape) for t in job.tensors])
    buffer = _buffers.get(len(header) + job.tensor_bytes)
    buffer[: len(header)] = header
    position = len(header)
    scales: dict[Piece, bytes] = {}  # an fp8 weight's scale, written after the weights
    for tensor in job.tensors:
        out = buffer[position : position + tensor.nbytes]
        if tensor.op == "fp8":
            out[:], scales[tensor.piece] = _fp8_pair(sources, tensor)
        elif tensor.op == "fp8_scale":
            out[:] = scales.pop(tensor.piece)
        else:
            read_piece(sources, out, tensor.piece, tensor.dtype)
        position += tensor.nbytes
    out_file = AtomicFile(path)
    try:
        out_file.write(buffer)
    except BaseException:
        out_file.abort()
        raise
    return out_file.commit(before_rename, tensor_bytes=job.tensor_bytes)


class TrunkWriter:
    """trunk.safetensors, written tensor by tensor in plan order through CHUNK-sized copies.

    The header (every name, dtype and shape) is known from the plan, so it goes first and
    no tensor is ever held whole."""

    def __init__(self, sources: SourceFiles, entries: list[TrunkEntry], path: Path):
        self._sources, self._pending = sources, list(reversed(entries))
        self._out = AtomicFile(path)
        self._out.write(encode_header([(e.tensor.info.name, e.dtype, e.tensor.info.shape) for e in entries]))

    def write(self, entry: TrunkEntry) -> int:
        assert self._pending.pop() is entry, "trunk tensors must be written in header order"
        if self._pending:
            upcoming = self._pending[-1].tensor
            self._sources.prefetch(upcoming.file, upcoming.info.begin, upcoming.info.nbytes)
        info = entry.tensor.info
        src_size, dst_size = info.itemsize, itemsize(entry.dtype)
        step = CHUNK // src_size * src_size  # whole elements, so each chunk converts on its own
        for start in range(0, info.nbytes, step):
            nbytes = min(step, info.nbytes - start)
            raw = _scratch.get(nbytes)
            self._sources.read_into(raw, entry.tensor.file, info.begin + start)
            if entry.dtype != info.dtype:
                converted = _buffers.get(nbytes // src_size * dst_size)
                convert_into(converted, raw, info.dtype, entry.dtype)
                raw = converted
            self._out.write(raw)
        return entry.nbytes

    def commit(self, before_rename: Callable[[], None]) -> FileRecord:
        assert not self._pending, f"{len(self._pending)} trunk tensors never written"
        return self._out.commit(before_rename)

    def abort(self) -> None:
        self._out.abort()
