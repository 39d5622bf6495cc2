"""ModelServer: the Serve deployment whose every replica owns one EP group (ranks + ExpertRouter actor).

Its placement group (from Serve's `placement_group_bundles`: its own bundle, then one per rank) holds the ranks.
Sends each request's outputs to its gateway's token channel (deploy/token_channel.py), once per step for all of
that gateway's requests. A failed EP group ends the replica's process (and makes `check_health` raise) so Serve
replaces the replica while other replicas keep serving and gateways move its streams there.
"""
from __future__ import annotations

import asyncio
import logging
import os

from cluster.ep_group import EPConfig, EPGroup
from cluster.replica import ReplicaEngine, ReplicaUnhealthy, RequestSink
from engine.generate_request import GenerateRequest
from deploy.app_config import AppArgs
from deploy.model_paths import resolve_model_dir, served_name
from deploy.routing_metrics import RoutingMetrics
from deploy.token_channel import ChannelSender
from deploy.tokenizer import Tokenizer, model_stop_ids
from engine.engine import EngineConfig
from engine.prefix_summary import PrefixSummary
from engine.token_output import TokenOutput
from monitoring.recorders import EngineMetrics, ExpertMetrics, current_replica_id

logger = logging.getLogger(__name__)


def engine_config(args: AppArgs) -> EngineConfig:
    """Each rank's engine sizes its own KV cache from these (engine/kv_budget.py)."""
    return EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                        max_model_len=args.max_model_len, enable_prefix_caching=args.enable_prefix_caching,
                        kv_cache_bytes=None if args.kv_cache_bytes is None else int(args.kv_cache_bytes),
                        kv_cache_memory=int(args.kv_cache_memory), gpu_memory_utilization=args.gpu_memory_utilization)


def ep_config(args: AppArgs) -> EPConfig:
    from model.loader import dtype_name
    dtype = dtype_name(args.dtype, args.device)
    return EPConfig(ep_size=args.ep_size, redundant_experts=args.redundant_experts,
                    placement_strategy=args.placement_strategy, device=args.device, dtype=dtype,
                    collective_timeout_s=args.collective_timeout_s, probe_timeout_s=args.probe_timeout_s,
                    elastic=args.elastic_ep, replace_lost_ranks=args.replace_lost_ranks,
                    rebalance_interval_steps=args.rebalance_interval_steps,
                    cache_aware_ranks=args.request_router == "cache_aware",
                    routing_load_bound=args.routing_load_bound)


class ModelServer:
    def __init__(self, args: dict):
        app_args = AppArgs.model_validate(args)
        model_dir = resolve_model_dir(app_args.model)
        stop_ids = model_stop_ids(model_dir, Tokenizer.from_model_dir(model_dir))
        name = served_name(app_args.model, app_args.served_model_name)
        replica = current_replica_id()
        group = EPGroup(str(model_dir), ep_config(app_args), engine_config(app_args), stop_ids,
                        expert_metrics=ExpertMetrics(name, replica=replica))
        self.engine = ReplicaEngine(group, metrics=EngineMetrics(name, replica=replica))
        self._routing_metrics = RoutingMetrics(name, replica=replica)
        self._waiting: dict[tuple, set[asyncio.Future]] = {}
        self._senders: dict[tuple, ChannelSender] = {}

    async def generate_to(self, request: GenerateRequest, reply_to: tuple[str, int, str]) -> None:
        """Run the request; its outputs go to the gateway's token channel at `reply_to`, in one message per step
        for all of that gateway's requests. Returns once its last outputs are sent (Serve counts it as ongoing
        until then: queueing and 429s keep working); raises what ended it (ValueError: refused, ReplicaUnhealthy).
        Cancelling the call aborts the request and frees its KV blocks at once."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        sender = self._sender(reply_to)

        def resolve(error: BaseException | None) -> None:
            if not done.done():
                done.set_exception(error) if error is not None else done.set_result(None)
        left = request.params.n

        def deliver(outputs: list[TokenOutput]) -> None:          # the replica's reader thread
            nonlocal left
            sender.add(outputs)
            left -= sum(o.finished for o in outputs)
            if left == 0:
                sender.after_flush(lambda: loop.call_soon_threadsafe(resolve, sender.broken))
        try:
            self.engine.submit(request, RequestSink(deliver, lambda e: loop.call_soon_threadsafe(resolve, e), sender))
        except ReplicaUnhealthy:
            self._leave()
            raise
        self._waiting.setdefault(reply_to, set()).add(done)
        try:
            await done
        except BaseException:          # cancelled (the client left), or the channel broke: free its KV blocks
            self.engine.abort(request.request_id)
            if self.engine.error is not None:
                self._leave()
            raise
        finally:
            self._waiting[reply_to].discard(done)

    def _leave(self) -> None:
        """The EP group failed for good: exit the process now instead of at the next failed health check. Serve's
        routers drop a dead replica at once (a failed one, with the shortest queue, would attract every new request
        until then), the controller starts a replacement, and gateways continue this replica's streams elsewhere."""
        logger.error("ModelServer replica exits: its EP group failed (%s)", self.engine.error)
        os._exit(1)

    def _sender(self, reply_to: tuple[str, int, str]) -> ChannelSender:
        sender = self._senders.get(reply_to)
        if sender is None or sender.broken is not None:
            loop = asyncio.get_running_loop()

            def broken(error: BaseException) -> None:               # fail what waits on that gateway
                for done in list(self._waiting.get(reply_to, ())):
                    loop.call_soon_threadsafe(lambda d=done: d.done() or d.set_exception(
                        ReplicaUnhealthy(f"the token channel to the gateway broke: {error}")))
            sender = self._senders[reply_to] = ChannelSender(tuple(reply_to), broken)
        return sender

    def model_info(self) -> dict:
        """What the gateway needs from the engine: the max_model_len the ranks' KV cache allows."""
        return {"max_model_len": self.engine.max_model_len}

    async def record_routing_stats(self) -> dict:
        """Serve's routing stats, read by deploy/prefix_router.py: what the ranks' prefix caches hold (merged; none
        without prefix caching), and requests in flight. Also records the ranks' prefix-cache query/hit counters."""
        reports = await asyncio.gather(*(w.prefix_report.remote() for w in self.engine.group.workers),
                                       return_exceptions=True)
        summaries = []
        for rank, report in enumerate(reports):
            if isinstance(report, BaseException):      # a rank being replaced: the others still count
                continue
            summary, queried, hit = report
            self._routing_metrics.observe_rank(rank, queried, hit)
            if summary is not None:
                summaries.append(summary)
        merged = PrefixSummary.merge(summaries)
        stats = {"in_flight": self.engine.num_in_flight}
        if merged is not None:
            stats["prefix_summary"] = merged.to_wire()
        return stats

    def check_health(self) -> None:
        self.engine.check_health()

    def num_in_flight(self) -> int:
        return self.engine.num_in_flight

    def stats(self) -> dict:
        """This replica's view for operators and tests: requests in flight, per-rank KV use, expert load."""
        import ray
        group = self.engine.group
        return {"replica": self.replica_id(), "in_flight": self.engine.num_in_flight,
                "healthy": self.engine.error is None, "ranks": group.rank_stats(),
                "experts": ray.get(group.router.stats.remote()), "steps": group.num_steps}

    def replica_id(self) -> str:
        from ray import serve
        return serve.get_replica_context().replica_id.unique_id

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
