"""Bad input: exit code 2, one stderr line naming the problem and the path, and nothing
left behind that claims to be a store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from extract_helpers import build_checkpoint
from extractor import verify_store
from extractor.__main__ import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("good") / "ckpt", "qwen3_moe", dtype=torch.bfloat16)


def copy_of(ckpt: Path, dest: Path) -> Path:
    dest.mkdir()
    for path in ckpt.iterdir():
        (dest / path.name).write_bytes(path.read_bytes())
    return dest


def run_cli(capsys, *argv) -> tuple[int, list[str]]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.splitlines()


def assert_refused(capsys, out: Path, *argv, says: str, path: Path):
    code, err = run_cli(capsys, *argv, "--out", out)
    assert code == 2
    assert len(err) == 1, err
    assert says in err[0] and str(path) in err[0], err[0]
    assert not (out / "manifest.json").exists()


def test_missing_checkpoint(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert_refused(capsys, tmp_path / "store", "--model", missing, says="not found", path=missing)
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("content, says", [(None, "missing"), (b"{not json", "not valid JSON")])
def test_unreadable_config(tmp_path, capsys, good_ckpt, content, says):
    ckpt = copy_of(good_ckpt, tmp_path / "ckpt")
    if content is None:
        (ckpt / "config.json").unlink()
    else:
        (ckpt / "config.json").write_bytes(content)
    assert_refused(capsys, tmp_path / "store", "--model", ckpt, says=says, path=ckpt / "config.json")


@pytest.mark.parametrize("edit, says", [
    ({"model_type": "llama"}, "non-MoE model_type 'llama'"),
    ({"model_type": "mystery_moe"}, "unknown or non-MoE model_type 'mystery_moe'"),
    ({"num_experts": 0, "num_local_experts": 0}, "not an MoE model"),
])
def test_config_that_is_not_a_supported_moe(tmp_path, capsys, good_ckpt, edit, says):
    ckpt = copy_of(good_ckpt, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, **edit}))
    assert_refused(capsys, tmp_path / "store", "--model", ckpt, says=says, path=ckpt / "config.json")


@pytest.mark.parametrize("flag, spec, says", [
    ("--experts", "0-16", "expert 16 out of range"),
    ("--layers", "3", "layer 3 out of range"),
    ("--experts", "7-3", "runs backwards"),
    ("--layers", "1,x", "malformed"),
    ("--experts", "", "malformed"),
])
def test_bad_selection(tmp_path, capsys, good_ckpt, flag, spec, says):
    assert_refused(capsys, tmp_path / "store", "--model", good_ckpt, flag, spec, says=says, path=good_ckpt)
    assert not (tmp_path / "store").exists()


def _truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[:-100])


def _garble_header(path: Path):
    data = bytearray(path.read_bytes())
    data[8:16] = b"\x00garble!"
    path.write_bytes(bytes(data))


def _huge_header_length(path: Path):
    data = bytearray(path.read_bytes())
    data[:8] = (1 << 40).to_bytes(8, "little")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, says", [
    (_truncate, "truncated"), (_garble_header, "header is not JSON"), (_huge_header_length, "header length"),
])
def test_corrupt_safetensors(tmp_path, capsys, good_ckpt, damage, says):
    ckpt = copy_of(good_ckpt, tmp_path / "ckpt")
    victim = sorted(ckpt.glob("*.safetensors"))[3]
    damage(victim)
    assert_refused(capsys, tmp_path / "store", "--model", ckpt, says=f"corrupt safetensors file: {says}", path=victim)
    assert not (tmp_path / "store").exists()


def test_index_naming_a_missing_shard(tmp_path, capsys, good_ckpt):
    ckpt = copy_of(good_ckpt, tmp_path / "ckpt")
    victim = sorted(ckpt.glob("*.safetensors"))[0]
    victim.unlink()
    assert_refused(capsys, tmp_path / "store", "--model", ckpt, says="missing", path=victim)


def test_store_of_a_different_model(tmp_path, capsys, good_ckpt):
    other = build_checkpoint(tmp_path / "other", "olmoe", dtype=torch.bfloat16)
    assert main(["--model", str(other), "--out", str(tmp_path / "store"), "--quiet"]) == 0
    before = (tmp_path / "store/manifest.json").read_bytes()
    capsys.readouterr()  # transformers' save progress bar

    code, err = run_cli(capsys, "--model", good_ckpt, "--out", tmp_path / "store")
    assert code == 2 and len(err) == 1 and "different model" in err[0] and str(tmp_path / "store") in err[0]
    assert (tmp_path / "store/manifest.json").read_bytes() == before
    assert verify_store(tmp_path / "store") == []


def test_output_dir_that_is_not_a_store(tmp_path, capsys, good_ckpt):
    (tmp_path / "home").mkdir()
    (tmp_path / "home/notes.txt").write_text("mine")
    assert_refused(capsys, tmp_path / "home", "--model", good_ckpt, says="not an expert store", path=tmp_path / "home")
    assert sorted(p.name for p in (tmp_path / "home").iterdir()) == ["notes.txt"]


def test_real_process_exit_code_and_single_line(tmp_path, good_ckpt):
    """The same contract through the interpreter, argparse errors included."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for argv, says in [
        (["--model", str(good_ckpt), "--out", str(tmp_path / "s"), "--workers", "0"], "workers"),
        (["--model", str(good_ckpt), "--out", str(tmp_path / "s"), "--dtype", "int4"], "--dtype"),
        (["--model", str(good_ckpt)], "--out"),
    ]:
        done = subprocess.run([sys.executable, "-m", "extractor", *argv], capture_output=True, text=True, env=env,
                              cwd=tmp_path)
        assert done.returncode == 2, done
        assert len(done.stderr.splitlines()) == 1 and says in done.stderr, done.stderr
        assert not (tmp_path / "s").exists()


def test_mxfp4_experts_narrower_than_a_block(tmp_path, capsys):
    """MXFP4 scales blocks of 32 input features: experts of 16 have no whole block (their
    `*_blocks` are empty), refused at extraction rather than failing at the first load."""
    from quantized_checkpoints import make_mxfp4_checkpoint

    ckpt = make_mxfp4_checkpoint(tmp_path / "ckpt")  # the tiny gpt-oss: intermediate_size 16
    capsys.readouterr()  # transformers' progress bars while writing it
    assert_refused(capsys, tmp_path / "store", "--model", ckpt, says="divisible by 32", path=ckpt)
