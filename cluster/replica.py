"""ReplicaEngine: the asynchronous face of one model replica's EPGroup, as the Serve ModelServer uses it.

One thread owns the EPGroup (every Ray call to the ranks happens there, in order): it applies queued adds and
aborts between steps, runs lockstep steps while work exists, and hands TokenOutputs to per-request asyncio queues.
A failed step (dead or stuck rank) marks the replica unhealthy and ends every in-flight request with the error.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator

from cluster.ep_group import EPGroup
from engine.generate_request import GenerateRequest
from engine.token_output import TokenOutput

logger = logging.getLogger(__name__)


class ReplicaUnhealthy(RuntimeError):
    """The EP group failed; Serve restarts the replica, other replicas keep serving."""


class ReplicaEngine:
    def __init__(self, group: EPGroup, metrics=None):
        self.group = group
        self.metrics = metrics          # monitoring.recorders.EngineMetrics, or None
        self.error: Exception | None = None
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="ep-step-loop", daemon=True)
        self._thread.start()

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    async def stream(self, request: GenerateRequest) -> AsyncIterator[TokenOutput]:
        """TokenOutputs of the request as the ranks produce them. Leaving early (client gone, task cancelled)
        aborts the request on its rank, which frees its KV blocks at once."""
        if self.error is not None:
            raise ReplicaUnhealthy(str(self.error))
        out_queue: asyncio.Queue = asyncio.Queue()
        self._streams[request.request_id] = (asyncio.get_running_loop(), out_queue)
        self._send(("add", request))
        remaining = request.params.n
        try:
            while remaining:
                item = await out_queue.get()
                if isinstance(item, Exception):
                    raise item
                remaining -= item.finished
                yield item
        finally:
            self._streams.pop(request.request_id, None)
            if remaining:
                self._send(("abort", request.request_id))

    def check_health(self) -> None:
        if self.error is not None:
            raise ReplicaUnhealthy(f"EP group failed: {self.error}")

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=30)
        self.group.shutdown()

    # ---- the step thread ----
    def _send(self, command) -> None:
        self._commands.put(command)
        self._wake.set()

    def _run(self) -> None:
        while not self._stopped and self.error is None:
            try:
                self._apply_commands()
                if self.group.has_unfinished():
                    outputs = self.group.step()
                    for out in outputs:
                        self._deliver(out.request_id, out)
                    self._observe(outputs)
                else:
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
            except Exception as e:  # a failed step: fail every request, report unhealthy
                logger.error("replica step loop failed: %s", e)
                self.error = e
                for request_id in list(self._streams):
                    self._deliver(request_id, ReplicaUnhealthy(f"EP group failed: {e}"))

    def _apply_commands(self) -> None:
        while True:
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                try:
                    self.group.add_request(arg.request_id, arg.prompt_token_ids, arg.params)
                except ValueError as e:   # a request the engine can never serve
                    self._deliver(arg.request_id, e)
                    continue
                if self.metrics is not None:
                    self.metrics.on_request_added(len(arg.prompt_token_ids))
            else:
                for out in self.group.abort(arg):
                    self._deliver(arg, out)

    def _observe(self, outputs) -> None:
        if self.metrics is None:
            return
        self.metrics.on_generated(sum(len(o.new_token_ids) for o in outputs))
        for out in outputs:
            if out.queue_time_s is not None:
                self.metrics.observe_queue_time(out.queue_time_s)
        for r in self.group.last_results:
            self.metrics.observe_rank(r.rank, num_running=r.num_running, num_waiting=r.num_waiting,
                                      kv_usage=r.kv_usage, num_preemptions=r.num_preemptions,
                                      all_to_all_s=r.all_to_all_s, step_s=r.step_s)

    def _deliver(self, request_id: str, item) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, out_queue = target
            loop.call_soon_threadsafe(out_queue.put_nowait, item)
