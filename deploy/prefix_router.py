"""CacheAwareRouter: Serve's request router for ModelServer, sending each request to the replica whose prefix cache
already holds the most of its prompt, unless that replica is overloaded; power of two choices otherwise.

Replicas report what their ranks' prefix caches hold as routing stats (engine/prefix_summary.py: the engine's own
chained block hashes, cut to 64 bits), every `request_routing_stats_period_s`. Between two reports the router also
counts the blocks of the prompts it has just sent to a replica (for `provisional_ttl_s`), so the next turn of a
conversation finds the replica its previous turn went to before that replica's next report says so. The choice
itself is engine/prefix_affinity.py's `choose` (shared with rank placement): load bound first, then the session
(`prompt_cache_key`, else `user`) when the request has one, then cached tokens.
"""
from __future__ import annotations

import logging
import random
import time
from collections import OrderedDict

from ray.serve.request_router import (LocalityMixin, MultiplexMixin, PendingRequest, ReplicaID, RequestRouter,
                                      RunningReplica)

from deploy.routing_metrics import RoutingMetrics
from engine.prefix_affinity import FALLBACK, Candidate, choose
from engine.prefix_summary import PrefixSummary, leading_blocks, prompt_block_keys

logger = logging.getLogger(__name__)
ROUTING_STATS_KEY = "prefix_summary"       # the key of ModelServer.record_routing_stats' dict
MAX_PENDING = 4096


class RecentPrefixes:
    """Block keys of prompts recently sent to each replica, each kept for `ttl_s`, at most `max_keys` per replica."""

    def __init__(self, ttl_s: float, max_keys: int):
        self.ttl_s, self.max_keys = ttl_s, max_keys
        self._keys: dict[str, OrderedDict[int, float]] = {}

    def add(self, replica: str, keys: list[int], now: float) -> None:
        held = self._keys.setdefault(replica, OrderedDict())
        for k in keys:
            held[k] = now + self.ttl_s
            held.move_to_end(k)
        while len(held) > self.max_keys:
            held.popitem(last=False)

    def holds(self, replica: str, key: int, now: float) -> bool:
        expiry = self._keys.get(replica, {}).get(key)
        return expiry is not None and expiry > now

    def drop(self, replica: str) -> None:
        self._keys.pop(replica, None)


def request_of(pending: PendingRequest | None):
    """The GenerateRequest of a `generate_to(request, reply_to)` call, or None for any other call."""
    if pending is None or not pending.args:
        return None
    request = pending.args[0]
    return request if hasattr(request, "prompt_token_ids") else None


def session_of(request) -> str | None:
    """The conversation key the gateway attached (`prompt_cache_key`, else `user`), if any."""
    return getattr(request, "routing_key", None) or None


class CacheAwareRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    def initialize_state(self, load_bound: float = 8, provisional_ttl_s: float = 30.0, max_keys: int = 65536,
                         model_name: str = "model", block_size: int | None = None, **_):
        self._load_bound = load_bound
        self._configured_block_size = block_size     # the replicas' engine block size, known before any report
        self._recent = RecentPrefixes(provisional_ttl_s, max_keys)
        self._summaries: dict[str, tuple[bytes, PrefixSummary]] = {}      # replica -> (wire keys, parsed)
        self._pending_keys: dict[str, list[int]] = {}                      # internal request id -> prompt keys
        self._counted: OrderedDict[str, None] = OrderedDict()               # request ids whose decision is counted
        self._metrics = RoutingMetrics(model_name)

    # ---- what each replica holds ----
    def _summary(self, replica: RunningReplica) -> PrefixSummary | None:
        wire = (replica.routing_stats or {}).get(ROUTING_STATS_KEY)
        rid = replica.replica_id.unique_id
        if not wire:
            return None
        cached = self._summaries.get(rid)
        if cached is None or cached[0] is not wire["keys"]:
            cached = self._summaries[rid] = (wire["keys"], PrefixSummary.from_wire(wire))
        return cached[1]

    def _block_size(self, replicas: list[RunningReplica]) -> int | None:
        for r in replicas:
            summary = self._summary(r)
            if summary is not None:
                return summary.block_size
        return self._configured_block_size

    def cached_tokens(self, replica: RunningReplica, keys: list[int], block_size: int, now: float) -> int:
        """Prompt tokens this replica holds: its last report, extended by what this router sent it since."""
        rid = replica.replica_id.unique_id
        summary = self._summary(replica)
        n = summary.cached_blocks(keys) if summary is not None else 0
        return leading_blocks(keys, lambda key: self._recent.holds(rid, key, now), n) * block_size

    async def _loads(self, replicas: list[RunningReplica]) -> dict[ReplicaID, float]:
        loads, missing = {}, []
        for r in replicas:
            queue_len = self._replica_queue_len_cache.get(r.replica_id) if self._use_replica_queue_len_cache else None
            (missing.append(r) if queue_len is None else loads.__setitem__(r.replica_id, queue_len))
        for r, queue_len in await self._probe_queue_lens(missing, 0) if missing else ():
            loads[r.replica_id] = r.max_ongoing_requests if queue_len is None else queue_len
        return loads

    # ---- the choice ----
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        request = request_of(pending_request)
        block_size = self._block_size(candidate_replicas) if request is not None else None
        if request is None or block_size is None and not session_of(request):
            if request is not None:                              # no block size known (no report, none configured)
                self._count(pending_request, FALLBACK, 0)
            return self._power_of_two(pending_request)
        now = time.time()
        keys = prompt_block_keys(list(request.prompt_token_ids), block_size) if block_size else []
        loads = await self._loads(candidate_replicas)
        candidates = [Candidate(r.replica_id.unique_id, self.cached_tokens(r, keys, block_size, now) if keys else 0,
                                loads.get(r.replica_id, 0)) for r in candidate_replicas]
        choice = choose(candidates, session_of(request), self._load_bound,
                        prompt_tokens=len(request.prompt_token_ids))
        if pending_request is not None and keys:
            self._pending_keys[pending_request.metadata.internal_request_id] = keys
            while len(self._pending_keys) > MAX_PENDING:         # requests cancelled before they were routed
                self._pending_keys.pop(next(iter(self._pending_keys)))
        self._count(pending_request, choice.reason, max((c.cached_tokens for c in candidates), default=0))
        if choice.key is None:
            return self._power_of_two(pending_request)
        chosen = [r for r in candidate_replicas if r.replica_id.unique_id == choice.key]
        rest = [r for r in candidate_replicas if r.replica_id.unique_id != choice.key]
        return [chosen, *self._power_of_two_among(rest)]

    def _count(self, pending_request: PendingRequest | None, reason: str, cached_tokens: int) -> None:
        """One decision per request: Serve asks again while no chosen replica accepts it; those are not counted."""
        rid = pending_request.metadata.internal_request_id if pending_request is not None else None
        if rid is not None:
            if rid in self._counted:
                return
            self._counted[rid] = None
            while len(self._counted) > MAX_PENDING:
                self._counted.popitem(last=False)
        self._metrics.on_decision(reason, cached_tokens)

    def _power_of_two(self, pending_request: PendingRequest | None) -> list[list[RunningReplica]]:
        ids = self.apply_locality_routing(pending_request=pending_request)
        return self._power_of_two_among([self._replicas[i] for i in ids if i in self._replicas])

    @staticmethod
    def _power_of_two_among(replicas: list[RunningReplica]) -> list[list[RunningReplica]]:
        return [random.sample(replicas, min(2, len(replicas)))] if replicas else []

    # ---- lifecycle hooks ----
    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        keys = self._pending_keys.pop(pending_request.metadata.internal_request_id, None)
        if keys:
            self._recent.add(replica_id.unique_id, keys, time.time())

    def on_replica_actor_died(self, replica_id: ReplicaID):
        super().on_replica_actor_died(replica_id)
        self._recent.drop(replica_id.unique_id)
        self._summaries.pop(replica_id.unique_id, None)


def router_options(args) -> dict:
    """ModelServer deployment options selecting this router (AppArgs.request_router == "cache_aware" with prefix
    caching on, AppArgs.routing_load_bound as its load bound), else none: without a prefix cache there is nothing to
    be affine to, and steering requests with a shared preamble to one replica would only unbalance load."""
    if args.request_router != "cache_aware" or not args.enable_prefix_caching:
        return {}
    from ray.serve.config import RequestRouterConfig

    from deploy.model_paths import served_name
    from engine.config import EngineConfig
    return {"request_router_config": RequestRouterConfig(
        request_router_class=CacheAwareRouter, request_routing_stats_period_s=1.0,
        request_routing_stats_timeout_s=10.0,
        request_router_kwargs={"model_name": served_name(args.model, args.served_model_name),
                               "block_size": EngineConfig.block_size,
                               "load_bound": args.routing_load_bound})}
