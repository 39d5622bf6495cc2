"""The recorders the gateway (RequestMetrics), the model replica (EngineMetrics) and the expert router
(ExpertMetrics) call with plain Python values. They only turn events into metric records (monitoring/metrics.py
owns names, labels and sinks); without Ray initialised in the process every call is a no-op. Cache-aware routing's
recorder subclasses Recorder in deploy/routing_metrics.py (its reason enum is the router's).
"""
from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping

from monitoring.metrics import (ALL_TO_ALL, BALANCEDNESS, E2E, EXPERT_TOKENS, GENERATION_TOKENS, HTTP_ERRORS,
                                ITL, KV_USAGE, MISSING_RANKS, PREEMPTIONS, PROMPT_TOKENS, QUEUE_TIME, RANK_RECOVERIES,
                                RANKS_LOST, REBALANCES, RECOVERY_TIME, REQUEST_SUCCESS, REQUESTS_MIGRATED, RUNNING,
                                STEP_TIME, TTFT, WAITING, MetricSpec, default_sink, ident, label_value)

logger = logging.getLogger(__name__)
_FAILED: set[str] = set()


def current_replica_id() -> str:
    """The Serve replica's unique id inside a replica, else `pid-<pid>` (drivers, actors, tests)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            from ray import serve
            return serve.get_replica_context().replica_id.unique_id
        except Exception:  # not inside a Serve replica (RayServeException), or an older Serve
            pass
    return f"pid-{os.getpid()}"


class Recorder:
    """model_name and replica are fixed per recorder; picklable (to hand to a Ray actor) when sink is None."""

    def __init__(self, model_name: str, replica: str | None = None, sink=None):
        self._base = {"model_name": ident(model_name), "replica": ident(replica or current_replica_id())}
        self._sink = sink

    def _record(self, spec: MetricSpec, value: float, **labels) -> None:
        tags = {**self._base, **{k: label_value(k, v) for k, v in labels.items()}}
        if tuple(sorted(tags)) != tuple(sorted(spec.labels)):
            raise ValueError(f"{spec.name} takes labels {spec.labels}, got {tuple(tags)}")
        try:
            (self._sink or default_sink()).record(spec, float(value), tags)
        except Exception:  # a metric must never fail a request or a step
            if spec.name not in _FAILED:
                _FAILED.add(spec.name)
                logger.warning("recording %s failed; later failures of it are not logged", spec.name, exc_info=True)


class RequestMetrics(Recorder):
    """Gateway side, one per process: latencies as the client sees them, outcomes, HTTP errors."""

    def start(self, now: float | None = None) -> RequestTimer:
        """Call when a request arrives (before parsing); returns its timer."""
        return RequestTimer(self, time.monotonic() if now is None else now)

    def on_http_error(self, status_code: int) -> None:
        """A request without a timer answered with an error status (4xx/5xx). A timed request reports through
        RequestTimer.on_error, which counts it once however many layers report the same failure."""
        self._record(HTTP_ERRORS, 1, status_code=status_code)

    def on_request_migrated(self) -> None:
        """A stream whose model replica was lost continues on another replica."""
        self._record(REQUESTS_MIGRATED, 1)


class RequestTimer:
    """One request: TTFT at its first token chunk, ITL between chunks, e2e and outcome when it ends (once), and
    its HTTP error (once)."""

    __slots__ = ("metrics", "start", "last", "done", "failed")

    def __init__(self, metrics: RequestMetrics, start: float):
        self.metrics, self.start, self.last, self.done, self.failed = metrics, start, None, False, False

    def on_tokens(self, num_tokens: int = 1, now: float | None = None) -> None:
        """A chunk carrying `num_tokens` new tokens was sent to the client (chunks without tokens: don't call)."""
        if num_tokens <= 0 or self.done:
            return
        now = time.monotonic() if now is None else now
        if self.last is None:
            self.metrics._record(TTFT, max(0.0, now - self.start))
        else:
            self.metrics._record(ITL, max(0.0, now - self.last))
        self.last = now

    def on_finish(self, finished_reason: str, now: float | None = None) -> None:
        """The response ended normally: "stop", "length", "abort", "tool_calls" (others count as "other")."""
        if not self.done:
            self.done = True
            now = time.monotonic() if now is None else now
            self.metrics._record(E2E, max(0.0, now - self.start))
            self.metrics._record(REQUEST_SUCCESS, 1, finished_reason=finished_reason)

    def on_error(self, status_code: int) -> None:
        """The request failed with this HTTP status, before or after streaming began: counted once, however many
        layers report it, and never then a success. After on_finish it still counts (the generation ended but its
        response could not be built: a server bug must not go uncounted)."""
        if not self.failed:
            self.done = self.failed = True
            self.metrics.on_http_error(status_code)


class EngineMetrics(Recorder):
    """Model replica side: tokens, queue time, and each rank's batch, KV cache, preemptions and step timings."""

    def __init__(self, model_name: str, replica: str | None = None, sink=None, gauge_interval_s: float = 0.5):
        super().__init__(model_name, replica, sink)
        self.gauge_interval_s = gauge_interval_s     # Ray exports every 1-10 s: setting gauges each step is waste
        self._preemptions: dict[int, int] = {}
        self._gauges_set: dict[int, float] = {}

    def on_request_added(self, num_prompt_tokens: int) -> None:
        self._record(PROMPT_TOKENS, num_prompt_tokens)

    def on_generated(self, num_tokens: int) -> None:
        """Tokens generated by one step (all ranks, all requests)."""
        self._record(GENERATION_TOKENS, num_tokens)

    def observe_queue_time(self, seconds: float) -> None:
        self._record(QUEUE_TIME, max(0.0, seconds))

    def observe_rank(self, rank: int, *, num_running: int, num_waiting: int, kv_usage: float,
                     num_preemptions: int, all_to_all_s: float | None = None, step_s: float | None = None,
                     now: float | None = None) -> None:
        """One rank's StepResult after a step. Gauges are set at most every gauge_interval_s (and always when the
        queue empties); num_preemptions is the rank's running total, its increase is counted."""
        now = time.monotonic() if now is None else now
        if now - self._gauges_set.get(rank, float("-inf")) >= self.gauge_interval_s or not num_running + num_waiting:
            self._gauges_set[rank] = now
            self._record(RUNNING, num_running, rank=rank)
            self._record(WAITING, num_waiting, rank=rank)
            self._record(KV_USAGE, kv_usage, rank=rank)
        last = self._preemptions.get(rank, 0)
        if num_preemptions != last:                  # smaller: the rank restarted, its new total counts
            self._record(PREEMPTIONS, num_preemptions - last if num_preemptions > last else num_preemptions,
                         rank=rank)
            self._preemptions[rank] = num_preemptions
        if all_to_all_s is not None:
            self._record(ALL_TO_ALL, max(0.0, all_to_all_s), rank=rank)
        if step_s is not None:
            self._record(STEP_TIME, max(0.0, step_s), rank=rank)


class ExpertMetrics(Recorder):
    """Expert router side: per-(layer, expert) token counters, balancedness per layer, rebalances; and the EP group's
    membership (its replica process): ranks lost, recoveries and their time, ranks missing, requests continued.

    Counts are summed here and pushed at most every `flush_interval_s` (a 120b replica has 36 x 128 counters)."""

    def __init__(self, model_name: str, replica: str | None = None, sink=None, flush_interval_s: float = 5.0):
        super().__init__(model_name, replica, sink)
        self.flush_interval_s = flush_interval_s
        self._pending: list[list[int]] | None = None
        self._last_flush = float("-inf")
        self._last_stats = float("-inf")
        self._rebalances = 0
        self._missing = 0                  # ranks lost and not replaced yet

    def on_ranks_ready(self) -> None:
        """The group started with every rank (the missing-ranks gauge exists from the start, at 0)."""
        self._missing = 0
        self._record(MISSING_RANKS, 0)

    def on_rank_lost(self, rank: int) -> None:
        """Rank `rank` of the group was lost (dead, or stuck and killed)."""
        self._record(RANKS_LOST, 1)
        self._missing += 1
        self._record(MISSING_RANKS, self._missing)

    def on_recovery(self, seconds: float) -> None:
        """The survivors stepped again, `seconds` after the loss was first reported."""
        self._record(RANK_RECOVERIES, 1)
        self._record(RECOVERY_TIME, max(0.0, seconds))

    def on_rank_replaced(self, rank: int) -> None:
        """A replacement joined the group as `rank`."""
        self._missing = max(0, self._missing - 1)
        self._record(MISSING_RANKS, self._missing)

    def on_request_migrated(self) -> None:
        """A request of a lost rank continues on a survivor."""
        self._record(REQUESTS_MIGRATED, 1)

    def observe_counts(self, counts, now: float | None = None) -> None:
        """Token counts [L][E] of one or more steps (nested lists, or a tensor/array: anything with tolist())."""
        rows = counts.tolist() if hasattr(counts, "tolist") else counts
        if self._pending is None:
            self._pending = [[int(c) for c in row] for row in rows]
        else:
            if [len(r) for r in rows] != [len(r) for r in self._pending]:
                raise ValueError(f"expert counts changed shape: {len(rows)} layers x {len(rows[0])} experts, "
                                 f"pending {len(self._pending)} x {len(self._pending[0])}")
            for acc, row in zip(self._pending, rows):
                for e, c in enumerate(row):
                    acc[e] += int(c)
        now = time.monotonic() if now is None else now
        if now - self._last_flush >= self.flush_interval_s:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        """Push the summed counts now (call on shutdown too)."""
        pending, self._pending = self._pending, None
        self._last_flush = time.monotonic() if now is None else now
        for layer, row in enumerate(pending or ()):
            for expert, count in enumerate(row):
                if count > 0:
                    self._record(EXPERT_TOKENS, count, layer=layer, expert=expert)

    def observe(self, stats: Mapping, now: float | None = None) -> None:
        """ExpertRouter.stats(): sets balancedness [L] (at most every flush_interval_s) and counts new rebalances."""
        rebalances = int(stats.get("rebalances", 0))          # a running total; smaller: the router restarted
        self._record(REBALANCES, rebalances - self._rebalances if rebalances >= self._rebalances else rebalances)
        self._rebalances = rebalances
        now = time.monotonic() if now is None else now
        if now - self._last_stats >= self.flush_interval_s:
            self._last_stats = now
            for layer, value in enumerate(stats.get("balancedness", ())):
                self._record(BALANCEDNESS, float(value), layer=layer)
