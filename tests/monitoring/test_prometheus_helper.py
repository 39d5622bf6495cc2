"""The Prometheus helper against a real Prometheus: it scrapes a prometheus_client endpoint that records through our
recorders with Ray's names, evaluates the recording rules, and answers TTFT p50/p95 and per-expert rates."""
import os
import threading
import time

import prometheus_client
import pytest

from monitoring.metrics import PrometheusSink
from monitoring.recorders import ExpertMetrics, RequestMetrics
from tests.monitoring.prometheus_helper import PrometheusServer, free_port


@pytest.fixture
def exporter():
    """Ray-named epserve metrics served over HTTP, fed by a thread for the duration of the test."""
    registry = prometheus_client.CollectorRegistry()
    sink = PrometheusSink(registry, prefix="ray_")
    port = free_port()
    server, thread = prometheus_client.start_http_server(port, addr="127.0.0.1", registry=registry)
    stop = threading.Event()

    def feed():
        requests = RequestMetrics("m", replica="g1", sink=sink)
        experts = ExpertMetrics("m", replica="r1", sink=sink, flush_interval_s=0)
        while not stop.is_set():
            for ttft in (0.02, 0.02, 0.02, 0.3):             # 3 of 4 under 25 ms, 1 in (0.25, 0.5]
                timer = requests.start(now=0.0)
                timer.on_tokens(1, now=ttft)
                timer.on_finish("stop", now=ttft + 0.1)
            experts.observe_counts([[10, 0, 30]])
            stop.wait(0.1)
    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    yield f"127.0.0.1:{port}"
    stop.set()
    feeder.join(timeout=5)
    server.shutdown()
    thread.join(timeout=5)


def test_prometheus_scrapes_and_answers_recording_rules(exporter):
    with PrometheusServer([exporter], scrape_interval_s=1) as prom:
        pid = prom.proc.pid
        prom.wait_for("up == 1", timeout_s=15)
        p50 = prom.wait_for("model_name:epserve_time_to_first_token_seconds:p50_5m", timeout_s=30)
        p95 = prom.query("model_name:epserve_time_to_first_token_seconds:p95_5m")
        assert p50[0]["metric"] == {"__name__": "model_name:epserve_time_to_first_token_seconds:p50_5m",
                                    "model_name": "m"}
        assert 0.01 < float(p50[0]["value"][1]) <= 0.025          # in the (10 ms, 25 ms] bucket
        assert 0.25 < float(p95[0]["value"][1]) <= 0.5
        experts = prom.values('sum by (expert) (rate(ray_epserve_expert_tokens_total{layer="0"}[5s]))')
        assert set(experts) == {(("expert", "0"),), (("expert", "2"),)}     # expert 1 got no tokens: no series
        assert experts[(("expert", "2"),)] == pytest.approx(3 * experts[(("expert", "0"),)], rel=0.25)
        assert {"ray_epserve_time_to_first_token_seconds_bucket", "ray_epserve_expert_tokens_total"} <= \
            prom.metric_names()
    with pytest.raises(ProcessLookupError):                        # stopped by its pid, and reaped
        os.kill(pid, 0)
    assert prom.dir is None
