"""`--model org/name[@revision]` resolves through huggingface_hub: offline here, against a Hub
cache this test lays out (HF_HUB_OFFLINE=1), for the extractor, python -m models and the
server's runtime, exactly as `--model DIR` does."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from server_live import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "tiny-org/tiny-qwen3"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hub cache holding REPO at COMMIT (refs/main -> COMMIT), the way huggingface_hub lays it out."""
    checkpoint = tiny_checkpoint(tmp_path / "checkpoint")
    cache = tmp_path / "hub"
    repo = cache / ("models--" + REPO.replace("/", "--"))
    shutil.copytree(checkpoint, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "CADRE_CACHE_DIR": str(tmp_path / "cadre")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def test_extractor_reads_a_hub_id(tmp_path, hub_cache):
    from extractor import extract_store
    from extractor.store import ExpertStore

    extract_store(f"{REPO}@{COMMIT}", tmp_path / "store")
    store = ExpertStore.open(tmp_path / "store")
    assert store.manifest["source"]["path"].endswith(f"snapshots/{COMMIT}")
    assert (tmp_path / "store" / "tokenizer.json").is_file()


def test_a_hub_id_missing_from_the_offline_cache_is_one_line(tmp_path, hub_cache):
    result = subprocess.run([sys.executable, "-m", "extractor", "--model", "nobody/nothing", "--out",
                             str(tmp_path / "store")], cwd=ROOT, capture_output=True, text=True, env={
                                 **__import__("os").environ, **hub_cache}, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "nobody/nothing" in lines[0] and "cache" in lines[0], result.stderr


def test_python_m_models_generates_from_a_hub_id(hub_cache):
    import os

    result = subprocess.run([sys.executable, "-m", "models", "--model", REPO, "--prompt", "hello",
                             "--max-new-tokens", "4", "--device", "cpu"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, **hub_cache}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "4 tokens" in result.stderr
    stores = list((Path(hub_cache["CADRE_CACHE_DIR"]) / "stores").iterdir())
    assert len(stores) == 1 and (stores[0] / "manifest.json").is_file()


def test_the_server_accepts_a_hub_id():
    from server.cli import parse_config

    assert parse_config(["--model", REPO], environ={}).model == REPO


def test_only_config_tokenizer_and_safetensors_files_are_fetched():
    from huggingface_hub.utils import filter_repo_objects

    from extractor.hub import ALLOW_PATTERNS

    files = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "merges.txt",
             "model.safetensors.index.json", "model-00001-of-00002.safetensors", "pytorch_model.bin",
             "consolidated.pth", "README.md", "original/params.json", "model.gguf"]
    fetched = set(filter_repo_objects(files, allow_patterns=ALLOW_PATTERNS))
    assert fetched == set(files[:7])
