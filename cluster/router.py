"""The expert router: one model replica's owner of the expert placement and of the expert-load statistics.

Holds the current ExpertPlacement and its version, a sliding window of per-step expert token counts, and decides when
to rebalance (EPLB). A plain class run as a Ray actor with `ray.remote(ExpertRouter)`: never on the per-layer path,
never touches weights. Legend: L=MoE layers, E=logical experts.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import torch

from cluster.expert_placement import ExpertPlacement, num_physical_slots, rebalance
from cluster.survivor_placement import survivor_placement

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouterConfig:
    """What the router needs to know about one replica's EP layout and how eagerly to rebalance."""

    num_layers: int                       # MoE layers (every gpt-oss layer has one)
    num_experts: int                      # logical experts per layer (`num_local_experts`)
    ep_size: int                          # ranks in the EP group
    num_redundant: int                    # extra slots for replicas of hot experts (rounding may add more)
    window_steps: int = 1000              # vLLM's EPLB window: long enough to average out batch noise
    rebalance_interval_steps: int = 1000  # SGLang's default (vLLM: 3000); 0 = only on request

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_experts", "ep_size", "window_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_redundant < 0:
            raise ValueError(f"num_redundant must be >= 0 (extra expert slots), got {self.num_redundant}")
        if self.rebalance_interval_steps < 0:
            raise ValueError(f"rebalance_interval_steps must be >= 0 (0 = never automatically), "
                             f"got {self.rebalance_interval_steps}")

    @property
    def num_slots(self) -> int:
        """Physical slots per layer, the same on every rank (see num_physical_slots)."""
        return num_physical_slots(self.num_experts, self.ep_size, self.num_redundant)


class ExpertRouter:
    """Owns one replica's placement (versioned: +1 on each new map) and the sliding window of expert loads.

    The replica sums each step's per-expert token counts over its ranks and calls `record`/`record_many` (one actor
    call for several steps); between steps it asks `placement_if_newer` and applies a new map before the next step.
    When the group loses ranks the map follows it (`shrink`: over the survivors, maybe more slots per rank); a
    replacement brings it back to the configured size (`full_placement`, then `adopt`). The load window survives both.
    Arguments and results are tensors, lists, ints or ExpertPlacement (all picklable, all CPU).
    """

    def __init__(self, config: RouterConfig, placement: ExpertPlacement | None = None, metrics=None):
        self.config = config
        self.metrics = metrics          # monitoring.recorders.ExpertMetrics, or None
        c = config
        self._placement = placement if placement is not None else \
            ExpertPlacement.initial(c.num_layers, c.num_experts, c.ep_size, c.num_redundant)
        got = (self._placement.ep_size, self._placement.num_layers, self._placement.num_experts,
               self._placement.num_slots)
        if got != (c.ep_size, c.num_layers, c.num_experts, c.num_slots):
            raise ValueError(f"placement (ep_size, L, E, P) = {got} does not match the config "
                             f"{(c.ep_size, c.num_layers, c.num_experts, c.num_slots)}")
        self._placement = self._placement.to("cpu")
        self._version = 0
        self._window: deque[tuple[int, torch.Tensor]] = deque()    # (step, counts [L, E]), oldest first
        self._window_sum = torch.zeros(c.num_layers, c.num_experts, dtype=torch.int64)   # [L, E]
        self._last_step = -1
        self._steps_seen = 0
        self._last_check_step = 0
        self._num_rebalances = 0
        self._last_moves = 0

    def placement(self) -> tuple[int, ExpertPlacement]:
        """(version, current map)."""
        return self._version, self._placement

    def placement_if_newer(self, version: int) -> tuple[int, ExpertPlacement] | None:
        """(version, map) when the map changed since `version`, else None (a cheap per-step poll)."""
        return None if version == self._version else (self._version, self._placement)

    def record(self, step: int, counts: torch.Tensor | list) -> None:
        """Add token counts per (layer, logical expert) [L, E], summed over ranks, of `step` (or of several steps
        ending at `step`). Steps must not go backwards; entries older than window_steps drop out."""
        counts = torch.as_tensor(counts).cpu()
        L, E = self.config.num_layers, self.config.num_experts
        if counts.shape != (L, E) or counts.is_floating_point() or bool((counts < 0).any()):
            raise ValueError(f"counts must be non-negative integer token counts of shape [{L}, {E}], "
                             f"got {counts.dtype} {tuple(counts.shape)}")
        if step < self._last_step:
            raise ValueError(f"step {step} is older than the last recorded step {self._last_step}; "
                             "record steps in order")
        if step > self._last_step:
            self._steps_seen += 1
            self._last_step = step
        counts = counts.to(torch.int64)
        self._window.append((step, counts))
        self._window_sum += counts
        while self._window and self._window[0][0] <= step - self.config.window_steps:
            self._window_sum -= self._window.popleft()[1]

    def record_many(self, records: list[tuple[int, torch.Tensor | list]]) -> None:
        """`record` for each (step, counts [L, E]) in order: one actor call for a batch of steps."""
        for step, counts in records:
            self.record(step, counts)
        if self.metrics is not None and records:
            self.metrics.observe_counts(sum(torch.as_tensor(c) for _, c in records))
            self.metrics.observe({"balancedness": self.balancedness(), "rebalances": self._num_rebalances})

    def maybe_rebalance(self, step: int) -> ExpertPlacement | None:
        """Every rebalance_interval_steps steps (0 = never), when the window has data: rebalance and return the new
        map if it differs from the current one, else None."""
        interval = self.config.rebalance_interval_steps
        if interval == 0 or step - self._last_check_step < interval or not bool(self._window_sum.any()):
            return None
        self._last_check_step = step
        return self._adopt(self._proposal())

    def shrink(self, survivors: list[int]) -> tuple[int, ExpertPlacement]:
        """The group lost ranks: adopt a map over `survivors` (old rank ids in their new order) that covers every
        expert (cluster/survivor_placement.py); returns (version, map)."""
        return self.adopt(survivor_placement(self._placement, survivors))

    def full_placement(self) -> ExpertPlacement:
        """A fresh EPLB map at the configured size (ep_size, slots) from the load window (the initial map when the
        window is empty); not adopted: the group adopts it when every rank has joined."""
        c = self.config
        if not bool(self._window_sum.any()):
            return ExpertPlacement.initial(c.num_layers, c.num_experts, c.ep_size, c.num_redundant)
        return rebalance(self._window_sum, c.ep_size, c.num_slots)

    def adopt(self, placement: ExpertPlacement) -> tuple[int, ExpertPlacement]:
        """Make `placement` current, whatever its layout (the group changed size); returns (version, map)."""
        placement = placement.to("cpu")
        if (placement.num_layers, placement.num_experts) != (self.config.num_layers, self.config.num_experts):
            raise ValueError(f"placement of {placement.num_layers} layers x {placement.num_experts} experts, the "
                             f"model has {self.config.num_layers} x {self.config.num_experts}")
        self._placement, self._version = placement, self._version + 1
        logger.info("expert placement v%d: %d ranks x %d slots", self._version, placement.ep_size,
                    placement.slots_per_rank)
        return self._version, self._placement

    def rebalance(self) -> ExpertPlacement:
        """Rebalance now from the window (on request) and return the current map, new or unchanged."""
        if not bool(self._window_sum.any()):
            logger.info("rebalance requested with no recorded load: keeping placement version %d", self._version)
            return self._placement
        self._adopt(self._proposal())
        return self._placement

    def balancedness(self) -> list[float]:
        """Mean rank load / max rank load per layer over the window, under the current map (1.0 = perfect)."""
        return self._placement.balancedness(self._window_sum).tolist()

    def stats(self) -> dict:
        """Picklable snapshot for metrics: window token counts [L][E], balancedness [L], counters."""
        return {"version": self._version, "steps_seen": self._steps_seen, "last_step": self._last_step,
                "window_records": len(self._window), "window_tokens": self._window_sum.tolist(),
                "balancedness": self.balancedness(), "rebalances": self._num_rebalances,
                "last_moves": self._last_moves}

    def _proposal(self) -> ExpertPlacement:
        p = self._placement                                        # its layout: smaller after a lost rank
        return rebalance(self._window_sum, p.ep_size, p.num_slots, previous=p)

    def _adopt(self, new: ExpertPlacement) -> ExpertPlacement | None:
        """Make `new` current (version + 1) unless it equals the current map."""
        if new == self._placement:
            return None
        before, after = self.balancedness(), new.balancedness(self._window_sum).tolist()
        self._last_moves = self._placement.moves(new)
        self._placement, self._version = new, self._version + 1
        self._num_rebalances += 1
        logger.info("expert placement v%d: %d slot moves, mean balancedness %.3f -> %.3f", self._version,
                    self._last_moves, sum(before) / len(before), sum(after) / len(after))
        return new
