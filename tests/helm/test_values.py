"""Values: bad ones are rejected at install time with a message naming the value; every value is documented
(`# --` comment, README table); the schema's bounds are AppArgs' bounds."""
import json
import re

import helm_python
import pytest
import yaml
from annotated_types import Ge, Gt

from deploy.app_config import AppArgs
from tests.helm.helpers import CHART_DIR, KUBE_VERSION, chart, render

PVC_ONLY = {"model": {"pvc": {"claimName": "weights"}, "hostPath": {"path": ""}}}

# (values, fragments the error message must contain)
INVALID = {
    "ep-size-not-fitting-pods": (
        {"expertParallel": {"epSize": 12}, "worker": {"gpusPerNode": 8}},
        ["expertParallel.epSize=12 does not fit worker pods of worker.gpusPerNode=8",
         "divides gpusPerNode: 1, 2, 4, 8", "multiple of gpusPerNode: 8, 16"]),
    "ep-size-straddling-pods": (
        {"expertParallel": {"epSize": 3}, "worker": {"gpusPerNode": 4}},
        ["expertParallel.epSize=3 does not fit worker pods of worker.gpusPerNode=4"]),
    "negative-replicas": ({"numReplicas": -1}, ["/numReplicas", "minimum: got -1, want 0"]),
    "negative-max-replicas": ({"autoscaling": {"enabled": True, "maxReplicas": -2}},
                              ["/autoscaling/maxReplicas", "minimum: got -2, want 1"]),
    "zero-ep-size": ({"expertParallel": {"epSize": 0}}, ["/expertParallel/epSize", "minimum: got 0, want 1"]),
    "no-model-source": ({"model": {"pvc": {"claimName": ""}, "hostPath": {"path": ""}}},
                        ["no model source", "model.pvc.claimName", "model.hostPath.path"]),
    "two-model-sources": ({"model": {"pvc": {"claimName": "weights"}, "hostPath": {"path": "/data/m"}}},
                          ["two model sources", "set only one of model.pvc.claimName"]),
    "relative-host-path": ({"model": {"pvc": {"claimName": ""}, "hostPath": {"path": "data/m"}}},
                           ["/model/hostPath/path"]),
    "partly-used-pod": ({"expertParallel": {"epSize": 4}, "numReplicas": 1},
                        ["numReplicas=1 x expertParallel.epSize=4 = 4 GPUs is not a whole number of worker pods",
                         "set worker.gpusPerNode to 4"]),
    "partly-used-pod-at-max": ({"expertParallel": {"epSize": 4},
                                "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 3}},
                               ["autoscaling.maxReplicas=3 x expertParallel.epSize=4 = 12 GPUs"]),
    "min-above-max": ({"autoscaling": {"enabled": True, "minReplicas": 4, "maxReplicas": 2}},
                      ["autoscaling.minReplicas=4 exceeds autoscaling.maxReplicas=2"]),
    "pod-ceiling-too-low": ({"numReplicas": 3, "rayAutoscaler": {"maxWorkerPods": 2}},
                            ["rayAutoscaler.maxWorkerPods=2 is below the 3 worker pods"]),
    "batch-below-seqs": ({"engine": {"maxNumSeqs": 256, "maxNumBatchedTokens": 128}},
                         ["engine.maxNumBatchedTokens=128 must be >= engine.maxNumSeqs=256"]),
    "api-keys-without-keys": ({"apiKeys": {"enabled": True}}, ["apiKeys.enabled is true but no keys are given"]),
    "api-keys-twice": ({"apiKeys": {"enabled": True, "keys": ["a"], "existingSecret": "s"}},
                       ["set only one of apiKeys.keys and apiKeys.existingSecret"]),
    "api-key-with-comma": ({"apiKeys": {"enabled": True, "keys": ["a,b"]}}, ["/apiKeys/keys/0"]),
    "unknown-value": ({"engine": {"maxModelLength": 8192}}, ["additional properties 'maxModelLength' not allowed"]),
    "gpus-in-resources": ({"worker": {"resources": {"limits": {"nvidia.com/gpu": 4}}}}, ["/worker/resources/limits"]),
    "chart-owned-ray-start-param": ({"head": {"rayStartParams": {"metrics-export-port": "9090"}}},
                                    ["/head/rayStartParams/metrics-export-port", "false schema"]),
    "dashboard-host-override": ({"head": {"rayStartParams": {"dashboard-host": "127.0.0.1"}}},
                                ["/head/rayStartParams/dashboard-host", "false schema"]),
    "ray-auth-through-env": ({"env": [{"name": "RAY_AUTH_MODE", "value": "token"}]},
                             ["env sets RAY_AUTH_MODE: use rayAuth.enabled"]),
    "gateway-replicas-zero": ({"gatewayReplicas": 0}, ["/gatewayReplicas", "minimum: got 0, want 1"]),
    "network-policy-peer-typo": ({"networkPolicy": {"dashboardFrom": [{"namespaceSelectors": {}}]}},
                                 ["/networkPolicy/dashboardFrom/0"]),
    "bad-placement": ({"expertParallel": {"placementStrategy": "STRICT_PACK"}},
                      ["/expertParallel/placementStrategy", "value must be one of"]),
}


@pytest.mark.parametrize("name", INVALID)
def test_invalid_values_are_rejected_with_a_clear_message(name):
    values, fragments = INVALID[name]
    with pytest.raises(helm_python.HelmError) as caught:
        render(values)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_lint_reports_schema_violations():
    # Helm's lint mode turns a template `fail` into a log line, so lint sees the schema's checks; the rules across
    # values stop `helm template`, `install` and `upgrade` (test above).
    values, fragments = INVALID["negative-replicas"]
    report = helm_python.lint(str(CHART_DIR), values, strict=True, kube_version=f"v{KUBE_VERSION}")
    assert any(fragments[1] in e for e in report["errors"]), report


@pytest.mark.parametrize("ep, gpn", [(1, 8), (2, 8), (4, 4), (8, 8), (16, 8), (24, 8), (2, 1), (4, 2)])
def test_ep_sizes_that_fit(ep, gpn):
    replicas = max(1, gpn // ep)  # enough replicas to fill whole pods
    render({**PVC_ONLY, "expertParallel": {"epSize": ep}, "worker": {"gpusPerNode": gpn}, "numReplicas": replicas})


def _documented_paths(text: str) -> tuple[set[str], set[str]]:
    """(paths with a `# --` comment, values without one), from values.yaml's own text (helm-docs' convention)."""
    lines = text.splitlines()
    documented, undocumented = set(), set()

    def has_doc(line_no: int) -> bool:
        i = line_no - 1
        while i >= 0 and lines[i].strip().startswith("#"):
            if lines[i].strip().startswith("# --"):
                return True
            i -= 1
        return False

    def walk(node, prefix):
        for key_node, value_node in node.value:
            path = f"{prefix}{key_node.value}"
            if has_doc(key_node.start_mark.line):
                documented.add(path)  # a documented map is one value: its keys need no comment of their own
            elif isinstance(value_node, yaml.MappingNode) and value_node.value:
                walk(value_node, path + ".")
            else:
                undocumented.add(path)

    walk(yaml.compose(text), "")
    return documented, undocumented


def test_every_value_has_a_helm_docs_comment():
    documented, undocumented = _documented_paths((CHART_DIR / "values.yaml").read_text())
    assert documented and not undocumented, f"values without a '# --' comment: {sorted(undocumented)}"


def test_readme_lists_every_value():
    documented, _ = _documented_paths((CHART_DIR / "values.yaml").read_text())
    readme = (CHART_DIR / "README.md").read_text()
    missing = [p for p in sorted(documented) if f"| `{p}` |" not in readme]
    assert not missing, f"README values table lacks {missing}"


def test_schema_bounds_are_app_args_bounds():
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#" and chart().schema == schema
    for section in ("expertParallel", "engine", "gateway"):
        for key, prop in schema["properties"][section]["properties"].items():
            field = AppArgs.model_fields[re.sub(r"([A-Z])", r"_\1", key).lower()]
            ge = next((m.ge for m in field.metadata if isinstance(m, Ge)), None)
            gt = next((m.gt for m in field.metadata if isinstance(m, Gt)), None)
            assert (prop.get("minimum"), prop.get("exclusiveMinimum")) == (ge, gt), (section, key)
    enum = schema["properties"]["expertParallel"]["properties"]["placementStrategy"]["enum"]
    assert set(enum) == set(AppArgs.model_fields["placement_strategy"].annotation.__args__)
