"""RoutingMetrics: the recorder of cache-aware routing. The router (in each gateway) records its decisions by reason;
the ModelServer records its ranks' prefix-cache queries and hits (running totals, in tokens). The metrics themselves
are monitoring/metrics.py's; the `reason` label is the router's enum (engine/prefix_affinity.py REASONS)."""
from __future__ import annotations

from engine.prefix_affinity import REASONS
from monitoring.metrics import PREFIX_CACHE_HITS, PREFIX_CACHE_QUERIES, ROUTED_CACHED_TOKENS, ROUTING_DECISIONS
from monitoring.recorders import Recorder


class RoutingMetrics(Recorder):
    def __init__(self, model_name: str, replica: str | None = None, sink=None):
        super().__init__(model_name, replica, sink)
        self._seen: dict[int, tuple[int, int]] = {}            # rank -> (queried, hit) already recorded

    def on_decision(self, reason: str, cached_tokens: int) -> None:
        """One replica choice: its reason (not one of REASONS: "other") and the most prompt tokens a candidate
        was known to cache."""
        self._record(ROUTING_DECISIONS, 1, reason=reason if reason in REASONS else "other")
        self._record(ROUTED_CACHED_TOKENS, max(0, cached_tokens))

    def observe_rank(self, rank: int, queried: int, hit: int) -> None:
        """A rank's running totals of queried and hit tokens; records what grew since the last call."""
        last_q, last_h = self._seen.get(rank, (0, 0))
        if queried < last_q or hit < last_h:                    # a replaced rank starts again from 0
            last_q = last_h = 0
        self._record(PREFIX_CACHE_QUERIES, queried - last_q, rank=rank)
        self._record(PREFIX_CACHE_HITS, hit - last_h, rank=rank)
        self._seen[rank] = (queried, hit)
