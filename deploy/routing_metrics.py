"""Metrics of cache-aware routing: routing decisions by reason (the router, in each gateway) and prefix-cache queries
and hits per rank (vLLM's `prefix_cache_queries` / `prefix_cache_hits`, in tokens, under the project's prefix; the
ModelServer records them from its ranks' counters). Kept here until monitoring/metrics.py takes the specs over (the
`reason` label is a fixed enum: engine/prefix_affinity.py REASONS)."""
from __future__ import annotations

from engine.prefix_affinity import REASONS
from monitoring.metrics import COUNTER, MetricSpec, default_sink, ident
from monitoring.recorders import current_replica_id

ROUTING_DECISIONS = MetricSpec("epserve_routing_decisions", COUNTER,
                               "ModelServer replicas chosen by the cache-aware router, by reason: affinity (most "
                               "cached prompt tokens), session (prompt_cache_key / user), load (a cached replica "
                               "was overloaded), fallback (nothing cached: power of two).",
                               ("model_name", "replica", "reason"))
ROUTED_CACHED_TOKENS = MetricSpec("epserve_routing_cached_tokens", COUNTER,
                                  "Prompt tokens the chosen-from replicas were known to cache, best replica per "
                                  "request, as the router saw it.", ("model_name", "replica"))
PREFIX_CACHE_QUERIES = MetricSpec("epserve_prefix_cache_queries", COUNTER,
                                  "Prompt tokens looked up in a rank's prefix cache at admission.",
                                  ("model_name", "replica", "rank"))
PREFIX_CACHE_HITS = MetricSpec("epserve_prefix_cache_hits", COUNTER,
                               "Prompt tokens served from a rank's prefix cache at admission.",
                               ("model_name", "replica", "rank"))
ROUTING_METRICS = (ROUTING_DECISIONS, ROUTED_CACHED_TOKENS, PREFIX_CACHE_QUERIES, PREFIX_CACHE_HITS)


class RoutingMetrics:
    def __init__(self, model_name: str, replica: str | None = None, sink=None):
        self._base = {"model_name": ident(model_name), "replica": ident(replica or current_replica_id())}
        self._sink = sink
        self._seen: dict[int, tuple[int, int]] = {}            # rank -> (queried, hit) already recorded

    def _record(self, spec: MetricSpec, value: float, **labels: str) -> None:
        try:
            (self._sink or default_sink()).record(spec, float(value), {**self._base, **labels})
        except Exception:  # noqa: BLE001  a metric must never fail a request
            pass

    def on_decision(self, reason: str, cached_tokens: int) -> None:
        self._record(ROUTING_DECISIONS, 1, reason=reason if reason in REASONS else "fallback")
        self._record(ROUTED_CACHED_TOKENS, cached_tokens)

    def observe_rank(self, rank: int, queried: int, hit: int) -> None:
        """A rank's running totals of queried and hit tokens; records what grew since the last call."""
        last_q, last_h = self._seen.get(rank, (0, 0))
        if queried < last_q or hit < last_h:                    # a replaced rank starts again from 0
            last_q = last_h = 0
        self._record(PREFIX_CACHE_QUERIES, queried - last_q, rank=str(rank))
        self._record(PREFIX_CACHE_HITS, hit - last_h, rank=str(rank))
        self._seen[rank] = (queried, hit)
