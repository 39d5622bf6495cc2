"""The Grafana dashboard and the Prometheus rules only use metric names that exist: ours as Ray exports them
(monitoring/metrics.py, `ray_` prefix, histogram/counter suffixes), Ray Serve's own (listed below with their source),
or recording rules; and every dashboard query is valid PromQL (promtool)."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import yaml

from monitoring.metrics import exported_series

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "monitoring" / "grafana" / "epserve-dashboard.json"
RULES = (ROOT / "monitoring" / "prometheus" / "rules" / "recording.yml",
         ROOT / "monitoring" / "prometheus" / "rules" / "alerts.yml")

# Ray Serve's built-in metrics we use (ray 2.60, ray-project/ray python/ray/serve/_private/), with their labels.
RAY_SERVE_METRICS = {
    # deployment_state.py: Gauge serve_deployment_replica_healthy{deployment, application[, replica]}: per replica 1/0,
    # or (seen live on 2.60: no replica label) the deployment's healthy replica count
    "ray_serve_deployment_replica_healthy": "serve/_private/deployment_state.py",
    # deployment_state.py: Gauge serve_autoscaling_target_replicas{deployment, application} (also without autoscaling)
    "ray_serve_autoscaling_target_replicas": "serve/_private/deployment_state.py",
    # deployment_state.py: Gauge serve_deployment_status{deployment, application}: 1 DEPLOY_FAILED, 2 UNHEALTHY,
    # 3 UPDATING, 4 UPSCALING, 5 DOWNSCALING, 6 HEALTHY
    "ray_serve_deployment_status": "serve/_private/deployment_state.py",
    # router.py: Gauge serve_deployment_queued_queries{deployment, application, handle, actor_id}
    "ray_serve_deployment_queued_queries": "serve/_private/router.py",
    # request_ingress_metrics.py: Counter serve_num_http_error_requests{route, error_code, method, application}
    "ray_serve_num_http_error_requests_total": "serve/_private/request_ingress_metrics.py",
    # request_ingress_metrics.py: Counter serve_num_http_requests{route, method, application, status_code}
    "ray_serve_num_http_requests_total": "serve/_private/request_ingress_metrics.py",
}
PROMQL_WORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                "offset", "inf", "nan"}
GRAFANA_VARS = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "15s"}


def metric_names(expr: str) -> set[str]:
    """Metric (and recording-rule) names an expression selects: identifiers that are not functions, keywords,
    label names or values."""
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                          # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)                                    # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)                                   # ranges
    names = re.findall(r"(?<![\w.$:])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()", expr)
    return {n for n in names if n.lower() not in PROMQL_WORDS}


def dashboard_exprs(dashboard: dict) -> list[str]:
    def panels(items):
        for p in items:
            yield p
            yield from panels(p.get("panels", ()))
    return [t["expr"] for p in panels(dashboard["panels"]) for t in p.get("targets", ())]


def dashboard_variable_metrics(dashboard: dict) -> set[str]:
    queries = [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return {re.match(r"label_values\(\s*([a-zA-Z_:][\w:]*)", q).group(1) for q in queries}


def rule_exprs() -> tuple[list[str], set[str]]:
    rules = [r for path in RULES for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]]
    return [r["expr"] for r in rules], {r["record"] for r in rules if "record" in r}


def test_the_name_extractor_finds_metrics_only():
    assert metric_names('histogram_quantile(0.95, sum by (le, model_name) (rate(a_bucket{x="y z"}[5m])))') == \
        {"a_bucket"}
    assert metric_names("sum by (m) (rate(a_total[$__rate_interval])) / on (m) group_left b:c:d > 1e3") == \
        {"a_total", "b:c:d"}


def test_rules_use_only_defined_metrics():
    exprs, recorded = rule_exprs()
    known = exported_series() | set(RAY_SERVE_METRICS) | recorded
    used = set().union(*map(metric_names, exprs))
    assert used and used <= known, sorted(used - known)


def test_dashboard_uses_only_defined_metrics_and_covers_every_topic():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = dashboard_exprs(dashboard)
    used = set().union(*map(metric_names, exprs)) | dashboard_variable_metrics(dashboard)
    known = exported_series() | set(RAY_SERVE_METRICS)
    assert used <= known, sorted(used - known)
    for needed in ("time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
                   "e2e_request_latency_seconds_bucket", "generation_tokens_total", "num_requests_running",
                   "num_requests_waiting", "kv_cache_usage_perc", "expert_tokens_total", "expert_balancedness",
                   "all_to_all_seconds_bucket", "expert_rebalances_total", "http_errors_total",
                   "prefix_cache_queries_total", "prefix_cache_hits_total", "routing_decisions_total"):
        assert "ray_epserve_" + needed in used, needed


def test_dashboard_queries_a_prometheus_datasource_variable():
    dashboard = json.loads(DASHBOARD.read_text())
    ds, = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert ds["query"] == "prometheus"
    heatmaps = [p for p in dashboard["panels"] if p["type"] == "heatmap"]
    assert heatmaps and heatmaps[0]["targets"][0]["format"] == "heatmap"
    for p in dashboard["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${" + ds["name"] + "}", p["title"]
            assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"])
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_queries_are_valid_promql(tmp_path):
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: apt-get install -y prometheus"
    exprs = dashboard_exprs(json.loads(DASHBOARD.read_text()))
    rules = []
    for i, expr in enumerate(exprs):
        for var, value in GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        rules.append({"record": f"dashboard:query:{i}", "expr": re.sub(r"\$\w+", "x", expr)})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
