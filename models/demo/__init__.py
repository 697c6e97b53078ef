"""The built-in demo model: a small Qwen3-MoE trained on Shakespeare (see README, "Demo model").

`CHECKPOINT_DIR` is the shipped transformers checkpoint; `ensure_demo_store()` builds its
expert store with the extractor on first use and reuses it afterwards, so the default
server path exercises the extractor too.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CHECKPOINT_DIR = PACKAGE_DIR / "checkpoint"
HELDOUT_TEST_TEXT = PACKAGE_DIR / "heldout" / "test.txt"  # Macbeth + Twelfth Night, never trained on


def default_store_dir() -> Path:
    """$CADRE_CACHE_DIR/demo-store, or ~/.cache/cadre/demo-store."""
    base = Path(os.environ.get("CADRE_CACHE_DIR") or Path.home() / ".cache" / "cadre")
    return base / "demo-store"


def ensure_demo_store(cache_dir: Path | None = None) -> Path:
    """The demo model's expert store at cache_dir (default: default_store_dir()), built if needed.

    Reused only when its manifest names this checkpoint's config.json (sha256) and every
    file verifies; otherwise rebuilt from CHECKPOINT_DIR. A directory that is neither
    empty nor an expert store is never deleted: StoreError names it instead.
    """
    from extractor import extract_store, verify_store
    from extractor.store import StoreError, sha256_file

    store_dir = Path(cache_dir) if cache_dir is not None else default_store_dir()
    expected = sha256_file(CHECKPOINT_DIR / "config.json")
    store_dir.parent.mkdir(parents=True, exist_ok=True)
    # One builder at a time: two servers starting together must not extract into one directory.
    with _exclusive_lock(store_dir.parent / f".{store_dir.name}.lock"):
        if _is_current(store_dir, expected):
            return store_dir
        if store_dir.exists() and any(store_dir.iterdir()):
            if not _looks_like_store(store_dir):
                raise StoreError(f"{store_dir}: not empty and not an expert store; refusing to replace it")
            shutil.rmtree(store_dir)  # stale (another checkpoint) or damaged: rebuild from scratch
        extract_store(CHECKPOINT_DIR, store_dir, quiet=True)
        problems = verify_store(store_dir)
        if problems:
            raise StoreError(f"{store_dir}: freshly built demo store does not verify: {problems[0]}")
    return store_dir


def _is_current(store_dir: Path, config_sha256: str) -> bool:
    from extractor.store import ExpertStore, StoreError

    try:
        store = ExpertStore.open(store_dir)
    except StoreError:
        return False
    if store.manifest.get("source", {}).get("config_sha256") != config_sha256:
        return False
    return store.verify() == []


def _looks_like_store(path: Path) -> bool:
    from extractor.journal import JOURNAL
    from extractor.store import MANIFEST

    return (path / MANIFEST).exists() or (path / JOURNAL).exists()


@contextmanager
def _exclusive_lock(lock_path: Path):
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
