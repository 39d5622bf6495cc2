"""ReplicaEngine: the asynchronous face of one model replica's EPGroup, as the Serve ModelServer uses it.

The ranks step on their own; this sends them requests and aborts (batched: what arrives in one event-loop turn
goes in one Ray call per rank) and runs one thread that reads the ranks' StepResults and hands each request its
outputs through its RequestSink, all requests of a step together (a sink with a `channel` is flushed once per
batch, so a gateway gets one message per step for all of its requests). A lost rank costs no request: the group
regroups its survivors and continues that rank's requests there (cluster/rank_recovery.py), and their streams just
go on. A group that cannot continue marks the replica unhealthy and ends every in-flight request with the error,
which names the rank.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from cluster.ep_group import EPGroup
from cluster.replica_unhealthy import ReplicaUnhealthy
from engine.generate_request import GenerateRequest
from engine.token_output import TokenOutput

logger = logging.getLogger(__name__)


@dataclass
class RequestSink:
    """Where a request's outputs go, called on the replica's reader thread: `deliver(outputs of one step batch)`,
    `fail(error)` once. `channel`, when set, is flushed after each batch (outputs of many requests, one message)."""
    deliver: Callable[[list[TokenOutput]], None]
    fail: Callable[[BaseException], None]
    channel: object | None = None


class ReplicaEngine:
    def __init__(self, group: EPGroup, metrics=None):
        self.group = group
        self.metrics = metrics          # monitoring.recorders.EngineMetrics, or None
        self.error: Exception | None = None
        self._sinks: dict[str, RequestSink] = {}
        self._left: dict[str, int] = {}            # request -> its completions not finished yet
        self._lock = threading.Lock()
        self._adds: list[GenerateRequest] = []
        self._flush_scheduled = False
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="ep-results", daemon=True)
        self._thread.start()

    @property
    def num_in_flight(self) -> int:
        return len(self._sinks)

    @property
    def max_model_len(self) -> int:
        return self.group.max_model_len

    # ---- requests (the event loop's thread) ----
    def submit(self, request: GenerateRequest, sink: RequestSink) -> None:
        """Start the request; its outputs reach `sink`. Raises ReplicaUnhealthy when the group has failed."""
        if self.error is not None:
            raise ReplicaUnhealthy(str(self.error))
        with self._lock:
            self._sinks[request.request_id] = sink
            self._left[request.request_id] = request.params.n
        self._adds.append(request)
        if not self._flush_scheduled:            # everything submitted in this loop turn goes together
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_adds)
        if self.metrics is not None:
            self.metrics.on_request_added(len(request.prompt_token_ids))

    def abort(self, request_id: str) -> None:
        """Stop delivering to the request and abort it on its rank (frees its KV blocks there at once)."""
        with self._lock:
            self._sinks.pop(request_id, None)
            self._left.pop(request_id, None)
        if any(r.request_id == request_id for r in self._adds):
            self._adds = [r for r in self._adds if r.request_id != request_id]
        else:
            self.group.abort(request_id)

    def _flush_adds(self) -> None:
        self._flush_scheduled = False
        adds, self._adds = self._adds, []
        if adds:
            self.group.add_requests([(r.request_id, r.prompt_token_ids, r.params, r.resume_output_ids)
                                     for r in adds], {r.request_id: r.routing_key for r in adds if r.routing_key})

    def check_health(self) -> None:
        if self.error is not None:
            raise ReplicaUnhealthy(f"EP group failed: {self.error}")

    def shutdown(self) -> None:
        self._stopped = True
        self._thread.join(timeout=5)
        self.group.shutdown()

    # ---- the reader thread ----
    def _run(self) -> None:
        while not self._stopped:
            try:
                results = self.group.results(timeout_s=0.5)
            except Exception as e:          # noqa: BLE001  a failed group: fail every request, report unhealthy
                logger.error("replica failed: %s", e)
                self.error = e
                with self._lock:
                    sinks, self._sinks, self._left = list(self._sinks.values()), {}, {}
                for sink in sinks:
                    sink.fail(ReplicaUnhealthy(f"EP group failed: {e}"))
                return
            if results:
                self._dispatch(results)
            if self.group.lost:
                self._fail_lost()

    def _fail_lost(self) -> None:
        """Requests lost with a rank that could not continue (n > 1 with tokens streamed) end with ReplicaUnhealthy."""
        lost, self.group.lost = self.group.lost, []
        with self._lock:
            sinks = [(self._sinks.pop(rid, None), why) for rid, why in lost]
            for rid, _ in lost:
                self._left.pop(rid, None)
        for sink, why in sinks:
            if sink is not None:
                sink.fail(ReplicaUnhealthy(why))

    def _dispatch(self, results) -> None:
        by_request: dict[str, list[TokenOutput]] = {}
        rejected = []
        for r in results:
            for out in r.outputs:
                by_request.setdefault(out.request_id, []).append(out)
            rejected += r.rejected
        channels = set()
        with self._lock:
            routed = [(self._sinks.get(rid), outs) for rid, outs in by_request.items()]
            failed = [(self._sinks.pop(rid, None), why) for rid, why in rejected]
            for rid, outs in by_request.items():
                if rid in self._left:
                    self._left[rid] -= sum(o.finished for o in outs)
                    if self._left[rid] <= 0:
                        del self._left[rid], self._sinks[rid]
        for sink, outs in routed:
            if sink is not None:
                sink.deliver(outs)
                if sink.channel is not None:
                    channels.add(sink.channel)
        for sink, why in failed:
            if sink is not None:
                sink.fail(ValueError(why))
        for channel in channels:
            channel.flush()
        self._observe(results, by_request)

    def _observe(self, results, by_request) -> None:
        if self.metrics is None:
            return
        self.metrics.on_generated(sum(len(o.new_token_ids) for outs in by_request.values() for o in outs))
        for outs in by_request.values():
            for out in outs:
                if out.queue_time_s is not None:
                    self.metrics.observe_queue_time(out.queue_time_s)
        for r in results:                  # results without a step (aborts) update the gauges, time nothing
            stepped = r.expert_counts is not None
            self.metrics.observe_rank(r.rank, num_running=r.num_running, num_waiting=r.num_waiting,
                                      kv_usage=r.kv_usage, num_preemptions=r.num_preemptions,
                                      all_to_all_s=r.all_to_all_s if stepped else None,
                                      step_s=r.step_s if stepped else None)
