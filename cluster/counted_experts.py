"""CountedExperts: the expert backend of a rank that holds every expert (ep_size 1): the process's own backend
(packed MXFP4 with the fused kernel, or dense grouped GEMM) with no collectives, so decode steps can run as CUDA
graphs, plus the token counts per expert that the router and the metrics need from every rank.

Counting happens after the step, not inside the forward: a CUDA graph replays its forward over padded rows, and
counting there would count the padding. The forward keeps the expert ids it routed in the stats (EPStats.keep: a
captured graph's own ids, or the last eager forward's); `count` adds the step's real rows (no host sync).
"""
from __future__ import annotations

import torch
from torch import nn

from cluster.ep_stats import EPStats, capturing


class CountedExperts(nn.Module):
    def __init__(self, inner: nn.Module, layer_idx: int, stats: EPStats):
        super().__init__()
        self.inner, self.layer_idx, self.stats = inner, layer_idx, stats

    def forward(self, t: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        self.stats.keep(self.layer_idx, expert_ids, capturing())
        return self.inner(t, expert_ids, weights)

    def count(self, forward_rows: int, real_rows: int, graphed: bool) -> None:
        """Add the routing of the first `real_rows` of the step's forward (a replayed graph of `forward_rows` rows,
        or the last eager forward) to the stats."""
        self.stats.count(self.layer_idx, forward_rows, real_rows, graphed)

    @torch.no_grad()
    def load_from(self, checkpoint, dtype: torch.dtype) -> None:
        """Fill the inner backend: its own `load_from` (packed), else every expert's unquantised tensors (dense)."""
        if hasattr(self.inner, "load_from"):
            self.inner.load_from(checkpoint, dtype)
            return
        E = self.inner.num_experts
        for key, value in checkpoint.experts(self.layer_idx, 0, E, dtype).items():
            getattr(self.inner, key).copy_(value)

    def slot_experts(self) -> list[int]:
        return list(range(self.inner.num_experts))

