"""EPGroup: one model replica = `ep_size` EPWorker actors that drive themselves, plus its ExpertRouter actor.

Owns request -> rank assignment (data-parallel attention: each request lives on one rank), sending adds and aborts
to the ranks (asynchronous, batched: one Ray call per rank per batch), reading every rank's stream of StepResults
(one Ray item per rank per step, never one per token), expert-load reporting and rebalancing, and the group's
membership: ranks are known by a worker id that survives regroups. A lost rank (dead, or stuck and killed) is
handled by cluster/rank_recovery.py: the survivors regroup and continue the lost rank's requests, then a replacement
brings the group back to full size; with `elastic=False` it fails the group with an error naming the rank. Never on
the step path: the ranks step on their own. Used by the CLI directly and by the Serve ModelServer (cluster/replica.py).
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import threading
import time

import ray
from ray.exceptions import RayActorError

from cluster.ep_worker import StepResult
from cluster.load_report import LoadReport
from cluster.rank_actors import RankActors
from cluster.rank_affinity import RankAffinity
from cluster.rank_loop import RankBroken
from cluster.rank_recovery import PROBE_TIMEOUT_S, EPStepError, RankRecovery, short
from cluster.request_book import RequestBook
from cluster.router import ExpertRouter, RouterConfig
from engine.engine import EngineConfig
from engine.sampling_params import SamplingParams
from engine.token_output import TokenOutput
from model.config import ModelConfig

logger = logging.getLogger(__name__)
_ids = itertools.count()                      # request ids of generate()
__all__ = ["EPConfig", "EPGroup", "EPStepError"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class EPConfig:
    ep_size: int = 1
    redundant_experts: int = 0
    placement_strategy: str = "PACK"          # PACK: one node when it fits (NVLink); SPREAD: across nodes
    device: str = "cpu"
    dtype: str = "float32"
    collective_timeout_s: float = 60.0        # a collective (or a regroup's rendezvous) raises after this
    probe_timeout_s: float = PROBE_TIMEOUT_S  # a rank silent this long that answers no ping is stuck: killed
    elastic: bool = True                      # a lost rank: regroup the survivors (False: the group fails)
    replace_lost_ranks: bool = True           # then start a replacement and regroup at full size
    rebalance_interval_steps: int = 1000      # 0: only on request
    window_steps: int = 1000                  # load statistics window of the router
    report_every_steps: int = 16              # expert counts batched into one router call
    experts: str = "auto"                     # slots held "dense", "packed" (MXFP4), or "auto": packed on CUDA
    cache_aware_ranks: bool = True            # with prefix caching: a request goes to the rank holding its prefix
                                              # or its session (False: always the least loaded rank)
    routing_load_bound: float = 8.0           # ...unless it has this many requests more than the least loaded rank

    def __post_init__(self):
        if self.ep_size < 1:
            raise ValueError(f"ep_size must be at least 1, got {self.ep_size}")
        if self.placement_strategy not in ("PACK", "SPREAD"):
            raise ValueError(f"placement_strategy must be PACK or SPREAD, got {self.placement_strategy!r}")
        if self.experts not in ("auto", "dense", "packed"):
            raise ValueError(f"experts must be auto, dense or packed, got {self.experts!r}")
        if self.collective_timeout_s <= 0 or self.probe_timeout_s <= 0:
            raise ValueError("collective_timeout_s and probe_timeout_s must be > 0")


class EPGroup:
    def __init__(self, model_dir: str, ep: EPConfig, engine: EngineConfig = EngineConfig(),
                 eos_token_ids: tuple[int, ...] = (), expert_metrics=None):
        cfg = ModelConfig.from_dir(model_dir)
        self.ep, self.model_config, self.model_dir = ep, cfg, str(model_dir)
        self.engine_config, self.eos_token_ids = engine, tuple(eos_token_ids)
        self.metrics = expert_metrics              # monitoring.recorders.ExpertMetrics, or None
        self.num_steps = 0
        self.epoch = 0                             # +1 at each regroup
        self.error: EPStepError | None = None
        self.lost: list[tuple[str, str]] = []      # (request id, why): lost with a rank, could not continue
        self.router = ray.remote(ExpertRouter).options(num_cpus=0).remote(RouterConfig(
            num_layers=cfg.num_hidden_layers, num_experts=cfg.num_local_experts, ep_size=ep.ep_size,
            num_redundant=ep.redundant_experts, window_steps=ep.window_steps,
            rebalance_interval_steps=ep.rebalance_interval_steps), None, expert_metrics)
        self.placement_version, self.placement = ray.get(self.router.placement.remote())
        self.actors = RankActors(ep, self.model_dir, engine, self.eos_token_ids)
        self._lock = threading.Lock()
        self.book = RequestBook()
        self.affinity = (RankAffinity(engine.block_size, load_bound=ep.routing_load_bound)
                         if engine.enable_prefix_caching and ep.cache_aware_ranks and ep.ep_size > 1 else None)
        self._sessions: dict[str, str] = {}        # request id -> session key, until placed
        self._held: list[tuple] | None = None      # while the membership changes: adds and aborts, in order
        self.load = LoadReport(self.router, ep.report_every_steps, ep.rebalance_interval_steps)
        first = self.actors.first_bundle
        self.actors.members = [self.actors.spawn(first + r, r, ep.ep_size) for r in range(ep.ep_size)]
        host, port = ray.get(self.workers[0].rendezvous_address.remote())
        infos = self._setup(host, port)
        self.max_model_len = min(i["max_model_len"] for i in infos)
        self.nodes = [i["node"] for i in infos]
        self.kv_cache_bytes = infos[0]["kv_cache_bytes"] if ep.device == "cuda" else None
        for w, info in zip(self.members, infos):
            self.actors.started(w, info)
            self.book.add_worker(w)
            self.actors.read(w)
        self.load.reset(self.members, 0)
        self.recovery = RankRecovery(self)
        if self.metrics is not None:
            self.metrics.on_ranks_ready()
        logger.info("EP group ready: %d ranks on %s (rendezvous %s:%d, %s), max_model_len %d", ep.ep_size,
                    ", ".join(self.nodes), host, port, ep.placement_strategy, self.max_model_len)

    @property
    def members(self) -> list[int]:
        """Worker ids of the ranks in rank order."""
        return self.actors.members

    @property
    def workers(self) -> list:
        """The rank actors in rank order."""
        return self.actors.workers

    def _setup(self, host: str, port: int) -> list[dict]:
        """Every rank joins, loads and starts; a rank that fails is named with its own error, not a secondary one."""
        refs = [w.setup.remote(host, port, self.placement, self.ep.collective_timeout_s) for w in self.workers]
        infos, failures = [], []
        for rank, ref in enumerate(refs):
            try:
                infos.append(ray.get(ref))
            except RayActorError as e:
                failures.append(f"rank {rank} died during setup ({short(e)})")
            except ray.exceptions.RayTaskError as e:
                failures.append(f"rank {rank} failed during setup: {short(e.cause or e)}")
        if failures:
            self.shutdown()
            raise EPStepError("EP group setup failed: " + "; ".join(failures))
        return infos

    # ---- requests (any thread) ----
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> int | None:
        return self.add_requests([(request_id, prompt_token_ids, params)])[0]

    def add_requests(self, requests: list[tuple], sessions: dict[str, str] | None = None) -> list[int | None]:
        """Queue (request id, prompt ids, SamplingParams[, resumed output ids]) on the ranks with the least
        outstanding work (tokens to prefill and to decode), or, with prefix caching, where their prefix or their
        session (`sessions`: request id -> prompt_cache_key / user) lives: one Ray call per rank that gets any.
        Returns each request's rank (None: held while the group regroups, placed right after). A request a rank
        refuses comes back in a StepResult's `rejected`."""
        with self._lock:
            if sessions and self.affinity is not None:
                self._sessions.update(sessions)
            if self._held is not None:
                self._held.extend(("add", *r) for r in requests)
                return [None] * len(requests)
            batches = self._place([("add", *r) for r in requests])
        self._send(batches)
        return [self.members.index(self.book.worker_of(r[0])) if r[0] in self.book else None for r in requests]

    def _place(self, adds: list[tuple]) -> dict[int, list[tuple]]:
        """Book each ("add", id, prompt, params[, resume]) on the member holding most of its prompt's prefix (prefix
        caching on; cluster/rank_affinity.py), else on the least-loaded one (lock held)."""
        batches: dict[int, list[tuple]] = {}
        for command in adds:
            request_id, prompt, params, *resume = command[1:]
            worker = (self.affinity.choose(prompt, self.book.requests_on(self.members),
                                           self._sessions.pop(request_id, None))
                      if self.affinity is not None else None)
            if worker is None:
                worker = self.book.least_loaded(self.members)
            if self.affinity is not None:
                self.affinity.placed(worker, prompt)
            self.book.add(request_id, prompt, params, resume[0] if resume else (), worker)
            batches.setdefault(worker, []).append(command)
        return batches

    def _send(self, batches: dict[int, list[tuple]]) -> None:
        for worker, commands in batches.items():
            self.actors.handles[worker].submit.remote(commands)

    def abort(self, request_id: str) -> None:
        """Abort on its rank (frees its KV blocks there); its final outputs come back in a StepResult."""
        with self._lock:
            if self._held is not None:
                self._held.append(("abort", request_id))
                return
            worker = self.book.aborted(request_id)
        if worker is not None:
            self.actors.handles[worker].submit.remote([("abort", request_id)])

    def hold(self) -> None:
        """Keep adds and aborts back while the membership changes (the caller holds the recovery lock)."""
        with self._lock:
            self._held = []

    def release_held(self) -> None:
        """Send what was held to the (new) members, in order."""
        with self._lock:
            held, self._held = self._held or [], None
            batches = self._place([c for c in held if c[0] == "add"])
            for command in (c for c in held if c[0] == "abort"):
                worker = self.book.aborted(command[1])
                if worker is not None:
                    batches.setdefault(worker, []).append(command)
        self._send(batches)

    # ---- results (one reader at a time) ----
    def results(self, timeout_s: float | None = None) -> list[StepResult]:
        """StepResults of every rank that arrived since the last call, waiting up to `timeout_s` for the first. A lost
        rank is recovered from inside this call (the survivors wait meanwhile); raises EPStepError once the group
        cannot continue (naming the failed rank)."""
        if self.error is not None:
            raise self.error
        try:
            items = [self.actors.inbox.get(timeout=timeout_s)]
        except queue.Empty:
            return []
        while not self.actors.inbox.empty():
            items.append(self.actors.inbox.get_nowait())
        results = []
        for worker, batch in items:
            for item in batch if isinstance(batch, list) else [batch]:
                if worker in self.actors.dead or worker not in self.members:
                    break                         # a lost rank's last words: its requests continue elsewhere
                if isinstance(item, StepResult):
                    self._account(worker, item)
                    results.append(item)
                elif not (isinstance(item, RankBroken) and item.epoch < self.epoch):     # else: already regrouped
                    self._failed(worker, item)
        step = self.load.report(check=not self.recovery.busy)
        if step is not None:
            with self.recovery.lock:                 # never a map of the old layout into a re-formed group
                self._broadcast(ray.get(self.router.maybe_rebalance.remote(step)))
        return results

    def _failed(self, worker: int, error) -> None:
        if self.ep.elastic and self.ep.ep_size > 1:
            self.recovery.recover(worker, error)
            return
        rank = self.actors.rank_of(worker)
        why = error.error if isinstance(error, RankBroken) else error
        self.error = EPStepError(f"EP group failed at step {self.num_steps}: {self.recovery.diagnose(rank, why)}")
        logger.error("%s", self.error)
        raise self.error

    def _account(self, worker: int, r: StepResult) -> None:
        with self._lock:
            self.num_steps = max(self.num_steps, r.step)
            self.book.on_outputs(r.outputs)
            for request_id, _ in r.rejected:
                self.book.release(request_id)
        if r.expert_counts is not None and r.epoch == self.epoch:         # steps of an older group: not counted
            self.load.add(worker, r.step, r.expert_counts)

    def adopt_members(self, members: list[int], epoch: int, step: int, version: int, placement) -> None:
        """The group was re-formed: `members` by rank, from step `step` of `epoch` under `placement`. Counts of
        steps not every old member reported are dropped."""
        with self._lock:
            self.actors.members, self.epoch = list(members), epoch
            self.num_steps = max(self.num_steps, step)
            self.placement_version, self.placement = version, placement
            for w in members:
                self.book.add_worker(w)
        self.load.reset(members, step)

    # ---- expert placement ----
    def rebalance(self) -> int:
        """Recompute the placement from the load window now and send it to the ranks (applied by all of them in
        the same step); returns the number of expert slots whose expert changes."""
        self.load.flush()
        with self.recovery.lock:
            return self._broadcast(ray.get(self.router.rebalance.remote()))

    def _broadcast(self, placement) -> int:
        if placement is None or placement == self.placement:
            return 0
        version = ray.get(self.router.placement.remote())[0]
        moved = self.placement.moves(placement)
        for w in self.workers:
            w.submit.remote([("placement", version, placement)])
        self.placement_version, self.placement = version, placement
        logger.info("expert placement v%d sent to the ranks: %d slots change", version, moved)
        return moved

    # ---- synchronous driver (CLI, tests, benchmarks) ----
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 on_results=None) -> list[list[TokenOutput]]:
        """Run prompts to completion; per prompt, the final TokenOutput of each of its n sequences.
        `on_results(group, results)` runs after every batch of StepResults (tests trigger rebalances from it)."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"gen-{next(_ids)}" for _ in prompts]
        self.add_requests(list(zip(ids, prompts, params)))
        final: dict[tuple[str, int], TokenOutput] = {}
        wanted = sum(p.n for p in params)
        patience = self.ep.collective_timeout_s + self.ep.probe_timeout_s + 5
        progress, epoch = time.monotonic(), self.epoch
        while len(final) < wanted:
            results = self.results(timeout_s=patience)
            if results or self.epoch != epoch:           # stepping, or just regrouped
                progress, epoch = time.monotonic(), self.epoch
            elif time.monotonic() - progress > patience:
                raise EPStepError(f"EP group produced nothing for {patience:.0f}s: "
                                  f"{self.recovery.diagnose(0, TimeoutError('no results'))}")
            for r in results:
                if r.rejected:
                    raise ValueError(r.rejected[0][1])
                final.update({(o.request_id, o.index): o for o in r.outputs if o.finished})
            if self.lost:
                raise EPStepError(f"request {self.lost[0][0]} was lost: {self.lost[0][1]}")
            if on_results is not None:
                on_results(self, results)
        return [[final[(rid, i)] for i in range(p.n)] for rid, p in zip(ids, params)]

    # ---- lifecycle ----
    def rank_stats(self) -> list[dict]:
        return ray.get([w.stats.remote() for w in self.workers], timeout=self.ep.collective_timeout_s + 5)

    def num_expert_params(self) -> list[int]:
        return ray.get([w.num_expert_params.remote() for w in self.workers])

    def shutdown(self) -> None:
        self.actors.shutdown()
        ray.kill(self.router)
