"""promtool (Debian's `prometheus` package; `make test` installs it) checks the scrape config and the rules and runs
the rule unit tests. These tests fail, never skip, when promtool is missing."""
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "monitoring" / "prometheus"
RULES = (PROM / "rules" / "recording.yml", PROM / "rules" / "alerts.yml")
TESTS = (PROM / "tests" / "recording_test.yml", PROM / "tests" / "alerts_test.yml")


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool not found: apt-get install -y prometheus (the Makefile's test target does this)"
    return path


def run(promtool, *args, cwd=PROM):
    out = subprocess.run([promtool, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd)
    return out.returncode, out.stdout + out.stderr


def test_scrape_config_is_valid_and_targets_the_local_metrics_port(promtool):
    rc, out = run(promtool, "check", "config", "prometheus.yml")
    assert rc == 0, out
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    job, = config["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8080"]
    interval = int(config["global"]["scrape_interval"].rstrip("s"))
    assert 1 <= interval <= 5
    assert sorted(config["rule_files"]) == ["rules/alerts.yml", "rules/recording.yml"]


def test_rules_are_valid(promtool):
    rc, out = run(promtool, "check", "rules", *RULES)
    assert rc == 0, out


def test_promtool_rejects_a_bad_expression(promtool, tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("groups:\n  - name: g\n    rules:\n      - record: x:y:z\n        expr: rate(foo[5m]\n")
    rc, out = run(promtool, "check", "rules", bad)
    assert rc != 0 and "bad.yml" in out


@pytest.mark.parametrize("test_file", TESTS, ids=lambda p: p.name)
def test_rule_unit_tests_pass(promtool, test_file):
    rc, out = run(promtool, "test", "rules", test_file.name, cwd=test_file.parent)
    assert rc == 0 and "SUCCESS" in out, out


def rules_of(path: Path, key: str) -> list[dict]:
    return [r for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"] if key in r]


def test_every_alert_is_tested_firing_and_not_firing():
    alerts = {r["alert"] for r in rules_of(RULES[1], "alert")}
    assert alerts == {"EpserveTTFTHigh", "EpserveQueueGrowing", "EpserveKVCacheNearlyFull", "EpserveExpertImbalance",
                      "EpserveReplicaUnhealthy", "EpserveNoHealthyReplica", "EpserveErrorRateHigh",
                      "EpserveEPGroupDegraded"}
    firing, silent = set(), set()
    for test in yaml.safe_load(TESTS[1].read_text())["tests"]:
        for case in test.get("alert_rule_test", ()):
            (firing if case.get("exp_alerts") else silent).add(case["alertname"])
    assert firing == alerts and silent == alerts


def test_every_recording_rule_is_tested():
    recorded = {r["record"] for r in rules_of(RULES[0], "record")}
    tested = {case["expr"] for test in yaml.safe_load(TESTS[0].read_text())["tests"]
              for case in test.get("promql_expr_test", ())}
    assert recorded <= tested, recorded - tested


def test_replica_health_alerts_use_ray_serves_gauge():
    exprs = " ".join(r["expr"] for r in rules_of(RULES[1], "alert") if "Replica" in r["alert"])
    assert "ray_serve_deployment_replica_healthy" in exprs and 'deployment=~"ModelServer|Gateway"' in exprs
