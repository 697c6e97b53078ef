"""One extraction's writing: small files, the trunk and the expert shards, then fsync.

Threads: the caller's thread starts expert shards in source order (at most `workers` in
flight, each holding one shard buffer) and keeps kernel readahead ahead of them; one
pool thread streams the trunk; `workers` pool threads write shards. The first failure
of any thread stops the rest and is raised in the caller's thread.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from .checkpoint import COPIED_FILES
from .journal import Journal
from .plan import ExpertJob, Plan
from .store import MANIFEST, TRUNK, expert_relpath, sha256_file
from .writer import AtomicFile, FileRecord, SourceFiles, TrunkWriter, fsync_dir, fsync_path, write_expert

# Test hook: seconds to pause around each rename, so a test can kill -9 a run mid-way.
TEST_DELAY_ENV = "CADRE_EXTRACT_TEST_DELAY_S"
PREFETCH_BYTES = 128 << 20  # source bytes asked of the kernel ahead of the shard writers


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


class Run:
    """Writes every file of `plan` into `out` (execute() returns their records); the caller
    writes the manifest from them."""

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
