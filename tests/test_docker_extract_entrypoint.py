"""docker/extract.sh, the compose `extractor` service's entry point: the issue's command

    docker compose run --rm extractor --model /models/NAME --experts 0-7 --layers all

names no output, so the script sends the store to $CADRE_STORES_DIR/NAME (the volume the
server reads). Run here with sh and the real extractor on a tiny checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from compose_helpers import REPO
from tiny_models import make_checkpoint

SCRIPT = REPO / "docker" / "extract.sh"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("models") / "tiny-qwen3", "qwen3_moe")


def extract(args: list[str], stores) -> subprocess.CompletedProcess:
    env = {**os.environ, "CADRE_STORES_DIR": str(stores), "PYTHON": sys.executable}
    return subprocess.run(["sh", str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def experts_written(store) -> dict[str, list[int]]:
    return json.loads((store / "manifest.json").read_text())["experts"]


def test_the_issue_command_writes_the_store_to_the_stores_volume(checkpoint, tmp_path):
    result = extract(["--model", str(checkpoint), "--experts", "0-7", "--layers", "all", "--quiet"], tmp_path)
    assert result.returncode == 0, result.stderr
    experts = experts_written(tmp_path / checkpoint.name)
    assert experts and all(ids == list(range(8)) for ids in experts.values())


def test_model_given_with_equals_and_a_trailing_slash(checkpoint, tmp_path):
    result = extract([f"--model={checkpoint}/", "--experts", "0-1", "--quiet"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert all(ids == [0, 1] for ids in experts_written(tmp_path / checkpoint.name).values())


def test_an_explicit_out_is_kept(checkpoint, tmp_path):
    out = tmp_path / "elsewhere"
    result = extract(["--model", str(checkpoint), "--out", str(out), "--experts", "0", "--quiet"], tmp_path / "stores")
    assert result.returncode == 0, result.stderr
    assert (out / "manifest.json").is_file()
    assert not (tmp_path / "stores").exists()


def test_extractor_errors_pass_through(tmp_path):
    result = extract(["--model", str(tmp_path / "missing"), "--quiet"], tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "missing" in result.stderr
