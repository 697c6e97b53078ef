"""kill -9 at any point, then re-run: the run completes, keeps what was verified, and no
manifest ever vouches for a file that is wrong. --verify reports every mismatch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from extract_helpers import build_checkpoint, expected_experts, same_bits, source_tensors
from extractor import extract_store, verify_store
from extractor.run import TEST_DELAY_ENV
from extractor.journal import JOURNAL
from extractor.safetensors_format import read_header
from extractor.store import ExpertStore, sha256_file

REPO = Path(__file__).resolve().parents[1]
SHARDS = 48  # qwen3_moe tiny: 3 layers x 16 experts


def file_records(store: Path) -> list[dict]:
    """Every file record in the journal, oldest first (a torn last line is skipped)."""
    records = []
    for line in (store / JOURNAL).read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "path" in entry:
            records.append(entry)
    return records


def journaled(store: Path) -> dict[str, str]:
    """{path: sha256} of the latest record of each file."""
    return {entry["path"]: entry["sha256"] for entry in file_records(store)}


def start_and_kill(ckpt: Path, store: Path, after_records: int, extra: tuple[str, ...] = ()) -> None:
    """Run the CLI slowed down (a pause around each rename) and SIGKILL it once the
    journal holds `after_records` file records: mid-write, mid-rename or mid-journal."""
    env = {**os.environ, "PYTHONPATH": str(REPO), TEST_DELAY_ENV: "0.02"}
    proc = subprocess.Popen([sys.executable, "-m", "extractor", "--model", str(ckpt), "--out", str(store),
                             "--workers", "2", "--quiet", *extra], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while (not (store / JOURNAL).exists() or len(file_records(store)) < after_records) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


def assert_renames_were_atomic(store: Path) -> None:
    """A shard at its final path is complete; within one plan, a journaled file that exists
    is the file its record hashed."""
    for shard in store.glob("experts/layer_*/expert_*.safetensors"):
        read_header(shard)  # raises on a partial file
    for rel, sha in journaled(store).items():
        if (store / rel).exists():
            assert sha256_file(store / rel) == sha, rel


def test_resume_after_kills(tmp_path):
    ckpt = build_checkpoint(tmp_path / "ckpt", "qwen3_moe", dtype=torch.bfloat16)
    store = tmp_path / "store"
    start_and_kill(ckpt, store, after_records=8)
    assert not (store / "manifest.json").exists()
    assert_renames_were_atomic(store)
    start_and_kill(ckpt, store, after_records=len(file_records(store)) + 10)
    assert not (store / "manifest.json").exists()
    assert_renames_were_atomic(store)

    # a kept shard must still hash to its record: damage one to see it rewritten, not kept
    victim = next(rel for rel in journaled(store) if rel.startswith("experts/"))
    (store / victim).write_bytes(b"\0" * (store / victim).stat().st_size)
    done_before = {rel for rel in journaled(store) if rel.startswith("experts/") and (store / rel).exists()}

    summary = extract_store(ckpt, store)
    assert summary.shards == SHARDS
    assert summary.shards_skipped == len(done_before) - 1 >= 8
    assert summary.shards_written == SHARDS - summary.shards_skipped
    assert verify_store(store) == []
    assert not list(store.rglob("*.partial"))
    loaded = ExpertStore.open(store)
    for (layer, expert), projections in expected_experts(source_tensors(ckpt)).items():
        shard = loaded.load_expert(layer, expert)
        assert all(same_bits(shard[name], tensor) for name, tensor in projections.items())


def test_killed_rewrite_never_leaves_a_stale_manifest(tmp_path):
    """A finished store re-extracted with another dtype: killed half way, the old manifest
    must not survive to vouch for shards that now hold the new dtype."""
    ckpt = build_checkpoint(tmp_path / "ckpt", "qwen3_moe", dtype=torch.float32)
    store = tmp_path / "store"
    extract_store(ckpt, store, dtype="bfloat16")
    start_and_kill(ckpt, store, after_records=len(file_records(store)) + 5)  # auto: float32 shards
    assert not (store / "manifest.json").exists()
    extract_store(ckpt, store)
    assert verify_store(store) == [] and ExpertStore.open(store).dtype == torch.float32


def test_verify_reports_every_mismatch(tmp_path):
    ckpt = build_checkpoint(tmp_path / "ckpt", "mixtral", dtype=torch.bfloat16)
    store = tmp_path / "store"
    extract_store(ckpt, store)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    verify = [sys.executable, "-m", "extractor", "--out", str(store), "--verify"]
    ok = subprocess.run(verify, capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and ok.stderr == "", ok

    shard = store / "experts/layer_002/expert_005.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # one flipped bit
    shard.write_bytes(bytes(data))
    (store / "trunk.safetensors").unlink()
    bad = subprocess.run(verify, capture_output=True, text=True, env=env)
    assert bad.returncode == 2
    lines = bad.stderr.splitlines()
    assert len(lines) == 2 and any(str(shard) in line for line in lines) and any("trunk" in line for line in lines)
