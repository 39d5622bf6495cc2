"""A real Prometheus scrapes a live `epserve serve` (demo model, EP 2, prefix caching and the cache-aware router on):
TTFT percentiles, generation tokens/s, per-expert token counts, prefix-cache hits and routing decisions read back
through Prometheus' HTTP API, and every metric the dashboard and the rules use is exported by the live server. The
server runs as its own process (its own Ray cluster) and is stopped by pid."""
import concurrent.futures
import json
import math
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from engine.prefix_affinity import REASONS
from tests.monitoring.prometheus_helper import PrometheusServer, free_port
from tests.monitoring.test_dashboard import DASHBOARD, dashboard_exprs, metric_names, rule_exprs


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    port, metrics_port = free_port(), free_port()
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "wb")
    # max_model_len 512 and a small KV budget: concurrent requests run out of blocks, so preemptions happen too.
    # Prefix caching on: the ranks count prefix-cache queries and hits, and the cache-aware router its decisions.
    proc = subprocess.Popen(
        [sys.executable, "-m", "deploy.cli", "serve", "--port", str(port), "--metrics-port", str(metrics_port),
         "--num-cpus", "8", "--max-model-len", "512", "--kv-cache-bytes", str(460_000),
         "--rebalance-interval-steps", "20", "--max-num-seqs", "8", "--max-num-batched-tokens", "64",
         "--enable-prefix-caching"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "RAY_AUTH_MODE": "disabled"},
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"epserve serve exited with {proc.returncode}"
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "epserve serve did not come up"
            time.sleep(1)
        yield url, f"127.0.0.1:{metrics_port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)            # the CLI shuts Serve and Ray down on SIGTERM
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def traffic(url: str) -> None:
    # Every chat request resends the same conversation: after the first, its prompt comes mostly from the cache.
    history = [{"role": "system", "content": "You answer arithmetic questions in one short sentence. " * 3},
               {"role": "user", "content": "Reverse the word lamp."}, {"role": "assistant", "content": "pmal"},
               {"role": "user", "content": "What is 2 + 5?"}]
    chat = {"messages": history, "max_tokens": 40, "temperature": 0}
    long = {"prompt": "Reverse the word stone.", "max_tokens": 120, "ignore_eos": True, "stream": True}

    def one(i):
        if i % 2:
            return httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=120).status_code
        with httpx.stream("POST", f"{url}/v1/completions", json=long, timeout=120) as r:
            r.read()
            return r.status_code
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(one, range(24)))
    assert set(codes) <= {200, 429}, codes
    assert httpx.post(f"{url}/v1/chat/completions", json={**chat, "model": "nope"}).status_code == 404


def finite(result: list[dict]) -> bool:
    return bool(result) and math.isfinite(float(result[0]["value"][1]))


def positive(result: list[dict]) -> bool:
    return bool(result) and float(result[0]["value"][1]) > 0


def test_prometheus_reads_latency_tokens_and_experts(live_server):
    url, target = live_server
    with PrometheusServer([target], scrape_interval_s=1.0) as prom:
        # One request first, and the main traffic only once its TTFT series is stored: Ray exports a series some
        # seconds after its first observation, and a series whose first sample already holds every observation has
        # a rate of 0 (a NaN quantile; CI saw it on a loaded machine).
        warm = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        assert httpx.post(f"{url}/v1/chat/completions", json=warm, timeout=120).status_code == 200
        prom.wait_for("ray_epserve_time_to_first_token_seconds_count", timeout_s=90)
        traffic(url)
        ttft = "histogram_quantile({q}, sum by (le) (rate(ray_epserve_time_to_first_token_seconds_bucket[1m])))"
        p50 = prom.wait_for(ttft.format(q=0.5), finite, timeout_s=60)
        p95 = prom.wait_for(ttft.format(q=0.95), finite, timeout_s=60)
        p50, p95 = float(p50[0]["value"][1]), float(p95[0]["value"][1])
        assert 0 < p50 <= p95 < 120
        tokens = prom.wait_for("sum(rate(ray_epserve_generation_tokens_total[1m]))", positive, timeout_s=60)
        assert float(tokens[0]["value"][1]) > 0
        experts = prom.wait_for("ray_epserve_expert_tokens_total", lambda r: len(r) >= 4, timeout_s=60)
        layers = {s["metric"]["layer"] for s in experts}
        assert layers == {"0", "1"} and all(float(s["value"][1]) > 0 for s in experts)
        # the repeated conversation hit the prefix cache, and the router chose its replica for the cached prefix
        hits = prom.wait_for("sum(ray_epserve_prefix_cache_hits_total)", positive, timeout_s=60)
        queried = prom.query("sum(ray_epserve_prefix_cache_queries_total)")
        assert 0 < float(hits[0]["value"][1]) < float(queried[0]["value"][1])
        prom.wait_for('sum(ray_epserve_routing_decisions_total{reason="affinity"})', positive, timeout_s=60)
        reasons = prom.values("sum by (reason) (ray_epserve_routing_decisions_total)")
        assert reasons.keys() <= {(("reason", r),) for r in REASONS}, reasons
        # every name the dashboard and the rules select is exported by this live server
        exprs, recorded = rule_exprs()
        dashboard = json.loads(DASHBOARD.read_text())
        wanted = set().union(*(metric_names(e) for e in exprs + dashboard_exprs(dashboard))) - recorded
        deadline = time.monotonic() + 60
        while (missing := wanted - prom.metric_names()) and time.monotonic() < deadline:
            time.sleep(2)
        assert not missing, f"not exported by the live server: {sorted(missing)}"
