"""Replicas: the ModelServer and Gateway replica counts live in the Serve config's `deployments:` overrides, never in
the app's args, so a scaling upgrade keeps Serve's code version and scales in place; GPUs requested = replicas x epSize;
gatewayReplicas defaults to one gateway per ModelServer replica."""
import helm_python
import pytest

from deploy.app_config import AppArgs
from tests.helm.helpers import (
    CI_VALUES, GATEWAY, MODEL_SERVER, case_values, deployment_override, gpus_per_pod, merged_values, only,
    pod_templates, render, replica_bounds, scaling_override, serve_args, serve_config, worker_groups)

CASES = ["default"] + [p.name for p in CI_VALUES]


@pytest.mark.parametrize("case", CASES)
def test_replicas_render_into_the_model_server_deployment_override(case):
    values = merged_values(case_values(case))
    override = scaling_override(only(render(case_values(case)), "RayService"))
    if values["autoscaling"]["enabled"]:
        assert override == {"autoscaling_config": {
            "min_replicas": values["autoscaling"]["minReplicas"],
            "max_replicas": values["autoscaling"]["maxReplicas"],
            "target_ongoing_requests": values["autoscaling"]["targetOngoingRequests"]}}
    else:
        assert override == {"num_replicas": values["numReplicas"]}


def test_autoscaling_override_has_the_fields_of_app_args_autoscaling():
    from deploy.app_config import AutoscalingArgs
    override = scaling_override(only(render(case_values("autoscaling-values.yaml")), "RayService"))
    assert set(override["autoscaling_config"]) == set(AutoscalingArgs.model_fields)


def test_overrides_name_the_deployments_build_app_creates():
    # Each override names a deployment of the built application, else Serve rejects the config ("does not exist").
    from ray.serve._private.build_app import build_app as build_serve_app

    from deploy.app import build_app
    built = build_serve_app(build_app({"model": "demo", "device": "cuda", "ep_size": 8}), name="epserve")
    overridden = {d["name"] for d in _app({})["deployments"]}
    assert overridden == {MODEL_SERVER, GATEWAY} and overridden <= {d.name for d in built.deployments}


def _app(values: dict) -> dict:
    (app,) = serve_config(only(render(values), "RayService"))["applications"]
    return app


def _cluster_without_pod_counts(values: dict) -> dict:
    """The RayService's cluster part minus the worker-group pod counts (the Ray autoscaler's to change)."""
    cluster = only(render(values), "RayService")["spec"]["rayClusterConfig"]
    for group in cluster["workerGroupSpecs"]:
        for key in ("replicas", "minReplicas", "maxReplicas"):
            group.pop(key)
    return cluster


@pytest.mark.parametrize("before, after", [
    ({"numReplicas": 1}, {"numReplicas": 3}),
    ({"autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 4}},
     {"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6, "targetOngoingRequests": 8}}),
    ({"numReplicas": 2}, {"numReplicas": 2, "gatewayReplicas": 5}),
], ids=["num-replicas", "autoscaling-bounds", "gateway-replicas"])
def test_scaling_upgrade_changes_only_the_deployments_override(before, after):
    """Serve rebuilds the application and restarts every replica when its code version changes: a hash of import_path,
    runtime_env, args and a few deployment options, not num_replicas nor the autoscaling bounds
    (deploy_utils.get_app_code_version). A helm upgrade that only scales must leave it alone."""
    from ray.serve._private.deploy_utils import get_app_code_version
    from ray.serve.schema import ServeApplicationSchema
    base = {"rayAutoscaler": {"maxWorkerPods": 8}}
    old, new = _app({**base, **before}), _app({**base, **after})
    assert old["deployments"] != new["deployments"]
    assert {k: v for k, v in old.items() if k != "deployments"} == {k: v for k, v in new.items() if k != "deployments"}
    assert (old["import_path"], old["args"]) == (new["import_path"], new["args"])
    assert get_app_code_version(ServeApplicationSchema(**old)) == get_app_code_version(ServeApplicationSchema(**new))
    assert _cluster_without_pod_counts({**base, **before}) == _cluster_without_pod_counts({**base, **after})


def test_switching_autoscaling_on_is_a_redeploy():
    # What the README says: Ray 2.60 hashes a deployment's autoscaling policy into the code version, so turning
    # autoscaling on or off (unlike changing numReplicas or the bounds) rebuilds the application.
    from ray.serve._private.deploy_utils import get_app_code_version
    from ray.serve.schema import ServeApplicationSchema
    fixed, auto = _app({"numReplicas": 1}), _app({"autoscaling": {"enabled": True}})
    assert fixed["args"] == auto["args"]
    assert get_app_code_version(ServeApplicationSchema(**fixed)) != get_app_code_version(ServeApplicationSchema(**auto))


@pytest.mark.parametrize("case", CASES)
def test_gpus_requested_equal_replicas_times_ep_size(case):
    rayservice = only(render(case_values(case)), "RayService")
    ep = serve_args(rayservice)["ep_size"]
    templates = pod_templates(rayservice)
    assert gpus_per_pod(templates["head"]) == 0
    (group,) = worker_groups(rayservice)
    per_pod = gpus_per_pod(group["template"])
    lo, hi = replica_bounds(rayservice)
    if "autoscaling_config" in scaling_override(rayservice):
        assert lo * ep <= group["replicas"] * per_pod < lo * ep + per_pod  # whole pods for minReplicas
    else:
        assert group["replicas"] * per_pod == lo * ep
    assert group["maxReplicas"] * per_pod == hi * ep
    assert group["minReplicas"] == 0
    assert rayservice["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True


def test_ep16_spans_two_eight_gpu_pods():
    rayservice = only(render(case_values("two-nodes-ep16-values.yaml")), "RayService")
    (group,) = worker_groups(rayservice)
    assert (group["replicas"], gpus_per_pod(group["template"]), serve_args(rayservice)["ep_size"]) == (2, 8, 16)


def test_min_replicas_round_up_to_whole_pods():
    values = {"expertParallel": {"epSize": 4},
              "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 4}}
    (group,) = worker_groups(only(render(values), "RayService"))
    assert (group["replicas"], group["maxReplicas"]) == (1, 2)  # 4 GPUs -> one 8-GPU pod; 16 GPUs -> two


def test_scaling_with_set_adds_whole_ep_groups():
    values = case_values("two-nodes-ep16-values.yaml")
    overrides = helm_python.parse_set_string("numReplicas=3,rayAutoscaler.maxWorkerPods=8")
    values = {**values, **overrides}
    rayservice = only(render(values), "RayService")
    (group,) = worker_groups(rayservice)
    assert scaling_override(rayservice) == {"num_replicas": 3}
    assert (group["replicas"], group["maxReplicas"]) == (6, 8)


@pytest.mark.parametrize("values, expected", [
    ({"numReplicas": 3}, 3),
    ({"numReplicas": 0}, 1),  # no ModelServer yet: one gateway still answers /health
    ({"autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 4}}, 4),
    ({"numReplicas": 3, "gatewayReplicas": 2}, 2),
    ({"autoscaling": {"enabled": True, "maxReplicas": 4}, "gatewayReplicas": 6}, 6),
], ids=["per-model-replica", "at-least-one", "autoscaling-max", "set", "set-with-autoscaling"])
def test_gateway_replicas(values, expected):
    rayservice = only(render({"rayAutoscaler": {"maxWorkerPods": 8}, **values}), "RayService")
    assert deployment_override(rayservice, GATEWAY) == {"num_replicas": expected}
    assert "gateway_replicas" not in serve_args(rayservice), "a replica count in args would redeploy on every change"


def test_gateway_replicas_null_from_the_command_line_means_the_default():
    values = helm_python.parse_set_string("numReplicas=2,gatewayReplicas=null")
    assert deployment_override(only(render(values), "RayService"), GATEWAY) == {"num_replicas": 2}


def test_gateway_replicas_bound_is_app_args_bound():
    from annotated_types import Ge

    from tests.helm.helpers import chart
    field = AppArgs.model_fields["gateway_replicas"]
    assert chart().schema["properties"]["gatewayReplicas"]["minimum"] == next(
        m.ge for m in field.metadata if isinstance(m, Ge))  # 0 is rejected at install: test_values.py
