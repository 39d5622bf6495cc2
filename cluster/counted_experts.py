"""CountedExperts: the expert backend of a rank that holds every expert (ep_size 1): the process's own backend
(packed MXFP4 with the fused kernel, or dense grouped GEMM) with no collectives, so decode steps can run as CUDA
graphs, plus the token counts per expert that the router and the metrics need from every rank.

Counting happens after the step, not inside the forward: a CUDA graph replays its forward over padded rows, and
counting there would count the padding. The forward keeps the expert ids it routed: while a graph is captured, that
graph's (static) ids tensor per size, which each replay rewrites; otherwise the last eager forward's. `count` adds
the ids of the step's real rows with device ops (no host sync).
Legend: T=rows the forward saw, K=top-k, E=experts.
"""
from __future__ import annotations

import torch
from torch import nn

from cluster.ep_experts import EPStats


class CountedExperts(nn.Module):
    def __init__(self, inner: nn.Module, layer_idx: int, stats: EPStats):
        super().__init__()
        self.inner, self.layer_idx, self.stats = inner, layer_idx, stats
        self._graph_ids: dict[int, torch.Tensor] = {}       # captured graph size -> its expert ids [S, K]
        self._eager_ids: torch.Tensor | None = None         # the last eager forward's [T, K]

    def forward(self, t: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if capturing():
            self._graph_ids[expert_ids.shape[0]] = expert_ids
        else:
            self._eager_ids = expert_ids
        return self.inner(t, expert_ids, weights)

    def count(self, forward_rows: int, real_rows: int, graphed: bool) -> None:
        """Add the routing of the first `real_rows` of the step's forward (a replayed graph of `forward_rows` rows,
        or the last eager forward) to the stats."""
        ids = self._graph_ids.get(forward_rows) if graphed else self._eager_ids
        if ids is None or real_rows == 0:
            return
        flat = ids[:real_rows].flatten()                                                       # [real * K]
        self.stats.counts[self.layer_idx].scatter_add_(0, flat, torch.ones_like(flat))

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


def capturing() -> bool:
    """Whether the current CUDA stream is being captured into a graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
