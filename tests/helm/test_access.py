"""Who can reach what: the NetworkPolicy (on by default; from outside the release only the gateway port, the dashboard
port for the KubeRay operator, the metrics port for Prometheus; every port between the release's pods), the
dashboard's binding, Ray token auth from a Secret (KubeRay authOptions), and the NOTES warning for an open Ingress.
NetworkPolicy rules are evaluated here with the API's semantics (a rule admits when its ports and one of its peers
match; no ports: every port; no peers: every source; podSelector alone: the policy's namespace)."""
import pytest

from tests.helm.helpers import (
    CI_VALUES, NAMESPACE, case_values, notes, only, pod_templates, render, rayservice_validator, validate_builtin)

CASES = ["default"] + [p.name for p in CI_VALUES]
RAY_PORTS = {"gcs": 6379, "client": 10001, "dashboard": 8265, "metrics": 8080, "random": 41234}


def _matches(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"evaluator knows matchLabels only: {selector}"
    return selector.get("matchLabels", {}).items() <= labels.items()


def _peer_admits(peer: dict, pod: dict) -> bool:
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" in peer:
        in_namespace = _matches(peer["namespaceSelector"], pod["namespace_labels"])
    else:
        in_namespace = pod["namespace_labels"]["kubernetes.io/metadata.name"] == NAMESPACE
    return in_namespace and _matches(peer.get("podSelector", {}), pod["labels"])


def admits(policy: dict, pod: dict, port: int) -> bool:
    """Whether `policy` lets a connection from `pod` ({labels, namespace_labels}) to TCP `port` of a selected pod."""
    for rule in policy["spec"]["ingress"]:
        ports_ok = "ports" not in rule or any(p["port"] == port and p.get("protocol", "TCP") == "TCP"
                                              for p in rule["ports"])
        if ports_ok and ("from" not in rule or any(_peer_admits(peer, pod) for peer in rule["from"])):
            return True
    return False


def pod(namespace: str, **labels) -> dict:
    return {"labels": labels, "namespace_labels": {"kubernetes.io/metadata.name": namespace}}


def release_pod(template: dict) -> dict:
    return {"labels": template["metadata"]["labels"], "namespace_labels": {"kubernetes.io/metadata.name": NAMESPACE}}


OUTSIDER = pod("default", app="curl")
NEIGHBOUR = pod(NAMESPACE, **{"app.kubernetes.io/name": "epserve", "app.kubernetes.io/instance": "other"})
OPERATOR = pod("kuberay-system", **{"app.kubernetes.io/name": "kuberay-operator"})
PROMETHEUS = pod("monitoring", **{"app.kubernetes.io/name": "prometheus"})


def policy_and_pods(values: dict) -> tuple[dict, dict[str, dict]]:
    docs = render(values)
    return only(docs, "NetworkPolicy"), pod_templates(only(docs, "RayService"))


@pytest.mark.parametrize("case", CASES)
def test_network_policy_is_on_by_default_and_selects_every_ray_pod(case):
    policy, templates = policy_and_pods(case_values(case))
    validate_builtin(policy)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    for template in templates.values():
        assert _matches(policy["spec"]["podSelector"], template["metadata"]["labels"])
    assert not _matches(policy["spec"]["podSelector"], NEIGHBOUR["labels"]), "another release's pods are not ours"


def test_network_policy_can_be_turned_off():
    assert not [d for d in render({"networkPolicy": {"enabled": False}}) if d["kind"] == "NetworkPolicy"]


def test_release_pods_reach_each_other_on_every_port():
    # Ranks rendezvous on random ports (torch.distributed, NCCL), ModelServer replicas dial the gateways directly.
    policy, templates = policy_and_pods({})
    for source in templates.values():
        for port in (*RAY_PORTS.values(), 8000, 29500, 65000):
            assert admits(policy, release_pod(source), port), port


def test_from_outside_the_release_only_the_gateway_port_is_open():
    docs = render({})
    policy, rayservice = only(docs, "NetworkPolicy"), only(docs, "RayService")
    (service_port,) = rayservice["spec"]["serveService"]["spec"]["ports"]
    container_ports = {p["name"]: p["containerPort"] for p in
                       pod_templates(rayservice)["head"]["spec"]["containers"][0]["ports"]}
    gateway_port = container_ports[service_port["targetPort"]]
    for outsider in (OUTSIDER, NEIGHBOUR):
        assert admits(policy, outsider, gateway_port)
        assert not any(admits(policy, outsider, port) for port in RAY_PORTS.values())


def test_kuberay_operator_reaches_only_the_dashboard_port():
    # The operator deploys and polls the Serve app through the head Service's dashboard port (PUT/GET
    # /api/serve/applications/): without it the RayService never serves.
    policy, _ = policy_and_pods({})
    assert admits(policy, OPERATOR, RAY_PORTS["dashboard"])
    assert not any(admits(policy, OPERATOR, RAY_PORTS[p]) for p in ("gcs", "client", "metrics", "random"))


def test_prometheus_reaches_the_metrics_port_when_monitoring_is_on():
    off, _ = policy_and_pods({})
    on, _ = policy_and_pods(case_values("autoscaling-values.yaml"))  # metrics.podMonitor.enabled
    assert not admits(off, PROMETHEUS, RAY_PORTS["metrics"])
    assert admits(on, PROMETHEUS, RAY_PORTS["metrics"])
    assert not admits(on, pod("monitoring", app="grafana"), RAY_PORTS["metrics"])
    assert not any(admits(on, PROMETHEUS, RAY_PORTS[p]) for p in ("gcs", "client", "dashboard"))
    elsewhere = {"networkPolicy": {"prometheus": {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-prometheus-stack"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}},
        "metrics": {"podMonitor": {"enabled": True}}}
    moved, _ = policy_and_pods(elsewhere)
    assert admits(moved, pod("kube-prometheus-stack", **{"app.kubernetes.io/name": "prometheus"}), 8080)
    assert not admits(moved, PROMETHEUS, 8080)


def test_gateway_sources_can_be_restricted():
    ingress_nginx = pod("ingress-nginx", **{"app.kubernetes.io/name": "ingress-nginx"})
    policy, templates = policy_and_pods({"networkPolicy": {"gatewayFrom": [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]}})
    validate_builtin(policy)
    assert admits(policy, ingress_nginx, 8000) and not admits(policy, OUTSIDER, 8000)
    assert admits(policy, release_pod(templates["head"]), 8000)


def test_dashboard_binds_all_interfaces_but_is_reachable_only_inside_the_release():
    # KubeRay sets dashboard-host 0.0.0.0 when it is missing; 127.0.0.1 would cut off the operator (it reaches the
    # dashboard through the head Service) and KubeRay's own head probes use localhost, so the chart pins 0.0.0.0
    # and the NetworkPolicy decides who connects.
    rayservice = only(render({}), "RayService")
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert ports["dashboard"] == RAY_PORTS["dashboard"]  # KubeRay finds the dashboard by this port name
    policy, _ = policy_and_pods({})
    assert not admits(policy, OUTSIDER, ports["dashboard"])


def test_dashboard_opened_to_more_sources_only_when_asked():
    admins = pod("ops", team="sre")
    values = {"networkPolicy": {"dashboardFrom": [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "ops"}}}]}}
    default, _ = policy_and_pods({})
    opened, _ = policy_and_pods(values)
    validate_builtin(opened)
    assert not admits(default, admins, RAY_PORTS["dashboard"])
    assert admits(opened, admins, RAY_PORTS["dashboard"]) and admits(opened, OPERATOR, RAY_PORTS["dashboard"])
    assert not admits(opened, admins, RAY_PORTS["gcs"]) and not admits(opened, OUTSIDER, RAY_PORTS["dashboard"])


def test_extra_ingress_rules_are_appended():
    rule = {"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": 10001, "protocol": "TCP"}]}
    policy, _ = policy_and_pods({"networkPolicy": {"extraIngress": [rule]}})
    validate_builtin(policy)
    assert policy["spec"]["ingress"][-1] == rule


def test_ray_token_auth_is_off_by_default():
    rayservice = only(render({}), "RayService")
    assert "authOptions" not in rayservice["spec"]["rayClusterConfig"]


@pytest.mark.parametrize("secret, expected", [
    ("", {"mode": "token"}),  # KubeRay generates the token into a Secret named after the RayCluster
    ("ray-token", {"mode": "token", "secretName": "ray-token"}),
])
def test_ray_token_auth_from_a_secret(secret, expected):
    docs = render({"rayAuth": {"enabled": True, "existingSecret": secret}})
    rayservice = only(docs, "RayService")
    assert rayservice["spec"]["rayClusterConfig"]["authOptions"] == expected
    assert not list(rayservice_validator().iter_errors(rayservice))
    # KubeRay injects RAY_AUTH_MODE / RAY_AUTH_TOKEN itself; the chart must not set them (it would shadow the Secret).
    for template in pod_templates(rayservice).values():
        names = {e["name"] for e in template["spec"]["containers"][0].get("env", [])}
        assert not names & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}
    assert not [d for d in docs if d["kind"] == "Secret"], "the token Secret is the user's or KubeRay's"
    text = notes({"rayAuth": {"enabled": True, "existingSecret": secret}})
    assert "jsonpath='{.data.auth_token}'" in text and (secret or "activeServiceStatus.rayClusterName") in text


def test_ray_token_auth_rejects_a_bad_secret_name():
    import helm_python
    with pytest.raises(helm_python.HelmError, match="rayAuth/existingSecret"):
        render({"rayAuth": {"enabled": True, "existingSecret": "Not_A_Name"}})


@pytest.mark.parametrize("values, warned", [
    ({}, False),
    ({"ingress": {"enabled": True}}, True),
    (case_values("api-keys-values.yaml"), False),  # Ingress with API keys
    ({"apiKeys": {"enabled": True, "keys": ["k"]}}, False),
], ids=["no-ingress", "ingress-without-keys", "ingress-with-keys", "keys-without-ingress"])
def test_notes_warn_when_an_ingress_serves_without_api_keys(values, warned):
    text = notes(values)
    assert ("WARNING: the Ingress exposes /v1 with API keys off" in text) is warned
    if warned:
        assert "epserve.example.com can use the" in text and "apiKeys.enabled=true" in text
