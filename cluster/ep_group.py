"""EPGroup: one model replica = `ep_size` EPWorker actors that drive themselves, plus its ExpertRouter actor.

Owns request -> rank assignment (data-parallel attention: each request lives on one rank), sending adds and aborts
to the ranks (asynchronous, batched: one Ray call per rank per batch), reading every rank's stream of StepResults
(one Ray item per rank per step, never one per token), failure detection (a dead or stuck rank fails the group with
an error naming it, within the collective timeout), expert-load reporting and rebalancing. Never on the step path:
the ranks step on their own. Used by the CLI directly and by the Serve ModelServer (cluster/replica.py).
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import threading

import ray
import torch
from ray.exceptions import RayActorError

from cluster.ep_worker import EPWorker, StepResult
from cluster.placement import group_placement, on_bundle, rank_bundle
from cluster.router import ExpertRouter, RouterConfig
from engine.engine import EngineConfig
from engine.sampling_params import SamplingParams
from engine.token_output import TokenOutput
from model.config import ModelConfig

logger = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 3.0          # a rank that does not answer a ping within this is stuck
_ids = itertools.count()


@dataclasses.dataclass(frozen=True, kw_only=True)
class EPConfig:
    ep_size: int = 1
    redundant_experts: int = 0
    placement_strategy: str = "PACK"          # PACK: one node when it fits (NVLink); SPREAD: across nodes
    device: str = "cpu"
    dtype: str = "float32"
    collective_timeout_s: float = 60.0
    rebalance_interval_steps: int = 1000      # 0: only on request
    window_steps: int = 1000                  # load statistics window of the router
    report_every_steps: int = 16              # expert counts batched into one router call
    experts: str = "auto"                     # slots held "dense", "packed" (MXFP4), or "auto": packed on CUDA

    def __post_init__(self):
        if self.ep_size < 1:
            raise ValueError(f"ep_size must be at least 1, got {self.ep_size}")
        if self.placement_strategy not in ("PACK", "SPREAD"):
            raise ValueError(f"placement_strategy must be PACK or SPREAD, got {self.placement_strategy!r}")
        if self.experts not in ("auto", "dense", "packed"):
            raise ValueError(f"experts must be auto, dense or packed, got {self.experts!r}")


class EPStepError(RuntimeError):
    """The EP group failed (a rank died, hung or raised); the message names the rank. The group must be rebuilt."""


class EPGroup:
    def __init__(self, model_dir: str, ep: EPConfig, engine: EngineConfig = EngineConfig(),
                 eos_token_ids: tuple[int, ...] = (), expert_metrics=None):
        cfg = ModelConfig.from_dir(model_dir)
        self.ep, self.model_config = ep, cfg
        self.num_steps = 0
        self.error: EPStepError | None = None
        self._inbox: queue.Queue = queue.Queue()               # (rank, [StepResult] | the error its stream raised)
        self._closed = False
        self._last_check = 0                                   # step of the last periodic rebalance check
        self.router = ray.remote(ExpertRouter).options(num_cpus=0).remote(RouterConfig(
            num_layers=cfg.num_hidden_layers, num_experts=cfg.num_local_experts, ep_size=ep.ep_size,
            num_redundant=ep.redundant_experts, window_steps=ep.window_steps,
            rebalance_interval_steps=ep.rebalance_interval_steps), None, expert_metrics)
        self.placement_version, self.placement = ray.get(self.router.placement.remote())
        pg, first = group_placement(ep.ep_size, ep.device, ep.placement_strategy)
        self._own_pg = pg if first == 0 else None
        worker = ray.remote(EPWorker)
        bundle = rank_bundle(ep.device)
        self.workers = [worker.options(scheduling_strategy=on_bundle(pg, first + r), num_cpus=bundle["CPU"],
                                       num_gpus=bundle.get("GPU", 0), max_concurrency=4)
                        .remote(r, ep.ep_size, str(model_dir), engine, ep.dtype, ep.device, tuple(eos_token_ids),
                                ep.experts)
                        for r in range(ep.ep_size)]
        self._lock = threading.Lock()
        self._rank_of: dict[str, int] = {}
        self._cost: dict[str, int] = {}
        self._n_left: dict[str, int] = {}                      # completions of the request still running
        self._load = [0] * ep.ep_size
        self._counts: dict[int, torch.Tensor] = {}             # step -> [L, E] summed over the ranks so far
        self._rank_step = [0] * ep.ep_size
        self._pending: list[tuple[int, torch.Tensor]] = []
        host, port = ray.get(self.workers[0].rendezvous_address.remote())
        infos = self._setup(host, port)
        self.max_model_len = min(i["max_model_len"] for i in infos)
        self.nodes = [i["node"] for i in infos]
        for rank, w in enumerate(self.workers):
            stream = w.results.options(num_returns="streaming").remote()
            threading.Thread(target=self._read, args=(rank, stream), name=f"ep-read-{rank}", daemon=True).start()
        logger.info("EP group ready: %d ranks on %s (rendezvous %s:%d, %s), max_model_len %d", ep.ep_size,
                    ", ".join(self.nodes), host, port, ep.placement_strategy, self.max_model_len)

    def _setup(self, host: str, port: int) -> list[dict]:
        """Every rank joins, loads and starts; a rank that fails is named with its own error, not a secondary one."""
        refs = [w.setup.remote(host, port, self.placement, self.ep.collective_timeout_s) for w in self.workers]
        infos, failures = [], []
        for rank, ref in enumerate(refs):
            try:
                infos.append(ray.get(ref))
            except RayActorError as e:
                failures.append(f"rank {rank} died during setup ({_short(e)})")
            except ray.exceptions.RayTaskError as e:
                failures.append(f"rank {rank} failed during setup: {_short(e.cause or e)}")
        if failures:
            self.shutdown()
            raise EPStepError("EP group setup failed: " + "; ".join(failures))
        return infos

    # ---- requests (any thread) ----
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> int:
        return self.add_requests([(request_id, prompt_token_ids, params)])[0]

    def add_requests(self, requests: list[tuple[str, list[int], SamplingParams]]) -> list[int]:
        """Queue requests on the ranks with the least outstanding work (tokens to prefill and to decode): one Ray
        call per rank that gets any. Returns each request's rank. A request a rank refuses comes back in a
        StepResult's `rejected`."""
        batches: dict[int, list[tuple]] = {}
        ranks = []
        with self._lock:
            for request_id, prompt, params in requests:
                rank = min(range(self.ep.ep_size), key=lambda r: (self._load[r], r))
                cost = len(prompt) + params.n * params.max_tokens
                self._rank_of[request_id], self._cost[request_id], self._n_left[request_id] = rank, cost, params.n
                self._load[rank] += cost
                batches.setdefault(rank, []).append(("add", request_id, prompt, params))
                ranks.append(rank)
        for rank, commands in batches.items():
            self.workers[rank].submit.remote(commands)
        return ranks

    def abort(self, request_id: str) -> None:
        """Abort on its rank (frees its KV blocks there); its final outputs come back in a StepResult."""
        with self._lock:
            rank = self._rank_of.get(request_id)
        if rank is not None:
            self.workers[rank].submit.remote([("abort", request_id)])

    # ---- results (one reader at a time) ----
    def results(self, timeout_s: float | None = None) -> list[StepResult]:
        """StepResults of every rank that arrived since the last call, waiting up to `timeout_s` for the first.
        Raises EPStepError (naming the failed rank) once any rank failed."""
        if self.error is not None:
            raise self.error
        try:
            items = [self._inbox.get(timeout=timeout_s)]
        except queue.Empty:
            return []
        while not self._inbox.empty():
            items.append(self._inbox.get_nowait())
        results = []
        for rank, item in items:
            if isinstance(item, BaseException):
                self.error = EPStepError(f"EP group failed at step {self.num_steps}: {self._diagnose(rank, item)}")
                logger.error("%s", self.error)
                raise self.error
            results.extend(item)
        for r in results:
            self._account(r)
        self._report_counts()
        return results

    def _read(self, rank: int, stream) -> None:
        try:
            for ref in stream:
                self._inbox.put((rank, ray.get(ref)))
            if not self._closed:
                raise EPStepError(f"rank {rank}'s result stream ended")
        except Exception as e:                    # noqa: BLE001  (handed to the reader of results())
            if not self._closed:
                self._inbox.put((rank, e))

    def _account(self, r: StepResult) -> None:
        self.num_steps = max(self.num_steps, r.step)
        with self._lock:
            for out in r.outputs:
                if out.finished and out.request_id in self._n_left:
                    self._n_left[out.request_id] -= 1
                    if self._n_left[out.request_id] == 0:
                        self._release(out.request_id)
            for request_id, _ in r.rejected:
                if request_id in self._rank_of:
                    self._release(request_id)
        if r.expert_counts is not None:
            self._counts[r.step] = self._counts.get(r.step, 0) + r.expert_counts
            self._rank_step[r.rank] = r.step

    def _report_counts(self) -> None:
        """Steps every rank has reported go to the router in order, batched; rebalance every interval."""
        done = min(self._rank_step)
        for step in sorted(s for s in self._counts if s <= done):
            self._pending.append((step, self._counts.pop(step)))
        if len(self._pending) >= self.ep.report_every_steps:
            self._flush_counts()
        interval = self.ep.rebalance_interval_steps
        if interval and done - self._last_check >= interval:
            self._last_check = done
            self._flush_counts()
            self._broadcast(ray.get(self.router.maybe_rebalance.remote(done)))

    def _release(self, request_id: str) -> None:
        rank = self._rank_of.pop(request_id)
        self._load[rank] -= self._cost.pop(request_id)
        self._n_left.pop(request_id, None)

    # ---- expert placement ----
    def rebalance(self) -> int:
        """Recompute the placement from the load window now and send it to the ranks (applied by all of them in
        the same step); returns the number of expert slots whose expert changes."""
        self._flush_counts()
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

    def _flush_counts(self) -> None:
        if self._pending:
            self.router.record_many.remote(self._pending)
            self._pending = []

    # ---- failures ----
    def _diagnose(self, rank: int, error: BaseException) -> str:
        """Which rank is at fault: ping every rank (a dead one raises, a stuck one does not answer), then add the
        error the reporting rank saw."""
        refs = [w.ping.remote() for w in self.workers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
        problems = []
        for r, ref in enumerate(refs):
            if ref not in ready:
                problems.append(f"rank {r} is stuck (no answer within {PROBE_TIMEOUT_S:.0f}s)")
                continue
            try:
                ray.get(ref)
            except Exception as e:          # noqa: BLE001
                problems.append(f"rank {r} died ({type(e).__name__})")
        if not any(p.startswith(f"rank {rank} ") for p in problems):
            problems.append(f"rank {rank} raised {_short(error)}")
        return "; ".join(problems)

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
        while len(final) < wanted:
            results = self.results(timeout_s=self.ep.collective_timeout_s + PROBE_TIMEOUT_S + 5)
            if not results:
                raise EPStepError(f"EP group produced nothing for {self.ep.collective_timeout_s:.0f}s+: "
                                  f"{self._diagnose(0, TimeoutError('no results'))}")
            for r in results:
                if r.rejected:
                    raise ValueError(r.rejected[0][1])
                final.update({(o.request_id, o.index): o for o in r.outputs if o.finished})
            if on_results is not None:
                on_results(self, results)
        return [[final[(rid, i)] for i in range(p.n)] for rid, p in zip(ids, params)]

    # ---- lifecycle ----
    def rank_stats(self) -> list[dict]:
        return ray.get([w.stats.remote() for w in self.workers], timeout=self.ep.collective_timeout_s + 5)

    def num_expert_params(self) -> list[int]:
        return ray.get([w.num_expert_params.remote() for w in self.workers])

    def shutdown(self) -> None:
        self._closed = True
        for actor in self.workers + [self.router]:
            ray.kill(actor)
        if self._own_pg is not None:
            ray.util.remove_placement_group(self._own_pg)


def _short(e: BaseException) -> str:
    """The last line of an error (a Ray task error carries the remote traceback before it), bounded."""
    lines = str(e).strip().splitlines()
    return (lines[-1] if lines else type(e).__name__)[:300]
