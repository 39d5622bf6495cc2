"""EPStats: what every MoE layer of one rank records, shared by the layers: tokens routed per (layer, logical
expert), collective calls and time, and the step's agreed dispatch rows (EPStep).

Counting a CUDA graph's forward must wait until after its replay, which alone knows how many of the graph's rows are
real: while a graph is captured the layers keep that graph's (static) expert-ids tensor, which each replay rewrites,
and `count` adds its real rows afterwards. Eager forwards are counted by the layer (`record`) or after the step
(`count`), as the backend says. All counting is device ops (no host sync).
Legend: L=layers, E=logical experts, T=rows a forward saw, K=top-k.
"""
from __future__ import annotations

import time

import torch

from cluster.ep_step import EPStep


class EPStats:
    """Collective time covers the dispatch and combine collectives only, not the expert MLP between them. On CUDA
    they run asynchronously, so they are timed with CUDA events on the stream (no host sync on the step path), read
    in `take` after the step, whose sampled-token read-back has already waited for them; on CPU with the host clock.
    `barrier_timing` (benchmarks): a barrier before each timed collective, so its time is the transfer, not the
    wait for a slower peer."""

    def __init__(self, num_layers: int, num_experts: int, device: torch.device | str):
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.long, device=device)  # [L, E]
        self.all_to_all_s = 0.0
        self.collectives = 0                    # collective calls inside MoE layers, ever (instrumentation)
        self.barrier_timing = False
        self.step = EPStep()
        self._events: list = []                 # CUDA: (start, end) event pairs of this step
        self._graph_ids: dict[tuple[int, int], torch.Tensor] = {}  # (layer, graph rows) -> its ids [T, K]
        self._eager_ids: dict[int, torch.Tensor] = {}              # layer -> the last eager forward's [T, K]

    @staticmethod
    def mark(device: torch.device):
        """A point in time on `device`'s stream: a recorded CUDA event, or perf_counter on CPU."""
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def add(self, start, end) -> None:
        if isinstance(start, float):
            self.all_to_all_s += end - start
        else:
            self._events.append((start, end))

    def take(self) -> tuple[torch.Tensor, float]:
        for start, end in self._events:
            end.synchronize()                   # long done: the step's outputs were read back after it
            self.all_to_all_s += start.elapsed_time(end) / 1e3
        counts, seconds = self.counts.clone(), self.all_to_all_s
        self.counts.zero_()
        self.all_to_all_s, self._events = 0.0, []
        return counts, seconds

    # ---- routed tokens ----
    def keep(self, layer: int, expert_ids: torch.Tensor, captured: bool) -> None:
        """Remember a forward's routing for `count`: a captured graph's ids stay that graph's own."""
        if captured:
            self._graph_ids[(layer, expert_ids.shape[0])] = expert_ids
        else:
            self._eager_ids[layer] = expert_ids

    def record(self, layer: int, expert_ids: torch.Tensor, captured: bool) -> None:
        """Count an eager forward's routing now (every row real), or keep a captured graph's for `count`."""
        if captured:
            self.keep(layer, expert_ids, captured)
        else:
            self._add(layer, expert_ids)

    def count(self, layer: int, forward_rows: int, real_rows: int, graphed: bool, eager: bool = True) -> None:
        """Add the first `real_rows` of the step's forward in `layer` (a replayed graph of `forward_rows` rows, or,
        when `eager`, the last eager forward)."""
        ids = self._graph_ids.get((layer, forward_rows)) if graphed else self._eager_ids.get(layer) if eager else None
        if ids is not None and real_rows:
            self._add(layer, ids[:real_rows])

    def _add(self, layer: int, expert_ids: torch.Tensor) -> None:
        flat = expert_ids.flatten()                                                      # [T * K]
        self.counts[layer].scatter_add_(0, flat, torch.ones_like(flat))


def capturing() -> bool:
    """Whether the current CUDA stream is being captured into a graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
