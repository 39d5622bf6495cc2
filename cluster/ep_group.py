"""EPGroup: one model replica = `ep_size` EPWorker actors in lockstep plus its ExpertRouter actor.

Owns request -> rank assignment (data-parallel attention: each request lives on one rank), the lockstep step
(one Ray call per rank per step; the per-layer token traffic never touches Ray), failure detection (a dead or
stuck rank fails the step with an error naming it, within the collective timeout), and applying the router's
placements between steps. Used by the CLI directly and by the Serve ModelServer.
"""
from __future__ import annotations

import dataclasses
import logging

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError

from cluster.ep_worker import EPWorker, StepResult
from cluster.placement import group_placement, on_bundle, rank_bundle
from cluster.router import ExpertRouter, RouterConfig
from engine.engine import EngineConfig
from engine.sampling_params import SamplingParams
from engine.token_output import TokenOutput
from model.config import ModelConfig

logger = logging.getLogger(__name__)


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
    """A step of the EP group failed (a rank died, hung or raised); the group must be rebuilt."""


class EPGroup:
    def __init__(self, model_dir: str, ep: EPConfig, engine: EngineConfig = EngineConfig(),
                 eos_token_ids: tuple[int, ...] = (), expert_metrics=None):
        cfg = ModelConfig.from_dir(model_dir)
        self.ep, self.model_config = ep, cfg
        self.router = ray.remote(ExpertRouter).options(num_cpus=0).remote(RouterConfig(
            num_layers=cfg.num_hidden_layers, num_experts=cfg.num_local_experts, ep_size=ep.ep_size,
            num_redundant=ep.redundant_experts, window_steps=ep.window_steps,
            rebalance_interval_steps=ep.rebalance_interval_steps), None, expert_metrics)
        self.placement_version, placement = ray.get(self.router.placement.remote())
        pg, first = group_placement(ep.ep_size, ep.device, ep.placement_strategy)
        self._own_pg = pg if first == 0 else None
        worker = ray.remote(EPWorker)
        bundle = rank_bundle(ep.device)
        self.workers = [worker.options(scheduling_strategy=on_bundle(pg, first + r), num_cpus=bundle["CPU"],
                                       num_gpus=bundle.get("GPU", 0))
                        .remote(r, ep.ep_size, str(model_dir), engine, ep.dtype, ep.device, tuple(eos_token_ids),
                                ep.experts)
                        for r in range(ep.ep_size)]
        host, port = ray.get(self.workers[0].rendezvous_address.remote())
        self._call("setup", [(host, port, placement, ep.collective_timeout_s)] * ep.ep_size)
        self.num_steps = 0
        self._rank_of: dict[str, int] = {}
        self._cost: dict[str, int] = {}
        self._n_left: dict[str, int] = {}                      # completions of the request still running
        self._load = [0] * ep.ep_size
        self._pending: list[tuple[int, torch.Tensor]] = []
        self.last_results: list[StepResult] = []
        logger.info("EP group ready: %d ranks on %s:%d, %s", ep.ep_size, host, port, ep.placement_strategy)

    # ---- requests ----
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Assign the request to the rank with the least outstanding work (tokens to prefill and to decode)."""
        rank = min(range(self.ep.ep_size), key=lambda r: (self._load[r], r))
        ray.get(self.workers[rank].add_request.remote(request_id, prompt_token_ids, params))
        cost = len(prompt_token_ids) + params.n * params.max_tokens
        self._rank_of[request_id], self._cost[request_id], self._n_left[request_id] = rank, cost, params.n
        self._load[rank] += cost
        return rank

    def abort(self, request_id: str) -> list[TokenOutput]:
        if request_id not in self._rank_of:
            return []
        outputs = ray.get(self.workers[self._rank_of[request_id]].abort.remote(request_id))
        self._release(request_id)
        return outputs

    def has_unfinished(self) -> bool:
        return bool(self._rank_of)

    # ---- lockstep ----
    def step(self) -> list[TokenOutput]:
        """One forward on every rank at once; raises EPStepError naming the failed rank(s)."""
        results: list[StepResult] = self._call("step")
        self.num_steps += 1
        self.last_results = results
        outputs = [out for r in results for out in r.outputs]
        for out in outputs:
            if out.finished and out.request_id in self._n_left:
                self._n_left[out.request_id] -= 1
                if self._n_left[out.request_id] == 0:
                    self._release(out.request_id)
        self._pending.append((self.num_steps, sum(r.expert_counts for r in results)))
        if len(self._pending) >= self.ep.report_every_steps:
            self._flush_counts()
        if self.ep.rebalance_interval_steps and self.num_steps % self.ep.rebalance_interval_steps == 0:
            self._flush_counts()
            self._apply(ray.get(self.router.maybe_rebalance.remote(self.num_steps)))
        return outputs

    def rebalance(self) -> int:
        """Recompute the placement from the load window now and apply it; returns expert slots moved."""
        self._flush_counts()
        return self._apply(ray.get(self.router.rebalance.remote()))

    def _apply(self, placement) -> int:
        if placement is None:
            return 0
        moved = sum(self._call("apply_placement", [(placement,)] * self.ep.ep_size))
        self.placement_version = ray.get(self.router.placement.remote())[0]
        logger.info("applied expert placement v%d: %d slots reloaded", self.placement_version, moved)
        return moved

    def _flush_counts(self) -> None:
        if self._pending:
            self.router.record_many.remote(self._pending)
            self._pending = []

    def _release(self, request_id: str) -> None:
        rank = self._rank_of.pop(request_id)
        self._load[rank] -= self._cost.pop(request_id)
        self._n_left.pop(request_id, None)

    # ---- calls to every rank ----
    def _call(self, method: str, args: list[tuple] | None = None) -> list:
        refs = [getattr(w, method).remote(*(args[r] if args else ())) for r, w in enumerate(self.workers)]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.ep.collective_timeout_s + 5)
        dead, failed, results = [], [], []
        for rank, ref in enumerate(refs):
            if ref not in ready:
                failed.append(f"rank {rank} did not answer within {self.ep.collective_timeout_s + 5:.0f}s")
                continue
            try:
                results.append(ray.get(ref))
            except RayActorError as e:
                dead.append(f"rank {rank} died ({type(e).__name__})")
            except (ray.exceptions.RayTaskError, GetTimeoutError) as e:
                failed.append(f"rank {rank} raised {str(e).strip().splitlines()[-1][:200]}")
        if dead or failed:
            raise EPStepError(f"EP group {method} {self.num_steps + 1} failed: " + "; ".join(dead + failed))
        return results

    # ---- lifecycle ----
    def rank_stats(self) -> list[dict]:
        return ray.get([w.stats.remote() for w in self.workers], timeout=self.ep.collective_timeout_s + 5)

    def num_expert_params(self) -> list[int]:
        return ray.get([w.num_expert_params.remote() for w in self.workers])

    def shutdown(self) -> None:
        for actor in self.workers + [self.router]:
            ray.kill(actor)
        if self._own_pg is not None:
            ray.util.remove_placement_group(self._own_pg)
