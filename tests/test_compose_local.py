"""docker-compose.local.yml, the registry-free path CI runs for real (scripts/compose_smoke.sh):
it changes how images are built, never what runs. The same services, ports, volumes and
commands as docker-compose.yml; cadre from the same Dockerfile on a local BASE_IMAGE;
Prometheus from Debian's package with the same arguments; Grafana untouched. No engine:
the files are parsed (the smoke test runs them)."""

from __future__ import annotations

import re

from compose_helpers import COMPOSE, COMPOSE_LOCAL, PROMETHEUS_DOCKERFILE, REPO, exec_form, final_stage, load_yaml

# What an override may set: how an image is built and named, nothing a running service sees.
BUILD_ONLY_KEYS = {"build", "image"}


def test_override_only_changes_how_images_are_built():
    base, local = load_yaml(COMPOSE)["services"], load_yaml(COMPOSE_LOCAL)["services"]
    assert set(local) == {"cadre", "extractor", "prometheus"}  # grafana: no local path, left as it is
    for name, service in local.items():
        assert set(service) <= BUILD_ONLY_KEYS, f"{name}: {set(service) - BUILD_ONLY_KEYS}"
        assert name in base


def test_cadre_is_the_same_dockerfile_on_a_local_base():
    local = load_yaml(COMPOSE_LOCAL)["services"]
    for name in ("cadre", "extractor"):
        build = local[name]["build"]
        assert (REPO / build["context"] / build["dockerfile"]).resolve() == REPO / "docker" / "Dockerfile"
        assert build["args"]["BASE_IMAGE"].startswith("${CADRE_BASE_IMAGE:-")
        assert build["network"] == "host"  # pip reaches the host's wheel sources on loopback
        assert build["secrets"] == ["pip_cert"]
        assert "image" not in local[name]  # still cadre:cpu, the tag the base file names


def test_prometheus_is_debians_with_the_arguments_of_the_pinned_image():
    base = load_yaml(COMPOSE)["services"]["prometheus"]
    local = load_yaml(COMPOSE_LOCAL)["services"]["prometheus"]
    assert (REPO / local["build"]["context"]).resolve() == PROMETHEUS_DOCKERFILE.parent
    assert not local["image"].startswith("prom/")
    # compose's command replaces the image's CMD: the flags must exist in Debian's 2.42 too
    text = PROMETHEUS_DOCKERFILE.read_text()
    assert re.search(r"prometheus=2\.42\.\*", text)
    stage = final_stage(PROMETHEUS_DOCKERFILE)
    assert exec_form(stage, "ENTRYPOINT") == ["/usr/bin/prometheus"]
    flags = {arg.split("=")[0] for arg in base["command"]}
    assert flags <= {"--config.file", "--storage.tsdb.path", "--storage.tsdb.retention.time"}
    (user,) = [args for keyword, args in stage if keyword == "USER"]
    assert user.split(":")[0].isdigit() and user.split(":")[0] != "0"


def test_the_smoke_script_runs_from_ci_and_never_skips():
    ci = (REPO / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in ci and "bash scripts/compose_smoke.sh" in ci
    assert ci.index("bash scripts/test.sh") < ci.index("bash scripts/compose_smoke.sh")
    script = (REPO / "scripts" / "compose_smoke.sh").read_text()
    assert "set -euo pipefail" in script and "trap teardown EXIT" in script
    assert "skip" not in script.lower().replace("never skips", "")
    assert "down -v" in script and 'kill "$DOCKERD_PID"' in script
