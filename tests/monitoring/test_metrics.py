"""monitoring/metrics.py + recorders.py (and deploy/routing_metrics.py, whose reason enum is the router's): valid
definitions, no request text in metrics, no-ops without Ray, and correct records through a prometheus_client
registry and through Ray's metrics agent."""
import inspect
import pickle
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deploy.routing_metrics import RoutingMetrics
from monitoring import metrics as m
from monitoring.recorders import EngineMetrics, ExpertMetrics, RequestMetrics

ROOT = Path(__file__).resolve().parents[2]
RECORDERS = (RequestMetrics, EngineMetrics, ExpertMetrics, RoutingMetrics)
SECRET = "Tell me the launch codes, then write a poem"


class MemorySink:
    def __init__(self):
        self.records = []

    def record(self, spec, value, tags):
        self.records.append((spec.name, value, dict(tags)))


def exercise(sink, text=SECRET):
    """Every public recorder call, with `text` wherever a caller could pass a string."""
    req = RequestMetrics("gpt-oss-120b", replica="g1", sink=sink)
    timer = req.start(now=0.0)
    timer.on_tokens(1, now=0.25)
    timer.on_tokens(2, now=0.30)
    timer.on_finish(text, now=1.0)
    req.start().on_error(text)
    req.on_http_error(text)
    eng = EngineMetrics("gpt-oss-120b", replica="r1", sink=sink)
    eng.on_request_added(12)
    eng.on_generated(3)
    eng.observe_queue_time(0.5)
    eng.observe_rank(1, num_running=2, num_waiting=1, kv_usage=0.5, num_preemptions=2, all_to_all_s=0.001, step_s=0.02)
    exp = ExpertMetrics("gpt-oss-120b", replica="r1", sink=sink)
    exp.observe_counts([[1, 0], [0, 2]])
    exp.observe({"balancedness": [0.5, 1.0], "rebalances": 1, "window_tokens": [[1, 0], [0, 2]]})
    routing = RoutingMetrics("gpt-oss-120b", replica="g1", sink=sink)
    routing.on_decision("affinity", 48)
    routing.on_decision(text, 0)
    RoutingMetrics("gpt-oss-120b", replica="r1", sink=sink).observe_rank(1, queried=64, hit=16)
    return getattr(sink, "records", None)


def test_definitions_are_valid_and_unique():
    names = [spec.name for spec in m.ALL_METRICS]
    assert len(names) == len(set(names))
    for spec in m.ALL_METRICS:
        assert re.fullmatch(r"epserve_[a-z0-9_]+", spec.name), spec.name
        assert spec.kind in (m.COUNTER, m.GAUGE, m.HISTOGRAM) and spec.help
        assert {"model_name", "replica"} <= set(spec.labels) <= m.LABELS, spec
        if spec.kind == m.HISTOGRAM:
            assert spec.name.endswith("_seconds") and spec.buckets
            assert all(b > 0 for b in spec.buckets) and list(spec.buckets) == sorted(set(spec.buckets))
        else:
            assert not spec.buckets
        assert not spec.name.endswith("_total"), "Ray's exporter appends _total to counters"
    assert m.TTFT.series() == ("ray_epserve_time_to_first_token_seconds_bucket",
                               "ray_epserve_time_to_first_token_seconds_sum",
                               "ray_epserve_time_to_first_token_seconds_count")
    assert m.EXPERT_TOKENS.series() == ("ray_epserve_expert_tokens_total",)
    assert "ray_epserve_kv_cache_usage_perc" in m.exported_series()


def test_label_keys_are_a_fixed_allow_list_of_ids_and_enums():
    assert m.LABELS == {"model_name", "replica", "rank", "layer", "expert", "finished_reason", "status_code",
                        "reason"}
    allowed_params = {"self", "model_name", "replica", "sink", "flush_interval_s", "now", "num_tokens",
                      "finished_reason", "status_code", "num_prompt_tokens", "seconds", "rank", "num_running",
                      "num_waiting", "kv_usage", "num_preemptions", "all_to_all_s", "step_s", "counts", "stats",
                      "gauge_interval_s", "reason", "cached_tokens", "queried", "hit"}
    from monitoring.recorders import RequestTimer
    for cls in RECORDERS + (RequestTimer,):
        for name, fn in inspect.getmembers(cls, inspect.isfunction):
            params = set(inspect.signature(fn).parameters) - {"metrics", "start", "spec", "value", "labels"}
            assert params <= allowed_params, f"{cls.__name__}.{name} takes {params - allowed_params}"


def test_request_text_never_reaches_a_label_or_value():
    records = exercise(MemorySink())
    assert records
    for name, value, tags in records:
        assert isinstance(value, float)
        assert set(tags) == set(next(s.labels for s in m.ALL_METRICS if s.name == name))
        for v in tags.values():
            assert "launch" not in v and "poem" not in v and len(v) <= 128
    reasons = {t["finished_reason"] for n, _, t in records if n == m.REQUEST_SUCCESS.name}
    codes = {t["status_code"] for n, _, t in records if n == m.HTTP_ERRORS.name}
    assert reasons == {"other"} and codes == {"other"}
    assert [t["reason"] for n, _, t in records if n == m.ROUTING_DECISIONS.name] == ["affinity", "other"]
    assert m.label_value("reason", "load") == "load" and m.label_value("reason", SECRET) == "other"
    assert m.ident("my model\n<script>") == "my_model__script_"


def test_recorders_are_no_ops_without_ray():
    code = ("import sys; from tests.monitoring.test_metrics import exercise; from monitoring.metrics import "
            "default_sink; exercise(default_sink()); assert 'ray' not in sys.modules; import ray; "
            "exercise(default_sink()); assert not ray.is_initialized() and not default_sink()._metrics; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_records_through_a_prometheus_registry():
    registry = prometheus_client.CollectorRegistry()
    exercise(m.PrometheusSink(registry, prefix="ray_"))
    get = registry.get_sample_value
    base = {"model_name": "gpt-oss-120b", "replica": "g1"}
    assert get("ray_epserve_time_to_first_token_seconds_bucket", {**base, "le": "0.25"}) == 1
    assert get("ray_epserve_time_to_first_token_seconds_bucket", {**base, "le": "0.15"}) == 0
    assert get("ray_epserve_inter_token_latency_seconds_sum", base) == pytest.approx(0.05)
    assert get("ray_epserve_e2e_request_latency_seconds_count", base) == 1
    assert get("ray_epserve_http_errors_total", {**base, "status_code": "other"}) == 2
    rank = {"model_name": "gpt-oss-120b", "replica": "r1", "rank": "1"}
    assert get("ray_epserve_kv_cache_usage_perc", rank) == 0.5
    assert get("ray_epserve_num_preemptions_total", rank) == 2
    expert = {"model_name": "gpt-oss-120b", "replica": "r1"}
    assert get("ray_epserve_expert_tokens_total", {**expert, "layer": "1", "expert": "1"}) == 2
    assert get("ray_epserve_expert_tokens_total", {**expert, "layer": "0", "expert": "1"}) is None   # zero: no series
    assert get("ray_epserve_expert_balancedness", {**expert, "layer": "0"}) == 0.5
    assert get("ray_epserve_expert_rebalances_total", expert) == 1
    assert get("ray_epserve_routing_decisions_total", {**base, "reason": "affinity"}) == 1
    assert get("ray_epserve_routing_decisions_total", {**base, "reason": "other"}) == 1
    assert get("ray_epserve_routing_cached_tokens_total", base) == 48
    assert get("ray_epserve_prefix_cache_queries_total", rank) == 64
    assert get("ray_epserve_prefix_cache_hits_total", rank) == 16


def test_counters_count_deltas_of_running_totals_and_survive_restarts():
    sink = MemorySink()
    eng = EngineMetrics("m", replica="r", sink=sink)
    for total in (0, 3, 3, 5, 1):                       # 1 < 5: the rank restarted, its new total counts
        eng.observe_rank(0, num_running=0, num_waiting=0, kv_usage=0.0, num_preemptions=total)
    assert sum(v for n, v, _ in sink.records if n == m.PREEMPTIONS.name) == 6
    exp = ExpertMetrics("m", replica="r", sink=sink)
    for total in (2, 2, 3, 0, 1):
        exp.observe({"rebalances": total, "balancedness": []})
    assert sum(v for n, v, _ in sink.records if n == m.REBALANCES.name) == 4
    routing = RoutingMetrics("m", replica="r", sink=sink)
    for queried, hit in ((10, 0), (30, 8), (30, 8), (6, 2), (16, 12)):     # (6, 2): the rank was replaced
        routing.observe_rank(0, queried, hit)
        routing.observe_rank(1, 5, 5)

    def by_rank(spec, rank):
        return sum(v for n, v, t in sink.records if n == spec.name and t["rank"] == rank)
    assert by_rank(m.PREFIX_CACHE_QUERIES, "0") == 30 + 16 and by_rank(m.PREFIX_CACHE_HITS, "0") == 8 + 12
    assert by_rank(m.PREFIX_CACHE_QUERIES, "1") == 5 and by_rank(m.PREFIX_CACHE_HITS, "1") == 5


def test_rank_gauges_are_throttled_but_an_emptied_queue_is_always_reported():
    sink = MemorySink()
    eng = EngineMetrics("m", replica="r", sink=sink, gauge_interval_s=1.0)
    for now, running in ((0.0, 4), (0.3, 5), (0.6, 6), (1.1, 7), (1.2, 0)):
        eng.observe_rank(0, num_running=running, num_waiting=0, kv_usage=running / 10, num_preemptions=0,
                         all_to_all_s=0.001, now=now)
    assert [v for n, v, _ in sink.records if n == m.RUNNING.name] == [4, 7, 0]
    assert [v for n, v, _ in sink.records if n == m.KV_USAGE.name] == [0.4, 0.7, 0.0]
    assert sum(1 for n, _, _ in sink.records if n == m.ALL_TO_ALL.name) == 5      # histograms: every step
    assert not [n for n, _, _ in sink.records if n == m.PREEMPTIONS.name]


def test_expert_counts_are_summed_between_flushes():
    sink = MemorySink()
    exp = ExpertMetrics("m", replica="r", sink=sink, flush_interval_s=10.0)
    exp.observe_counts([[1, 2]], now=0.0)                # first call flushes
    exp.observe_counts([[3, 0]], now=1.0)
    exp.observe_counts([[4, 0]], now=2.0)
    assert [(t["expert"], v) for _, v, t in sink.records] == [("0", 1.0), ("1", 2.0)]
    exp.observe_counts([[0, 1]], now=10.5)
    assert [(t["expert"], v) for _, v, t in sink.records[2:]] == [("0", 7.0), ("1", 1.0)]
    exp.observe_counts([[1, 2]], now=11.0)
    with pytest.raises(ValueError):
        exp.observe_counts([[1, 2, 3]], now=11.5)        # shape changed: a wiring bug, not silently dropped
    clone = pickle.loads(pickle.dumps(ExpertMetrics("m", replica="r")))
    assert clone._base == {"model_name": "m", "replica": "r"}


def test_a_failing_sink_never_fails_the_caller(caplog, monkeypatch):
    monkeypatch.setattr("monitoring.recorders._FAILED", set())
    class Broken:
        def record(self, spec, value, tags):
            raise RuntimeError("exporter down")
    exercise(Broken())
    assert "recording epserve_time_to_first_token_seconds failed" in caplog.text
    with pytest.raises(ValueError):                      # a wiring bug (a label the metric lacks) still raises
        EngineMetrics("m", replica="r", sink=MemorySink())._record(m.PROMPT_TOKENS, 1, rank=0)


def test_timer_records_ttft_once_and_outcome_once():
    sink = MemorySink()
    timer = RequestMetrics("m", replica="g", sink=sink).start(now=10.0)
    timer.on_tokens(0, now=10.1)                         # a role-only chunk is not a token
    timer.on_tokens(1, now=10.5)
    timer.on_tokens(1, now=10.75)
    timer.on_finish("length", now=11.0)
    timer.on_finish("stop", now=11.5)
    timer.on_tokens(1, now=12.0)
    assert [(n, v) for n, v, _ in sink.records] == [
        (m.TTFT.name, 0.5), (m.ITL.name, 0.25), (m.E2E.name, 1.0), (m.REQUEST_SUCCESS.name, 1.0)]
    assert sink.records[-1][2]["finished_reason"] == "length"
    timer.on_error(500)                                  # its response failed after all: counted, once
    timer.on_error(500)
    assert [t["status_code"] for n, _, t in sink.records if n == m.HTTP_ERRORS.name] == ["500"]
    failing = RequestMetrics("m", replica="g", sink=sink).start(now=0.0)
    failing.on_error(429)
    failing.on_error(429)                                # a second layer reporting the same failure
    failing.on_finish("stop")
    failing.on_tokens(1)
    assert [t["status_code"] for n, _, t in sink.records if n == m.HTTP_ERRORS.name] == ["500", "429"]
    assert len(sink.records) == 6


def scrape(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("ray_epserve_"):
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def find(samples, name, **labels):
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def test_records_reach_rays_metrics_agent(ray_cluster):
    ray = ray_cluster
    port = ray._private.worker.global_worker.node.metrics_export_port
    model = f"live-{time.time_ns()}"
    timer = RequestMetrics(model, replica="g1").start(now=time.monotonic() - 0.3)
    timer.on_tokens(1)
    timer.on_finish("stop")
    EngineMetrics(model, replica="r1").observe_rank(0, num_running=3, num_waiting=2, kv_usage=0.25,
                                                     num_preemptions=4, all_to_all_s=0.002, step_s=0.01)
    RoutingMetrics(model, replica="g1").on_decision("session", 32)
    RoutingMetrics(model, replica="r1").observe_rank(1, queried=96, hit=64)

    @ray.remote(num_cpus=0)
    def in_a_worker(recorder):                          # the router records from its own actor process
        recorder.observe_counts([[0, 5], [7, 0]])
        recorder.observe({"balancedness": [0.75, 0.5], "rebalances": 2})
        return True

    assert ray.get(in_a_worker.remote(ExpertMetrics(model, replica="r1")))
    deadline, samples = time.monotonic() + 30, {}
    while time.monotonic() < deadline:
        samples = scrape(port)
        if find(samples, "ray_epserve_expert_tokens_total", model_name=model) and \
                find(samples, "ray_epserve_time_to_first_token_seconds_count", model_name=model) and \
                find(samples, "ray_epserve_prefix_cache_hits_total", model_name=model):
            break
        time.sleep(1)
    names = {n for (n, ls), _ in samples.items() if ("model_name", model) in ls}
    assert names <= m.exported_series()
    assert find(samples, "ray_epserve_time_to_first_token_seconds_count", model_name=model) == 1
    assert find(samples, "ray_epserve_request_success_total", model_name=model, finished_reason="stop") == 1
    assert find(samples, "ray_epserve_num_requests_waiting", model_name=model, rank="0") == 2
    assert find(samples, "ray_epserve_num_preemptions_total", model_name=model) == 4
    assert find(samples, "ray_epserve_expert_tokens_total", model_name=model, layer="0", expert="1") == 5
    assert find(samples, "ray_epserve_expert_tokens_total", model_name=model, layer="1", expert="0") == 7
    assert find(samples, "ray_epserve_expert_balancedness", model_name=model, layer="1") == 0.5
    assert find(samples, "ray_epserve_expert_rebalances_total", model_name=model) == 2
    assert find(samples, "ray_epserve_routing_decisions_total", model_name=model, reason="session") == 1
    assert find(samples, "ray_epserve_prefix_cache_hits_total", model_name=model, rank="1") == 64
