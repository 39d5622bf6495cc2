"""The Helm chart, offline: renders and lints for the defaults and every ci/ values file; built-in kinds validate
(kubernetes-validate, strict); the RayService validates against the KubeRay CRD (unknown fields rejected); its Serve
config builds the project's app with AppArgs (replica counts: test_scaling.py); the pods mount the checkpoint."""
import hashlib
import importlib

import helm_python
import pytest

from deploy.app_config import AppArgs
from tests.helm.helpers import (
    CHART_DIR, CI_VALUES, GATEWAY, KUBE_VERSION, MODEL_SERVER, SHARED_CRD, VENDORED_CRD, case_values, merged_values,
    notes, only, pod_templates, render, rayservice_validator, serve_args, serve_config, validate_builtin, worker_groups)

CASES = ["default"] + [p.name for p in CI_VALUES]
CUSTOM_KINDS = {"RayService", "PodMonitor"}
# AppArgs fields the chart leaves to their defaults: replica counts go into the deployments overrides instead.
SCALING_ARGS = {"num_replicas", "autoscaling", "gateway_replicas"}


def test_ci_values_cover_the_required_scenarios():
    assert {"single-node-ep8-values.yaml", "two-nodes-ep16-values.yaml", "autoscaling-values.yaml",
            "api-keys-values.yaml"} <= {p.name for p in CI_VALUES}


@pytest.mark.parametrize("case", CASES)
def test_lint_is_clean(case):
    report = helm_python.lint(str(CHART_DIR), case_values(case), strict=True, kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error
    assert not report["errors"] and not problems, report


@pytest.mark.parametrize("case", CASES)
def test_builtin_kinds_validate_strictly(case):
    docs = render(case_values(case))
    rayservice = only(docs, "RayService")
    for doc in docs:
        if doc["kind"] not in CUSTOM_KINDS:
            validate_builtin(doc)
    # The objects KubeRay builds from the RayService are built-in kinds too: check them with the same schemas.
    validate_builtin({"apiVersion": "v1", "kind": "Service", **rayservice["spec"]["serveService"]})
    for group, template in pod_templates(rayservice).items():
        validate_builtin({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group},
                          "template": template})


def test_builtin_validation_can_fail():
    rayservice = only(render(), "RayService")
    template = pod_templates(rayservice)["head"]
    template["spec"]["containers"][0]["gpuCount"] = 8
    with pytest.raises(Exception, match="gpuCount"):
        validate_builtin({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": template})


@pytest.mark.parametrize("case", CASES)
def test_rayservice_matches_the_kuberay_crd(case):
    rayservice = only(render(case_values(case)), "RayService")
    assert rayservice["apiVersion"] == "ray.io/v1"
    errors = sorted(rayservice_validator().iter_errors(rayservice), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:10])


def test_every_optional_value_renders_valid_objects():
    values = {
        "fullnameOverride": "llm", "imagePullSecrets": [{"name": "regcred"}], "serviceAccountName": "ray",
        "podLabels": {"team": "ml"}, "podAnnotations": {"example.com/owner": "ml"},
        "env": [{"name": "HF_HUB_OFFLINE", "value": "1"},
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "head": {"rayStartParams": {"object-store-memory": 10**9},
                 "nodeSelector": {"pool": "cpu"}},
        "worker": {"rayStartParams": {"object-store-memory": "100000000000"}, "groupName": "gpu",
                   "resources": {"limits": {"rdma/ib": 8}, "requests": {"rdma/ib": 8}}},
        "nccl": {"ibDisable": True, "socketIfname": "eth0", "debug": "INFO", "extraEnv": {"NCCL_P2P_LEVEL": "NVL"}},
        "service": {"type": "LoadBalancer", "annotations": {"example.com/lb": "internal"}},
        "apiKeys": {"enabled": True, "existingSecret": "keys"},
        "ingress": {"enabled": True, "className": "nginx", "tls": [{"hosts": ["a.example.com"], "secretName": "t"}],
                    "hosts": [{"host": "a.example.com", "paths": [{"path": "/v1", "pathType": "Prefix"}]}]},
        "metrics": {"port": 9090, "podMonitor": {"enabled": True, "labels": {"release": "prom"}}},
        "upgradeStrategy": "None", "rayAutoscaler": {"maxWorkerPods": 3, "upscalingMode": "Aggressive"},
    }
    docs = render(values)
    rayservice = only(docs, "RayService")
    assert not list(rayservice_validator().iter_errors(rayservice))
    for doc in docs:
        if doc["kind"] not in CUSTOM_KINDS:
            validate_builtin(doc)
    for group, template in pod_templates(rayservice).items():
        validate_builtin({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group}, "template": template})
    assert rayservice["metadata"]["name"] == "llm"
    assert worker_groups(rayservice)[0]["rayStartParams"] == {
        "metrics-export-port": "9090", "object-store-memory": "100000000000"}
    assert rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["object-store-memory"] == \
        "1000000000"


def test_crd_validation_rejects_unknown_fields():
    rayservice = only(render(), "RayService")
    worker_groups(rayservice)[0]["gpusPerPod"] = 8
    assert any("gpusPerPod" in e.message for e in rayservice_validator().iter_errors(rayservice))


def test_vendored_crd_is_the_shared_one():
    assert VENDORED_CRD.is_file(), f"vendored CRD missing: {VENDORED_CRD}"
    if not SHARED_CRD.is_file():
        pytest.skip(f"{SHARED_CRD} absent in this checkout; the tests use the vendored copy")
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(VENDORED_CRD) == digest(SHARED_CRD), "tests/helm/crds drifted from ../shared/k8s/crds: refresh it"


@pytest.mark.parametrize("case", CASES)
def test_serve_config_args_parse_into_app_args(case):
    from ray.serve.schema import ServeDeploySchema
    config = serve_config(only(render(case_values(case)), "RayService"))
    schema = ServeDeploySchema.model_validate(config)  # the document `serve deploy` / KubeRay submit
    (app,) = config["applications"]
    assert (app["import_path"], app["route_prefix"], config["http_options"]["port"]) == (
        "deploy.app:build_app", "/", 8000)
    args = AppArgs.model_validate(app["args"])
    assert (args.device, args.dtype, args.model) == ("cuda", "bfloat16", "/model")
    assert not SCALING_ARGS & set(app["args"]), "replicas belong to the deployments override, not to args"
    # Serve's DeploymentSchema accepted the overrides: replica counts only.
    overrides = {d.name: d.model_dump(exclude_unset=True).keys() - {"name"} for d in schema.applications[0].deployments}
    assert overrides[MODEL_SERVER] in ({"num_replicas"}, {"autoscaling_config"})
    assert overrides[GATEWAY] == {"num_replicas"} and len(overrides) == 2


def test_import_path_resolves_to_the_app_builder():
    import_paths = {serve_config(only(render(case_values(c)), "RayService"))["applications"][0]["import_path"]
                    for c in CASES}
    (import_path,) = import_paths
    module_name, attr = import_path.split(":")
    builder = getattr(importlib.import_module(module_name), attr)
    assert callable(builder) and builder.__module__ == "deploy.app"


@pytest.mark.parametrize("case", CASES)
def test_serve_args_are_the_values_in_snake_case(case):
    values = merged_values(case_values(case))
    args = serve_args(only(render(case_values(case)), "RayService"))
    for section in ("expertParallel", "engine", "gateway"):
        for key, value in values[section].items():
            snake = "".join(f"_{c.lower()}" if c.isupper() else c for c in key)
            assert args[snake] == value and type(args[snake]) is type(value), (section, key, args.get(snake))
    assert not SCALING_ARGS & set(args)
    assert args.get("api_keys_env") == (values["apiKeys"]["envName"] if values["apiKeys"]["enabled"] else None)
    assert "api_keys" not in args, "keys must only travel through the Secret"


def test_every_app_argument_is_reachable_from_values():
    reached = set()
    for case in CASES:
        reached |= set(serve_args(only(render(case_values(case)), "RayService")))
    # The replica counts keep their AppArgs defaults: the deployments overrides set the replicas instead.
    assert reached == set(AppArgs.model_fields) - {"api_keys"} - SCALING_ARGS


def test_head_and_worker_pods():
    rayservice = only(render(case_values("two-nodes-ep16-values.yaml")), "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    head_params = cluster["headGroupSpec"]["rayStartParams"]
    assert head_params == {"dashboard-host": "0.0.0.0", "metrics-export-port": "8080", "num-cpus": "0"}
    assert worker_groups(rayservice)[0]["rayStartParams"] == {"metrics-export-port": "8080"}
    templates = pod_templates(rayservice)
    head, worker = templates["head"]["spec"], templates["h100"]["spec"]
    for spec in (head, worker):
        shm = next(v for v in spec["volumes"] if v["name"] == "dshm")["emptyDir"]
        assert shm["medium"] == "Memory" and shm["sizeLimit"]
        assert {"name": "dshm", "mountPath": "/dev/shm"} in spec["containers"][0]["volumeMounts"]
    # Both mount the checkpoint read-only at the app's `model` path: Serve's build task and 0-CPU Gateway replicas
    # (which read the model directory) may run on the head.
    model_dir = serve_args(rayservice)["model"]
    for spec in (head, worker):
        (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "model"]
        assert mount == {"name": "model", "mountPath": model_dir, "readOnly": True, "subPath": "openai/gpt-oss-120b"}
        (volume,) = [v for v in spec["volumes"] if v["name"] == "model"]
        assert volume["persistentVolumeClaim"] == {"claimName": "gpt-oss-120b", "readOnly": True}
    assert worker["nodeSelector"] and worker["tolerations"] and worker["affinity"]
    env = {e["name"]: e.get("value") for e in worker["containers"][0]["env"]}
    assert env["NCCL_SOCKET_IFNAME"] == "eth0" and env["NCCL_IB_DISABLE"] == "0" and env["NCCL_IB_HCA"] == "mlx5"
    assert "env" not in head["containers"][0], "NCCL settings belong to the GPU workers"


def test_host_path_model_source():
    rayservice = only(render(case_values("single-node-ep8-values.yaml")), "RayService")
    for template in pod_templates(rayservice).values():  # head included: the directory must exist on its node too
        (volume,) = [v for v in template["spec"]["volumes"] if v["name"] == "model"]
        assert volume == {"name": "model", "hostPath": {"path": "/data/models/gpt-oss-120b", "type": "Directory"}}
        (mount,) = [m for m in template["spec"]["containers"][0]["volumeMounts"] if m["name"] == "model"]
        assert mount == {"name": "model", "mountPath": "/model", "readOnly": True}


def test_api_keys_secret_reaches_every_pod():
    docs = render(case_values("api-keys-values.yaml"))
    secret, rayservice = only(docs, "Secret"), only(docs, "RayService")
    assert set(secret["data"]) == {"api-keys"}
    for template in pod_templates(rayservice).values():
        env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
        ref = env["EPSERVE_API_KEYS"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": secret["metadata"]["name"], "key": "api-keys"}
    assert serve_args(rayservice)["api_keys_env"] == "EPSERVE_API_KEYS"
    assert "sk-epserve-ci-key-1" not in rayservice["spec"]["serveConfigV2"]


def test_existing_api_key_secret():
    docs = render({"apiKeys": {"enabled": True, "existingSecret": "my-keys", "secretKey": "keys", "envName": "KEYS"}})
    assert not [d for d in docs if d["kind"] == "Secret"]
    worker = pod_templates(only(docs, "RayService"))["h100"]
    env = {e["name"]: e for e in worker["spec"]["containers"][0]["env"]}
    assert env["KEYS"]["valueFrom"]["secretKeyRef"] == {"name": "my-keys", "key": "keys"}


def test_ingress_and_pod_monitor_target_the_gateway_and_metrics_port():
    docs = render({**case_values("api-keys-values.yaml"), "metrics": {"podMonitor": {"enabled": True}}})
    rayservice, ingress, monitor = only(docs, "RayService"), only(docs, "Ingress"), only(docs, "PodMonitor")
    gateway = rayservice["spec"]["serveService"]
    assert gateway["spec"]["ports"] == [{"name": "serve", "port": 8000, "targetPort": "serve", "protocol": "TCP"}]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": gateway["metadata"]["name"], "port": {"name": "serve"}}
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    for template in pod_templates(rayservice).values():
        labels = template["metadata"]["labels"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        assert ports[endpoint["port"]] == 8080 and ports["serve"] == 8000


def test_notes_tell_how_to_reach_v1():
    text = notes(case_values("api-keys-values.yaml"))
    assert "port-forward svc/gptoss-epserve-gateway 8000:8000" in text
    assert "/v1/chat/completions" in text and "Authorization: Bearer" in text
    assert "kubectl -n llm get rayservice gptoss-epserve" in text and "8265" in text
    assert "--set numReplicas=N" in text and "running replicas keep serving" in text
    assert "--set autoscaling.maxReplicas=N" in notes(case_values("autoscaling-values.yaml"))
