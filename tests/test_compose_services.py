"""docker-compose.yml (and its GPU override) name the stack issue 7 promises: cadre on
8000, a pinned Prometheus scraping it every 5 s, a pinned Grafana provisioned with the
cadre dashboard and anonymous read-only access, and the extractor under a profile,
writing to the volume the server reads. No Docker engine: the files are parsed."""

from __future__ import annotations

import re

import pytest
from compose_helpers import COMPOSE, COMPOSE_GPU, GRAFANA, PROMETHEUS_CONFIG, REPO, load_yaml

PINNED_IMAGE = re.compile(r"^[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}$")
# SOURCE:TARGET[:MODE], where SOURCE may be an interpolation like ${VAR:-./dir} (colons inside)
SHORT_VOLUME = re.compile(r"^(?P<source>\$\{[^}]*\}|[^:]+):(?P<target>[^:]+)(?::(?P<mode>\w+))?$")


@pytest.fixture(scope="module")
def compose():
    return load_yaml(COMPOSE)


def mounts(service: dict) -> dict[str, str]:
    """{target: source} of a service's short-syntax volumes (mode suffix dropped)."""
    found = {}
    for entry in service.get("volumes", []):
        match = SHORT_VOLUME.match(entry)
        assert match, entry
        found[match["target"]] = match["source"]
    return found


def published(service: dict) -> set[int]:
    return {int(port.rsplit(":", 1)[1]) for port in service.get("ports", [])}


def test_the_four_services_and_only_the_extractor_under_a_profile(compose):
    services = compose["services"]
    assert set(services) == {"cadre", "prometheus", "grafana", "extractor"}
    assert services["extractor"]["profiles"] == ["extractor"]
    assert all("profiles" not in services[name] for name in ("cadre", "prometheus", "grafana"))


def test_published_ports(compose):
    services = compose["services"]
    assert published(services["cadre"]) == {8000}
    assert published(services["prometheus"]) == {9090}
    assert published(services["grafana"]) == {3000}
    assert not published(services["extractor"])


def test_cadre_is_built_from_the_repository_dockerfile(compose):
    for name in ("cadre", "extractor"):
        build = compose["services"][name]["build"]
        assert (REPO / build["context"] / build["dockerfile"]).resolve() == REPO / "docker" / "Dockerfile"
    assert "command" not in compose["services"]["cadre"], "the image's ENTRYPOINT + CMD is the command"
    assert "entrypoint" not in compose["services"]["cadre"]


def test_third_party_images_are_pinned_by_tag_and_digest(compose):
    services = compose["services"]
    assert services["prometheus"]["image"].startswith("prom/prometheus:v")
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    for name in ("prometheus", "grafana"):
        assert PINNED_IMAGE.match(services[name]["image"]), services[name]["image"]


def test_volumes_store_model_and_cache_are_shared_by_server_and_extractor(compose):
    cadre, extractor = mounts(compose["services"]["cadre"]), mounts(compose["services"]["extractor"])
    assert {"/models", "/stores", "/cache"} <= set(cadre)
    assert cadre["/stores"] == extractor["/stores"] == "stores"  # the extractor writes what cadre serves
    assert cadre["/models"] == extractor["/models"]
    assert all(entry.endswith(":/models:ro") for service in ("cadre", "extractor")
               for entry in compose["services"][service]["volumes"] if "/models" in entry)
    named = {source for service in compose["services"].values() for source in mounts(service).values()
             if not source.startswith((".", "/", "$"))}
    assert named <= set(compose["volumes"])


def test_extractor_defaults_its_output_to_the_stores_volume(compose):
    assert compose["services"]["extractor"]["entrypoint"] == ["cadre-extract"]
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert "docker/extract.sh /usr/local/bin/cadre-extract" in dockerfile
    assert "CADRE_STORES_DIR=/stores" in dockerfile


def test_prometheus_gets_the_repository_config_and_scrapes_cadre_every_5s(compose):
    prometheus = compose["services"]["prometheus"]
    config_mount = mounts(prometheus)["/etc/prometheus/prometheus.yml"]
    assert (REPO / config_mount).resolve() == PROMETHEUS_CONFIG
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    config = load_yaml(PROMETHEUS_CONFIG)
    assert config["global"]["scrape_interval"] == "5s"
    (cadre_job,) = [job for job in config["scrape_configs"] if job["job_name"] == "cadre"]
    assert cadre_job["static_configs"][0]["targets"] == ["cadre:8000"]
    assert cadre_job.get("metrics_path", "/metrics") == "/metrics"


def test_grafana_is_provisioned_and_anonymous_viewers_read_only(compose):
    grafana = compose["services"]["grafana"]
    volumes = mounts(grafana)
    assert (REPO / volumes["/etc/grafana/provisioning"]).resolve() == GRAFANA / "provisioning"
    assert (REPO / volumes["/etc/grafana/dashboards"]).resolve() == GRAFANA / "dashboards"
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"

    (datasource,) = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    (provider,) = load_yaml(GRAFANA / "provisioning" / "dashboards" / "cadre.yml")["providers"]
    assert provider["options"]["path"] == "/etc/grafana/dashboards"
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == "/etc/grafana/dashboards/cadre.json"
    assert (GRAFANA / "dashboards" / "cadre.json").is_file()


def test_gpu_override_reserves_nvidia_gpus_and_builds_the_cuda_image():
    override = load_yaml(COMPOSE_GPU)["services"]
    assert set(override) <= {"cadre", "extractor"}
    (device,) = override["cadre"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "cuda" in override["cadre"]["environment"]["CADRE_DEVICE"]
    for name in ("cadre", "extractor"):
        build = override[name]["build"]
        assert build["dockerfile"] == "docker/Dockerfile"
        assert build["args"]["TORCH_INDEX_URL"] == "https://pypi.org/simple"  # PyPI's Linux torch carries CUDA
        assert override[name]["image"] == "cadre:cuda"


def test_every_variable_passed_to_cadre_is_a_server_flag(compose):
    """compose passes CADRE_* through from the shell; each must be one `python -m server`
    reads (a typo would be silently ignored by the container)."""
    import subprocess
    import sys

    help_text = subprocess.run([sys.executable, "-m", "server", "--help"], cwd=REPO, capture_output=True,
                               text=True, check=True, timeout=60).stdout
    flags = {"CADRE_" + flag.replace("-", "_").upper() for flag in re.findall(r"--([a-z][a-z-]+)", help_text)}
    passed = {entry.split("=")[0] for entry in compose["services"]["cadre"]["environment"]}
    assert passed, "cadre takes its configuration from CADRE_* variables"
    assert passed <= flags, f"not server flags: {sorted(passed - flags)}"
