"""deploy/rayservice.yaml, checked without a cluster: built-in kinds and every pod template
with kubernetes-validate (strict), the RayService against KubeRay's CRD schema (its pod
templates trimmed, deploy/schema/), its serveConfigV2 against Ray Serve's own schema, and
the application's args against python -m server.ray's flags."""

import json
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from jsonschema import Draft7Validator

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "deploy" / "rayservice.yaml"
CRD_SCHEMA = ROOT / "deploy" / "schema" / "rayservice-v1.json"
K8S = "1.31"


def documents() -> list[dict]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def ray_service() -> dict:
    return next(d for d in documents() if d["kind"] == "RayService")


def closed(schema):
    """The CRD schema, with unknown fields rejected: Kubernetes would silently prune a misspelt one."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def pod_templates(service: dict) -> list[dict]:
    cluster = service["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]


def test_built_in_kinds_validate():
    built_in = [d for d in documents() if d["kind"] != "RayService"]
    assert built_in
    for doc in built_in:
        kubernetes_validate.validate(doc, K8S, strict=True)


def test_ray_service_matches_the_kuberay_crd():
    errors = sorted(Draft7Validator(closed(json.loads(CRD_SCHEMA.read_text()))).iter_errors(ray_service()),
                    key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_a_misspelt_field_is_caught():
    service = ray_service()
    service["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParms"] = {}
    assert list(Draft7Validator(closed(json.loads(CRD_SCHEMA.read_text()))).iter_errors(service))


@pytest.mark.parametrize("index", [0, 1])
def test_pod_templates_validate(index):
    template = pod_templates(ray_service())[index]
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "cadre"},
                                  "template": template}, K8S, strict=True)


def test_serve_config_deploys_the_cadre_app_with_valid_flags(monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    from server.ray.cli import parse_ray_config

    config = ServeDeploySchema.model_validate(yaml.safe_load(ray_service()["spec"]["serveConfigV2"]))
    (app,) = config.applications
    assert app.import_path == "server.ray.app:app_builder"
    # the store and the profile live on the cluster's volume
    monkeypatch.setattr("server.ray.cli.check_paths", lambda parser, args: None)
    monkeypatch.setattr("server.ray.cli.os.path.isfile", lambda path: True)
    argv = [part for key, value in app.args.items() for part in (f"--{key}", str(value))]
    ray_config = parse_ray_config(argv)
    assert ray_config.autoscaling["max_replicas"] == 4 and ray_config.gpus_per_replica == 1.0
    assert ray_service()["spec"]["rayClusterConfig"]["rayVersion"] == "2.60.0"
