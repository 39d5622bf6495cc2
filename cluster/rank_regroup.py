"""RankRegroup: the part of an EP rank (EPWorker) that re-forms its process group: after a peer was lost (the loop
parked on the failed step), or to let a replacement join (the loop parked at a step every rank agreed on). Drops
the old group, joins the new one as its new rank, fits its expert slots to the new placement (cluster/expert_slots.py)
and resumes the loop. The engine's sequences and KV cache are untouched: a step that failed runs again.
"""
from __future__ import annotations

import time

import torch

from cluster.expert_slots import refit
from cluster.process_group import abort_ep_group, control_group, destroy_ep_group, init_ep_group
from model.checkpoint import Checkpoint


class RankRegroup:
    """Mixed into EPWorker: uses its rank, ep_size, model, experts, engine, loop, stats and backend."""

    def _fit_experts(self, placement) -> int:
        """Hold this rank's slots under `placement` (cluster/expert_slots.py); returns the slots read from disk."""
        ckpt, loaded = Checkpoint(self.model_dir), 0
        for i, layer in enumerate(self.model.model.layers):
            layer.mlp.experts, n = refit(layer.mlp.experts, placement, self.rank, self.ep_size, ckpt, self.dtype,
                                         lambda: self._new_experts(i, placement))
            self.experts[i] = layer.mlp.experts
            loaded += n
        self.placement = placement
        return loaded

    def _new_experts(self, layer: int, placement):
        with torch.device(self.device):
            return self._make_experts(layer, placement).eval().requires_grad_(False)

    def parked_step(self, timeout_s: float) -> int:
        """Wait until the loop is parked (after a failed step, or at an agreed park); returns its step count. Raises
        TimeoutError when it does not park in time (its loop is stuck)."""
        if not self.loop.parked.wait(timeout_s):
            raise TimeoutError(f"rank {self.rank} did not park within {timeout_s:.0f}s")
        return self.num_steps

    def regroup(self, rank: int, ep_size: int, master_addr: str, master_port: int, placement, version: int,
                epoch: int, step: int) -> dict:
        """Join the re-formed group as `rank` of `ep_size` (the loop is parked), hold the slots `placement` gives
        this rank, and resume stepping at step `step` of `epoch`. Sequences and their KV stay as they were: a step
        that failed simply runs again in the new group."""
        with self._regroup_lock:           # one at a time: a regroup that failed may still wait in its rendezvous
            return self._regroup(rank, ep_size, master_addr, master_port, placement, version, epoch, step)

    def _regroup(self, rank, ep_size, master_addr, master_port, placement, version, epoch, step) -> dict:
        self.parked_step(self.timeout_s)
        start = time.perf_counter()
        destroy_ep_group()
        init_ep_group(rank, ep_size, master_addr, master_port, self.backend, self.timeout_s)
        self.rank, self.ep_size, self.epoch, self.num_steps = rank, ep_size, epoch, step
        loaded = self._fit_experts(placement.to(self.device))
        self.stats.take()                                 # counts of a failed step were never reported
        self._aborted = False
        control = control_group(self.backend, self.timeout_s)
        if self.stats.step.attached:                      # the runner agrees each step's rows on the control group
            self.stats.step.group = control
        if self.device.type == "cuda" and self.engine_config.cuda_graphs:
            self.engine.runner.capture_graphs()           # graphs keep the old communicator and ep size: recapture
        self.loop.resume(rank, ep_size, control, epoch, version)
        return {"loaded": loaded, "regroup_s": time.perf_counter() - start}

    def abort_collectives(self) -> None:
        """NCCL: abort the communicators under a step blocked on a dead peer (its collectives then fail instead of
        hanging; the step's tokens are discarded). Gloo needs none: a dead peer's closed sockets fail the step."""
        if self.backend == "nccl" and not self.loop.parked.is_set():
            self._aborted = True
            abort_ep_group()


def guard_commit(scheduler, aborted) -> None:
    """NCCL: make `scheduler.update` (the step's commit: tokens appended, KV progress advanced) raise while
    `aborted()`, so a step whose collectives were aborted under it (returning garbage) changes no sequence."""
    update = scheduler.update

    def guarded(batch, sampled_token_ids):
        if aborted():
            raise RuntimeError("the EP group was aborted during this step: its tokens are discarded")
        return update(batch, sampled_token_ids)
    scheduler.update = guarded
