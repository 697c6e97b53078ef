"""python -m server.ray: flags (and CADRE_ variables) build the Serve application's config;
bad input exits 2 with one line; another Ray than the tested one fails at start."""

import subprocess
import sys

import pytest

import server.ray as server_ray
from server.ray.app import RayConfig, replica_options
from server.ray.cli import parse_ray_config


def test_flags_and_environment_make_the_config():
    config = parse_ray_config(["--replicas", "3", "--cache-fraction", "0.25", "--request-router", "power-of-two",
                               "--device", "cpu"], environ={"CADRE_MAX_CONCURRENCY": "8"})
    assert (config.replicas, config.request_router, config.gpus_per_replica) == (3, "power-of-two", 0.0)
    assert config.server.cache_fraction == 0.25 and config.server.max_concurrency == 8
    options = replica_options(config)
    assert options["num_replicas"] == 3 and options["max_ongoing_requests"] == 8 + 2
    assert options["graceful_shutdown_timeout_s"] == config.server.shutdown_timeout


def test_autoscaling_config_is_one_serve_accepts():
    from ray.serve.config import AutoscalingConfig

    config = parse_ray_config(["--min-replicas", "1", "--max-replicas", "4", "--device", "cpu"])
    scaling = AutoscalingConfig(**config.autoscaling)
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 4, 8.0)
    assert "num_replicas" not in replica_options(config)


@pytest.mark.parametrize("argv, named", [
    (["--replicas", "0"], "--replicas"),
    (["--request-router", "random"], "--request-router"),
    (["--min-replicas", "3", "--max-replicas", "2"], "--max-replicas"),
    (["--affinity-profile", "/no/such/file"], "--affinity-profile"),
])
def test_bad_input_exits_2_with_one_line(argv, named):
    run = subprocess.run([sys.executable, "-m", "server.ray", *argv], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m server.ray: error:") and named in lines[0]


def test_another_ray_version_fails_at_start(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "__version__", "2.61.0")
    with pytest.raises(server_ray.RayVersionError, match="tested with ray 2.60.0.*found ray 2.61.0"):
        server_ray.check_ray_version()
    monkeypatch.setattr(ray, "__version__", server_ray.TESTED_RAY_VERSION)
    server_ray.check_ray_version()


def test_serve_config_builder_takes_the_flags_without_dashes(monkeypatch):
    built = {}
    monkeypatch.setattr("server.ray.app.build_app", lambda config: built.setdefault("config", config))
    from server.ray.app import app_builder

    app_builder({"replicas": 2, "cache-fraction": "0.25", "device": "cpu", "max_replicas": 3})
    config: RayConfig = built["config"]
    assert config.server.cache_fraction == 0.25 and config.max_replicas == 3
