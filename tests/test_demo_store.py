"""ensure_demo_store(): the demo checkpoint's expert store, built by the extractor once, then reused."""

from __future__ import annotations

import json

import pytest

from extractor.store import ExpertStore, StoreError, expert_relpath
from models.demo import CHECKPOINT_DIR, default_store_dir, ensure_demo_store


def test_first_call_builds_a_verified_store_of_the_shipped_checkpoint(tmp_path):
    store_dir = ensure_demo_store(tmp_path / "demo-store")
    store = ExpertStore.open(store_dir)
    assert store.verify() == []
    config = json.loads((CHECKPOINT_DIR / "config.json").read_text())
    assert store.num_experts == config["num_local_experts"] and store.top_k == config["num_experts_per_tok"]
    assert all(store.experts_present(layer) == list(range(store.num_experts)) for layer in store.moe_layers)


def test_later_calls_reuse_it_without_rewriting(tmp_path):
    store_dir = ensure_demo_store(tmp_path / "demo-store")
    manifest_mtime = (store_dir / "manifest.json").stat().st_mtime_ns
    assert ensure_demo_store(store_dir) == store_dir
    assert (store_dir / "manifest.json").stat().st_mtime_ns == manifest_mtime


def test_damaged_or_stale_store_is_rebuilt(tmp_path):
    store_dir = ensure_demo_store(tmp_path / "demo-store")
    shard = store_dir / expert_relpath(3, 7)
    shard.write_bytes(b"\0" * shard.stat().st_size)  # same size, wrong bytes
    ensure_demo_store(store_dir)
    assert ExpertStore.open(store_dir).verify() == []

    manifest = json.loads((store_dir / "manifest.json").read_text())
    manifest["source"]["config_sha256"] = "0" * 64  # as if built from another checkpoint
    (store_dir / "manifest.json").write_text(json.dumps(manifest))
    ensure_demo_store(store_dir)
    assert ExpertStore.open(store_dir).manifest["source"]["config_sha256"] != "0" * 64


def test_a_directory_that_is_not_a_store_is_never_deleted(tmp_path):
    precious = tmp_path / "not-a-store"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not an expert store"):
        ensure_demo_store(precious)
    assert (precious / "notes.txt").read_text() == "mine"


def test_default_location_follows_cadre_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CADRE_CACHE_DIR", str(tmp_path))
    assert default_store_dir() == tmp_path / "demo-store"
    monkeypatch.delenv("CADRE_CACHE_DIR")
    assert default_store_dir().parts[-3:] == (".cache", "cadre", "demo-store")
