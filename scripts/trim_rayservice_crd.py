"""Write the RayService (ray.io/v1) spec schema that tests/test_deploy_rayservice.py checks
deploy/rayservice.yaml against, from KubeRay's CRD:

    python scripts/trim_rayservice_crd.py ray.io_rayservices.yaml deploy/schema/rayservice-v1.json

(the CRD is ray-operator/config/crd/bases/ray.io_rayservices.yaml of the KubeRay release
named below). kubernetes-validate knows only built-in kinds; this keeps the CRD's schema of
the RayService and its RayCluster config (1 MB, mostly pod templates) but replaces each
pod `template` (a core/v1 PodTemplateSpec) by a placeholder: the test validates those with
kubernetes-validate instead, and drops `status`, which a manifest never sets.
"""

import json
import sys

import yaml

KUBERAY = "v1.7.0 (ray-project/kuberay feeaf72fa)"


def trim(node):
    if isinstance(node, list):
        return [trim(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: ({"type": "object", "x-cadre-pod-template": True}
                               if name == "template" and "spec" in prop.get("properties", {}) else trim(prop))
                        for name, prop in value.items()}
        else:
            out[key] = trim(value)
    return out


def main(crd_path: str, out_path: str) -> None:
    crd = yaml.safe_load(open(crd_path))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = trim(version["schema"]["openAPIV3Schema"])
    schema["properties"].pop("status", None)
    schema["x-cadre-source"] = f"KubeRay {KUBERAY}, {crd['metadata']['name']} v1, pod templates and status trimmed"
    with open(out_path, "w") as f:
        json.dump(schema, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
