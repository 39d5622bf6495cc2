"""Every epserve metric (name, help, label keys, buckets), the label-value rules, and the sinks that record them:
ray.util.metrics (Ray's agent exports `ray_<name>`, counters as `<name>_total`) or a prometheus_client registry.
Never imports Ray itself and no-ops without it; label values are ids and enums, never request text.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import sys
import threading

logger = logging.getLogger(__name__)
COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
RAY_PREFIX = "ray_"


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """One metric as given to ray.util.metrics; counters are named without `_total` (the exporter appends it)."""
    name: str
    kind: str
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()

    def series(self, prefix: str = RAY_PREFIX) -> tuple[str, ...]:
        """The sample names Prometheus stores for this metric."""
        base = prefix + self.name
        if self.kind == COUNTER:
            return (base + "_total",)
        if self.kind == HISTOGRAM:
            return (base + "_bucket", base + "_sum", base + "_count")
        return (base,)


# Label keys allowed anywhere: ids and enums only, never prompt/completion text. A test enforces it.
LABELS = frozenset({"model_name", "replica", "rank", "layer", "expert", "finished_reason", "status_code", "reason"})
FINISHED_REASONS = frozenset({"stop", "length", "abort", "tool_calls", "error"})   # anything else -> "other"
_BASE = ("model_name", "replica")          # replica: the Serve replica (gateway or ModelServer) that recorded it

# Buckets (seconds): TTFT spans a cached prefix (ms) to a long prompt behind a full queue (minutes).
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
               0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 80.0)
REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                   120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
STEP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28,
                2.56, 5.12, 10.24)

TTFT = MetricSpec("epserve_time_to_first_token_seconds", HISTOGRAM,
                  "Time from the request's arrival at the gateway (before parsing and rendering) to sending "
                  "its first token, as the client sees it.", _BASE,
                  TTFT_BUCKETS)
ITL = MetricSpec("epserve_inter_token_latency_seconds", HISTOGRAM,
                 "Time between consecutive token chunks sent to the client.", _BASE, ITL_BUCKETS)
E2E = MetricSpec("epserve_e2e_request_latency_seconds", HISTOGRAM,
                 "Time from receiving the request to its last byte, finished requests only.", _BASE, REQUEST_BUCKETS)
QUEUE_TIME = MetricSpec("epserve_request_queue_time_seconds", HISTOGRAM,
                        "Time a request waited in the engine queue before it was first scheduled.", _BASE,
                        REQUEST_BUCKETS)
REQUEST_SUCCESS = MetricSpec("epserve_request_success", COUNTER, "Finished requests by finish reason.",
                             _BASE + ("finished_reason",))
HTTP_ERRORS = MetricSpec("epserve_http_errors", COUNTER,
                         "Requests answered with an HTTP error (each once, also mid-stream), by status code; "
                         "/health's 503 is not counted.", _BASE + ("status_code",))
PROMPT_TOKENS = MetricSpec("epserve_prompt_tokens", COUNTER, "Prompt tokens of admitted requests.", _BASE)
GENERATION_TOKENS = MetricSpec("epserve_generation_tokens", COUNTER, "Generated tokens.", _BASE)
RUNNING = MetricSpec("epserve_num_requests_running", GAUGE, "Sequences in the rank's running batch.",
                     _BASE + ("rank",))
WAITING = MetricSpec("epserve_num_requests_waiting", GAUGE, "Sequences waiting on the rank to be scheduled.",
                     _BASE + ("rank",))
KV_USAGE = MetricSpec("epserve_kv_cache_usage_perc", GAUGE, "Fraction of the rank's KV cache blocks in use (0-1).",
                      _BASE + ("rank",))
PREEMPTIONS = MetricSpec("epserve_num_preemptions", COUNTER, "Sequences preempted (KV dropped, recomputed later).",
                         _BASE + ("rank",))
STEP_TIME = MetricSpec("epserve_step_seconds", HISTOGRAM, "Wall time of one engine step on a rank.",
                       _BASE + ("rank",), STEP_BUCKETS)
ALL_TO_ALL = MetricSpec("epserve_all_to_all_seconds", HISTOGRAM,
                        "Time one step spent in MoE dispatch/combine all-to-all collectives on a rank.",
                        _BASE + ("rank",), STEP_BUCKETS)
EXPERT_TOKENS = MetricSpec("epserve_expert_tokens", COUNTER, "Tokens routed to each logical expert of each layer.",
                           _BASE + ("layer", "expert"))
BALANCEDNESS = MetricSpec("epserve_expert_balancedness", GAUGE,
                          "Mean/max rank load per MoE layer over the router's window (1 = perfectly balanced).",
                          _BASE + ("layer",))
REBALANCES = MetricSpec("epserve_expert_rebalances", COUNTER, "Expert placements adopted by the router (EPLB).",
                        _BASE)
RECOVERY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0)
RANKS_LOST = MetricSpec("epserve_ep_ranks_lost", COUNTER,
                        "EP ranks lost by a model replica: dead, or stuck and killed. The group went on with the "
                        "survivors.", _BASE)
RANK_RECOVERIES = MetricSpec("epserve_ep_recoveries", COUNTER,
                             "Times a model replica's EP group regrouped its survivors after losing ranks.", _BASE)
RECOVERY_TIME = MetricSpec("epserve_ep_recovery_seconds", HISTOGRAM,
                           "From a lost rank's first failure report to the survivors stepping again in the new "
                           "group (requests of the lost ranks continued on them).", _BASE, RECOVERY_BUCKETS)
MISSING_RANKS = MetricSpec("epserve_ep_missing_ranks", GAUGE,
                           "EP ranks a model replica is short of its configured size (0 once replacements joined).",
                           _BASE)
REQUESTS_MIGRATED = MetricSpec("epserve_requests_migrated", COUNTER,
                               "Requests continued elsewhere from the tokens they had streamed: on surviving EP ranks "
                               "(recorded by the model replica) or on another replica (by the gateway).", _BASE)
# Cache-aware routing (deploy/routing_metrics.py records them): the router's choices in each gateway, and each rank's
# prefix-cache lookups (vLLM's prefix_cache_queries / prefix_cache_hits, in tokens).
ROUTING_DECISIONS = MetricSpec("epserve_routing_decisions", COUNTER,
                               "ModelServer replicas chosen by the cache-aware router, by reason: affinity (most "
                               "cached prompt tokens), session (prompt_cache_key / user), load (a cached replica "
                               "was overloaded), fallback (nothing cached: power of two).", _BASE + ("reason",))
ROUTED_CACHED_TOKENS = MetricSpec("epserve_routing_cached_tokens", COUNTER,
                                  "Prompt tokens the chosen-from replicas were known to cache, best replica per "
                                  "request, as the router saw it.", _BASE)
PREFIX_CACHE_QUERIES = MetricSpec("epserve_prefix_cache_queries", COUNTER,
                                  "Prompt tokens looked up in a rank's prefix cache at admission.", _BASE + ("rank",))
PREFIX_CACHE_HITS = MetricSpec("epserve_prefix_cache_hits", COUNTER,
                               "Prompt tokens served from a rank's prefix cache at admission.", _BASE + ("rank",))
ALL_METRICS: tuple[MetricSpec, ...] = (TTFT, ITL, E2E, QUEUE_TIME, REQUEST_SUCCESS, HTTP_ERRORS, PROMPT_TOKENS,
                                       GENERATION_TOKENS, RUNNING, WAITING, KV_USAGE, PREEMPTIONS, STEP_TIME,
                                       ALL_TO_ALL, EXPERT_TOKENS, BALANCEDNESS, REBALANCES, RANKS_LOST,
                                       RANK_RECOVERIES, RECOVERY_TIME, MISSING_RANKS, REQUESTS_MIGRATED,
                                       ROUTING_DECISIONS, ROUTED_CACHED_TOKENS, PREFIX_CACHE_QUERIES,
                                       PREFIX_CACHE_HITS)


# Counters Ray exports only after their first increment, i.e. once the event has happened at least once. The routing
# ones need `--enable-prefix-caching` (decisions also the cache_aware router); hits, a prompt that shares a prefix.
ON_EVENT: tuple[MetricSpec, ...] = (HTTP_ERRORS, PREEMPTIONS, REBALANCES, RANKS_LOST, RANK_RECOVERIES,
                                    REQUESTS_MIGRATED, ROUTING_DECISIONS, ROUTED_CACHED_TOKENS, PREFIX_CACHE_QUERIES,
                                    PREFIX_CACHE_HITS)


def exported_series(prefix: str = RAY_PREFIX) -> frozenset[str]:
    """Every sample name a scrape of Ray's metrics agent can show for our metrics."""
    return frozenset(s for spec in ALL_METRICS for s in spec.series(prefix))


def ident(value: object) -> str:
    """An operator-chosen id (served model name, replica id): safe characters only, at most 128."""
    return re.sub(r"[^A-Za-z0-9._:/@-]", "_", str(value))[:128] or "unknown"


def label_value(key: str, value: object) -> str:
    """The label value recorded for a per-record label: ints for ids, a fixed enum otherwise ("other")."""
    if key in ("rank", "layer", "expert"):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"label {key} must be a non-negative int, got {value!r}")
        return str(value)
    if key == "status_code":
        ok = isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599
        return str(value) if ok else "other"
    if key == "finished_reason":
        return value if value in FINISHED_REASONS else "other"
    if key == "reason":            # an enum its recorder checks (deploy/routing_metrics.py: the router's REASONS)
        return value if isinstance(value, str) and re.fullmatch(r"[a-z_]{1,32}", value) else "other"
    raise ValueError(f"label {key!r} is not set per record")


class RaySink:
    """Records through ray.util.metrics when Ray is initialised in this process (driver, actor, Serve replica);
    otherwise drops every record. Ray metric objects are created once per process, on first use."""

    def __init__(self):
        self._metrics: dict[str, object] = {}
        self._lock = threading.Lock()

    def record(self, spec: MetricSpec, value: float, tags: dict[str, str]) -> None:
        ray = sys.modules.get("ray")
        if ray is None or not ray.is_initialized():
            return
        metric = self._metrics.get(spec.name) or self._create(spec)
        if spec.kind == COUNTER:
            if value > 0:                                  # Ray rejects 0 and negative increments
                metric.inc(value, tags)
        elif spec.kind == GAUGE:
            metric.set(value, tags)
        else:
            metric.observe(value, tags)

    def _create(self, spec: MetricSpec):
        from ray.util import metrics as ray_metrics
        with self._lock:
            if spec.name not in self._metrics:
                if spec.kind == HISTOGRAM:
                    self._metrics[spec.name] = ray_metrics.Histogram(spec.name, spec.help, list(spec.buckets),
                                                                     spec.labels)
                else:
                    cls = ray_metrics.Counter if spec.kind == COUNTER else ray_metrics.Gauge
                    self._metrics[spec.name] = cls(spec.name, spec.help, spec.labels)
            return self._metrics[spec.name]


class PrometheusSink:
    """Records into a prometheus_client registry: processes outside Ray's pipeline (load generator, offline runs)."""

    def __init__(self, registry, prefix: str = ""):
        self.registry, self.prefix = registry, prefix
        self._metrics: dict[str, object] = {}

    def record(self, spec: MetricSpec, value: float, tags: dict[str, str]) -> None:
        metric = self._metrics.get(spec.name)
        if metric is None:
            import prometheus_client as pc
            name, kwargs = self.prefix + spec.name, {"labelnames": spec.labels, "registry": self.registry}
            if spec.kind == HISTOGRAM:
                metric = pc.Histogram(name, spec.help, buckets=spec.buckets, **kwargs)
            else:
                metric = (pc.Counter if spec.kind == COUNTER else pc.Gauge)(name, spec.help, **kwargs)
            self._metrics[spec.name] = metric
        child = metric.labels(**tags)
        if spec.kind == COUNTER:
            if value > 0:
                child.inc(value)
        elif spec.kind == GAUGE:
            child.set(value)
        else:
            child.observe(value)


_RAY_SINK = RaySink()


def default_sink() -> RaySink:
    """The process-wide Ray sink (one set of Ray metric objects per process)."""
    return _RAY_SINK
