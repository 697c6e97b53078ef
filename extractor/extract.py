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
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import open_checkpoint
from .errors import ExtractError
from .hub import resolve_model
from .journal import JOURNAL, Journal
from .plan import FP8_BLOCK, Plan, make_plan
from .run import Run
from .spec import parse_spec, profile_selection
from .store import FORMAT_VERSION, MANIFEST, ExpertStore, StoreError, expert_relpath
from .writer import PARTIAL_SUFFIX, AtomicFile, FileRecord, fsync_dir


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
    fp8_block: tuple[int, int] = FP8_BLOCK,
) -> ExtractSummary:
    """Extract `model_dir` (a directory, or a Hub id org/name[@revision]) into the store `out_dir`;
    ExtractError (a ValueError) on bad input."""
    started = time.perf_counter()
    if not isinstance(workers, int) or workers < 1:
        raise ExtractError(f"{out_dir}: workers must be a positive integer, got {workers!r}")
    experts_ranges = _parse(profile_selection, experts, profile, where=model_dir)  # auto:N
    if experts_ranges is None:
        experts_ranges = _parse(parse_spec, experts, "--experts", where=model_dir)
    layer_ranges = _parse(parse_spec, layers, "--layers", where=model_dir)
    model_dir = resolve_model(model_dir, quiet=quiet)  # org/name[@revision]: the Hub snapshot
    ckpt = open_checkpoint(model_dir)
    plan = _parse(make_plan, ckpt, experts_ranges, layer_ranges, dtype, fp8_block, where=model_dir)
    out = _prepare_out_dir(Path(out_dir), ckpt.config_sha256)
    complete = _complete_store(out, plan)
    if complete is not None:
        return _summary(out, plan, complete, written=set(), started=started)
    journal = Journal(out)
    journal.open_run(ckpt.config_sha256, plan.fingerprint)
    try:
        run = Run(out, plan, journal, workers, show_progress=not quiet and sys.stderr.isatty())
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
    if manifest.get("expert_format") != plan.expert_format:
        return None
    files = {rel: FileRecord(e["bytes"], e["sha256"], e.get("tensor_bytes")) for rel, e in manifest["files"].items()}
    for rel, record in files.items():
        path = out / rel
        if not path.is_file() or path.stat().st_size != record.bytes:
            return None
    return files


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
    if plan.expert_format is not None:  # absent: dense experts without biases, as format 1 always was
        manifest["expert_format"] = plan.expert_format
    write_manifest(out, manifest)


def write_manifest(out: Path, manifest: dict) -> None:
    """manifest.json, last and durably: it vouches for files already on disk (also bench synth-store's)."""
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
