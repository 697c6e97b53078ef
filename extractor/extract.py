"""extract_store(): checkpoint -> expert store, streaming, atomic and resumable.

Order of events, and why each is safe to interrupt with kill -9:
1. Plan from headers alone; every bad request fails here, before the output is touched.
2. Check the output: a new or empty directory, or a store/journal of the same model.
3. Lock the journal and append a run line.
4. Copy config/tokenizer files, then stream the trunk into trunk.safetensors.partial on
   one thread while `workers` threads write expert shards in source order. Every file is
   PATH.partial -> rename -> journal line, so a path that exists is complete; the journal
   lets a re-run keep it after re-hashing it. The first rename of a run deletes an older
   manifest, which could otherwise vouch for a file that is being replaced.
5. fsync every file and directory, then write manifest.json (fsync, rename, fsync): the
   manifest is the last thing written and vouches only for files already durable.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .checkpoint import COPIED_FILES, open_checkpoint
from .errors import ExtractError
from .journal import JOURNAL, Journal
from .plan import ExpertJob, Plan, make_plan
from .spec import parse_spec, profile_selection
from .store import FORMAT_VERSION, MANIFEST, TRUNK, ExpertStore, StoreError, expert_relpath, sha256_file
from .writer import PARTIAL_SUFFIX, AtomicFile, FileRecord, SourceFiles, TrunkWriter, fsync_dir, fsync_path, write_expert

# Test hook: seconds to pause around each rename, so a test can kill -9 a run mid-way.
TEST_DELAY_ENV = "CADRE_EXTRACT_TEST_DELAY_S"
PREFETCH_BYTES = 128 << 20  # source bytes asked of the kernel ahead of the shard writers


@dataclass(frozen=True)
class ExtractSummary:
    store: Path
    shards: int  # expert shards in the store
    shards_written: int
    shards_skipped: int  # already present, re-hashed and kept (resume)
    bytes: int  # every file the manifest lists
    bytes_written: int
    seconds: float

    @property
    def gb_per_s(self) -> float:
        return self.bytes_written / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (f"{self.shards} expert shards ({self.shards_written} written, {self.shards_skipped} kept), "
                f"{self.bytes / 1e9:.3f} GB in {self.seconds:.2f} s, {self.gb_per_s:.2f} GB/s written -> {self.store}")


def extract_store(
    model_dir: str | Path,
    out_dir: str | Path,
    experts: str | list[int] = "all",
    layers: str | list[int] = "all",
    dtype: str = "auto",
    workers: int = 1,
    quiet: bool = True,
    profile: str | Path | None = None,
) -> ExtractSummary:
    """Extract `model_dir` into the store `out_dir`; ExtractError (a ValueError) on bad input."""
    started = time.perf_counter()
    if not isinstance(workers, int) or workers < 1:
        raise ExtractError(f"{out_dir}: workers must be a positive integer, got {workers!r}")
    experts_ranges = _parse(profile_selection, experts, profile, where=model_dir)  # auto:N
    if experts_ranges is None:
        experts_ranges = _parse(parse_spec, experts, "--experts", where=model_dir)
    layer_ranges = _parse(parse_spec, layers, "--layers", where=model_dir)
    ckpt = open_checkpoint(model_dir)
    plan = _parse(make_plan, ckpt, experts_ranges, layer_ranges, dtype, where=model_dir)
    out = _prepare_out_dir(Path(out_dir), ckpt.config_sha256)
    complete = _complete_store(out, plan)
    if complete is not None:
        return _summary(out, plan, complete, written=set(), started=started)
    journal = Journal(out)
    journal.open_run(ckpt.config_sha256, plan.fingerprint)
    try:
        run = _Run(out, plan, journal, workers, show_progress=not quiet and sys.stderr.isatty())
        files = run.execute()
        _write_manifest(out, plan, files)
    finally:
        journal.close()
    _remove_partials(out)
    return _summary(out, plan, files, written=run.written, started=started)


def _parse(fn, *args, where):
    """Call fn; its ExtractError gains the path it is about."""
    try:
        return fn(*args)
    except ExtractError as exc:
        if str(exc).startswith(str(where)):
            raise
        raise ExtractError(f"{where}: {exc}") from None


def _prepare_out_dir(out: Path, config_sha256: str) -> Path:
    if out.exists() and not out.is_dir():
        raise ExtractError(f"{out}: exists and is not a directory")
    owners = _store_owners(out)
    if owners - {config_sha256}:
        raise ExtractError(f"{out}: holds the store of a different model (source config sha256 differs); "
                           "choose another --out or delete it")
    if not owners and out.exists() and any(out.iterdir()):
        raise ExtractError(f"{out}: not empty and not an expert store; choose a new or empty --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExtractError(f"{out}: cannot create the store directory ({exc.strerror})") from None
    return out


def _store_owners(out: Path) -> set[str]:
    """config sha256 of every model whose files (a manifest or a journal) `out` holds."""
    owners = Journal(out).config_hashes() if (out / JOURNAL).is_file() else set()
    manifest = _read_manifest(out)
    if manifest is not None:
        owners.add(manifest["source"]["config_sha256"])
    return owners


def _read_manifest(out: Path) -> dict | None:
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_bytes())
        if isinstance(manifest["source"]["config_sha256"], str):
            return manifest
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        pass
    raise ExtractError(f"{path}: unreadable manifest; delete the store to re-extract")


def _complete_store(out: Path, plan: Plan) -> dict[str, FileRecord] | None:
    """The files of a finished store made by the same request, or None.

    A finished store is trusted without re-hashing (sizes are checked); `--verify`
    re-hashes. This keeps a server's start-up extract call instant."""
    manifest = _read_manifest(out)
    if manifest is None or manifest.get("plan") != plan.fingerprint or manifest.get("format_version") != FORMAT_VERSION:
        return None
    if manifest.get("experts") != {str(layer): ids for layer, ids in plan.experts.items()}:
        return None
    files = {rel: FileRecord(e["bytes"], e["sha256"], e.get("tensor_bytes")) for rel, e in manifest["files"].items()}
    for rel, record in files.items():
        path = out / rel
        if not path.is_file() or path.stat().st_size != record.bytes:
            return None
    return files


class _ManifestGuard:
    """Deletes an older manifest before this run replaces any file, since the older
    manifest would vouch for it; a run that changes nothing leaves it in place."""

    def __init__(self, out: Path):
        self._out, self._lock, self._done = out, threading.Lock(), False

    def __call__(self) -> None:
        with self._lock:
            if not self._done:
                (self._out / MANIFEST).unlink(missing_ok=True)
                fsync_dir(self._out)
                self._done = True


class _Progress:
    """tqdm on stderr (bytes, and shards/s in the postfix) when stderr is a terminal."""

    def __init__(self, total_bytes: int, total_shards: int, enabled: bool):
        self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc="extract",
                         file=sys.stderr, disable=not enabled, dynamic_ncols=True)
        self._lock, self._shards, self._total_shards = threading.Lock(), 0, total_shards
        self._started = time.perf_counter()

    def advance(self, nbytes: int, shard: bool = False) -> None:
        with self._lock:
            self._shards += shard
            if shard:
                rate = self._shards / max(time.perf_counter() - self._started, 1e-9)
                self._bar.set_postfix_str(f"{self._shards}/{self._total_shards} shards, {rate:.0f} shards/s",
                                          refresh=False)
            self._bar.update(nbytes)

    def close(self) -> None:
        self._bar.close()


class _Run:
    def __init__(self, out: Path, plan: Plan, journal: Journal, workers: int, show_progress: bool):
        self.out, self.plan, self.journal, self.workers = out, plan, journal, workers
        self.records = journal.records(plan.fingerprint)
        self.guard = _ManifestGuard(out)
        self.files: dict[str, FileRecord] = {}
        self.written: set[str] = set()
        self.progress = _Progress(plan.output_bytes, len(plan.expert_jobs), show_progress)
        self.delay = float(os.environ.get(TEST_DELAY_ENV) or 0)
        self._lock = threading.Lock()
        self._error: BaseException | None = None  # the first failure of any thread
        self._stopping = False

    def execute(self) -> dict[str, FileRecord]:
        for layer, ids in self.plan.experts.items():
            if ids:
                (self.out / expert_relpath(layer, 0)).parent.mkdir(parents=True, exist_ok=True)
        for name in COPIED_FILES:
            if (self.plan.checkpoint.root / name).is_file():
                self._copy_small_file(name)
        sources = SourceFiles(self.plan.checkpoint.files)
        try:
            self._stream(sources)
        finally:
            sources.close()
            self.progress.close()
        self._make_durable()
        return self.files

    def _make_durable(self) -> None:
        """Before the manifest names them: every file's data (kept ones too: the run that
        wrote them may have been killed before syncing), then the renames themselves."""
        for rel in self.files:
            fsync_path(self.out / rel)
        for directory in {(self.out / rel).parent for rel in self.files} | {self.out / "experts"}:
            if directory.is_dir():
                fsync_dir(directory)

    def _stream(self, sources: SourceFiles) -> None:
        """The trunk on one thread (its file is sequential), expert shards on `workers`
        more, started in source order with at most `workers` in flight (each holds a buffer)."""
        pool = ThreadPoolExecutor(self.workers + 1, thread_name_prefix="extract")
        slots = threading.BoundedSemaphore(self.workers)
        prefetch = _Prefetcher(sources, self.plan.expert_jobs)
        try:
            pool.submit(self._trunk, sources).add_done_callback(self._on_done())
            for index, job in enumerate(self.plan.expert_jobs):
                prefetch.up_to(index)
                slots.acquire()
                self._raise_pool_error()
                pool.submit(self._expert, sources, job).add_done_callback(self._on_done(slots))
            pool.shutdown(wait=True)
            self._raise_pool_error()
        except BaseException:
            self._stopping = True
            pool.shutdown(wait=True, cancel_futures=True)
            raise

    def _trunk(self, sources: SourceFiles) -> None:
        if self._reuse(TRUNK):
            self.progress.advance(sum(entry.nbytes for entry in self.plan.trunk))
            return
        writer = TrunkWriter(sources, self.plan.trunk, self.out / TRUNK)
        try:
            for entry in self.plan.trunk:
                if self._stopping or self._error is not None:
                    raise _Stopped()
                self.progress.advance(writer.write(entry))
            self._commit(TRUNK, writer.commit(self._before_rename))
        except BaseException:
            writer.abort()
            raise

    def _on_done(self, slots: threading.BoundedSemaphore | None = None):
        def done(future) -> None:
            error = None if future.cancelled() else future.exception()
            if error is not None and not isinstance(error, _Stopped) and self._error is None:
                self._error = error
            if slots is not None:
                slots.release()

        return done

    def _raise_pool_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _expert(self, sources: SourceFiles, job: ExpertJob) -> None:
        if not self._reuse(job.relpath):
            self._commit(job.relpath, write_expert(sources, job, self.out / job.relpath, self._before_rename))
        self.progress.advance(job.tensor_bytes, shard=True)

    def _copy_small_file(self, name: str) -> None:
        data = (self.plan.checkpoint.root / name).read_bytes()
        target = self.out / name
        if target.is_file() and target.read_bytes() == data:
            self.files[name] = FileRecord(len(data), sha256_file(target))
            return
        out = AtomicFile(target)
        out.write(data)
        self._commit(name, out.commit(self._before_rename))

    def _reuse(self, relpath: str) -> bool:
        """Keep a file a previous run of this plan wrote, if it still hashes to its record."""
        record = self.records.get(relpath)
        path = self.out / relpath
        if record is None or not path.is_file() or path.stat().st_size != record.bytes:
            return False
        if sha256_file(path) != record.sha256:
            return False
        with self._lock:
            self.files[relpath] = record
        return True

    def _before_rename(self) -> None:
        self.guard()
        self._pause()

    def _commit(self, relpath: str, record: FileRecord) -> None:
        self._pause()
        self.journal.record(self.plan.fingerprint, relpath, record)
        with self._lock:
            self.files[relpath] = record
            self.written.add(relpath)

    def _pause(self) -> None:
        if self.delay:
            time.sleep(self.delay / 2)


class _Prefetcher:
    """Keeps kernel readahead PREFETCH_BYTES ahead of the shard being started."""

    def __init__(self, sources: SourceFiles, jobs: list[ExpertJob]):
        self._sources, self._jobs = sources, jobs
        self._next, self._ahead = 0, 0  # next job to prefetch; bytes prefetched beyond the current

    def up_to(self, current: int) -> None:
        if current > 0:
            self._ahead -= _source_bytes(self._jobs[current - 1])
        while self._next < len(self._jobs) and self._ahead < PREFETCH_BYTES:
            job = self._jobs[self._next]
            for piece in job.pieces:
                self._sources.prefetch(piece.file, piece.begin, piece.nbytes)
            self._ahead += _source_bytes(job)
            self._next += 1


def _source_bytes(job: ExpertJob) -> int:
    return sum(piece.nbytes for piece in job.pieces)


class _Stopped(Exception):
    """Another thread failed: the trunk thread stops early."""


def _write_manifest(out: Path, plan: Plan, files: dict[str, FileRecord]) -> None:
    ckpt = plan.checkpoint
    manifest = {
        "format_version": FORMAT_VERSION,
        "family": ckpt.family.name,
        "source": {"path": str(ckpt.root.resolve()), "config_sha256": ckpt.config_sha256},
        "dtype": plan.dtype,
        "num_layers": ckpt.num_layers,
        "moe_layers": ckpt.moe_layers,
        "num_experts": ckpt.num_experts,
        "top_k": ckpt.top_k,
        "experts": {str(layer): ids for layer, ids in plan.experts.items()},
        "files": {rel: record.to_json() for rel, record in sorted(files.items())},
        "plan": plan.fingerprint,  # the extractor's own: same request again -> nothing to do
        "source_fused_experts": ckpt.fused,
    }
    out_file = AtomicFile(out / MANIFEST)
    out_file.write(_manifest_text(manifest).encode())
    out_file.commit(before_rename=lambda: None, durable=True)
    fsync_dir(out)


def _manifest_text(manifest: dict) -> str:
    """JSON with one line per field, per layer's expert list and per file: diffable, greppable."""
    lines = []
    for key, value in manifest.items():
        if key in ("experts", "files"):
            inner = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in value.items())
            lines.append(f" {json.dumps(key)}: {{\n{inner}\n }}" if inner else f" {json.dumps(key)}: {{}}")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _remove_partials(out: Path) -> None:
    """Leftovers of killed runs (their content was never vouched for by anything)."""
    for path in [*out.glob(f"*{PARTIAL_SUFFIX}"), *out.glob(f"experts/layer_*/*{PARTIAL_SUFFIX}")]:
        path.unlink(missing_ok=True)


def _summary(out: Path, plan: Plan, files: dict[str, FileRecord], written: set[str], started: float) -> ExtractSummary:
    shards_written = sum(1 for job in plan.expert_jobs if job.relpath in written)
    return ExtractSummary(
        store=out,
        shards=len(plan.expert_jobs),
        shards_written=shards_written,
        shards_skipped=len(plan.expert_jobs) - shards_written,
        bytes=sum(record.bytes for record in files.values()),
        bytes_written=sum(files[rel].bytes for rel in written),
        seconds=time.perf_counter() - started,
    )


def verify_store(out_dir: str | Path) -> list[str]:
    """Every problem with a finished store: files that differ from the manifest, and experts
    the manifest lists without vouching for their shard. StoreError if there is no store."""
    store = ExpertStore.open(out_dir)
    problems = store.verify()
    for layer, ids in store.manifest["experts"].items():
        for expert in ids:
            if expert_relpath(int(layer), expert) not in store.manifest["files"]:
                problems.append(f"{store.expert_path(int(layer), expert)}: listed in experts but not in files")
    return problems


__all__ = ["ExtractSummary", "extract_store", "verify_store", "ExtractError", "StoreError"]
