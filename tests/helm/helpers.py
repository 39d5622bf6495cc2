"""Offline rendering and validation helpers for the Helm chart: helm-python-sdk renders, kubernetes-validate checks
built-in kinds, jsonschema checks the RayService against the KubeRay CRD with unknown fields rejected."""
from __future__ import annotations

import functools
from pathlib import Path

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "helm" / "epserve"
CI_VALUES = sorted((CHART_DIR / "ci").glob("*-values.yaml"))
KUBE_VERSION = "1.34.0"  # pinned: kubernetes-validate schemas and `helm lint --kube-version`
RELEASE, NAMESPACE = "gptoss", "llm"

CRD_NAME = "ray.io_rayservices.yaml"
SHARED_CRD = REPO.parent / "shared" / "k8s" / "crds" / CRD_NAME
VENDORED_CRD = Path(__file__).resolve().parent / "crds" / CRD_NAME


def case_values(case: str) -> dict:
    """Values of a test case: "default" (the chart's values.yaml) or a ci/ values file name."""
    if case == "default":
        return {}
    return yaml.safe_load((CHART_DIR / "ci" / case).read_text()) or {}


@functools.cache
def chart():
    import helm_python
    return helm_python.Chart.load(str(CHART_DIR))


def render(values: dict | None = None) -> list[dict]:
    """Render like `helm template gptoss helm/epserve -n llm -f values`; returns the non-empty YAML documents."""
    manifests = chart().render(values or {}, name=RELEASE, namespace=NAMESPACE)
    docs = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def notes(values: dict | None = None) -> str:
    manifests = chart().render(values or {}, name=RELEASE, namespace=NAMESPACE)
    return next(text for path, text in manifests.items() if path.endswith("NOTES.txt"))


def merged_values(values: dict | None = None) -> dict:
    """The chart defaults coalesced with `values`, as an install would use them."""
    return chart().merge_values(values or {})


def only(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def crd_path() -> Path:
    """The RayService CRD: ../shared/k8s/crds next to the repo (the source), else the copy vendored in tests/helm/crds."""
    for path in (SHARED_CRD, VENDORED_CRD):
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"KubeRay RayService CRD not found: looked for {SHARED_CRD} (the shared folder next to the repository) "
        f"and {VENDORED_CRD} (the vendored copy); restore one of them")


def _reject_unknown_fields(node):
    """What the API server's strict field validation does: an object that lists its properties accepts no others,
    unless it sets x-kubernetes-preserve-unknown-fields."""
    if isinstance(node, list):
        for item in node:
            _reject_unknown_fields(item)
        return
    if not isinstance(node, dict):
        return
    if ("properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        node["additionalProperties"] = False
    for key in ("properties", "patternProperties"):
        for child in node.get(key, {}).values():
            _reject_unknown_fields(child)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            _reject_unknown_fields(node[key])
    for key in ("allOf", "anyOf", "oneOf"):
        _reject_unknown_fields(node.get(key, []))


@functools.cache
def rayservice_validator() -> jsonschema.Draft4Validator:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 0.4 s instead of 10 s for this 1 MB file
    crd = yaml.load(crd_path().read_text(), Loader=loader)
    assert crd["spec"]["names"]["kind"] == "RayService"
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = version["schema"]["openAPIV3Schema"]
    _reject_unknown_fields(schema)
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def validate_builtin(obj: dict) -> None:
    import kubernetes_validate
    kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def serve_config(rayservice: dict) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def serve_args(rayservice: dict) -> dict:
    (app,) = serve_config(rayservice)["applications"]
    return app["args"]


MODEL_SERVER, GATEWAY = "ModelServer", "Gateway"  # the names deploy/app.py's build_app gives its deployments


def deployment_override(rayservice: dict, name: str) -> dict:
    """The application's `deployments:` entry for deployment `name`, without the name."""
    (app,) = serve_config(rayservice)["applications"]
    (override,) = [d for d in app["deployments"] if d["name"] == name]
    return {k: v for k, v in override.items() if k != "name"}


def scaling_override(rayservice: dict) -> dict:
    """The ModelServer replicas: num_replicas or autoscaling_config."""
    return deployment_override(rayservice, MODEL_SERVER)


def replica_bounds(rayservice: dict) -> tuple[int, int]:
    """(fewest, most) ModelServer replicas the Serve config asks for."""
    override = scaling_override(rayservice)
    if "autoscaling_config" in override:
        return override["autoscaling_config"]["min_replicas"], override["autoscaling_config"]["max_replicas"]
    return override["num_replicas"], override["num_replicas"]


def worker_groups(rayservice: dict) -> list[dict]:
    return rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]


def pod_templates(rayservice: dict) -> dict[str, dict]:
    """{"head": template, "<worker group>": template}."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    templates = {"head": cluster["headGroupSpec"]["template"]}
    templates.update({g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]})
    return templates


def gpus_per_pod(template: dict) -> int:
    (container,) = template["spec"]["containers"]
    limits = container.get("resources", {}).get("limits", {})
    requests = container.get("resources", {}).get("requests", {})
    assert limits.get("nvidia.com/gpu") == requests.get("nvidia.com/gpu"), "GPU requests and limits differ"
    return int(limits.get("nvidia.com/gpu", 0))
