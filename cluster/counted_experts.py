"""CountedExperts: the expert backend of a rank that holds every expert (ep_size 1): the process's own backend
(packed MXFP4 with the fused kernel, or dense grouped GEMM) with no collectives, so decode steps can run as CUDA
graphs, plus the token counts per expert that the router and the metrics need from every rank.

Counting happens after the step, not inside the forward: a CUDA graph replays its forward over padded rows, and
counting there would count the padding. The forward keeps the expert ids it routed (per number of rows, one tensor
per captured graph size); `count` adds those of the step's real rows with device ops (no host sync).
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
        self._ids: dict[int, torch.Tensor] = {}             # rows the forward saw -> expert ids [T, K]

    def forward(self, t: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        self._ids[expert_ids.shape[0]] = expert_ids
        return self.inner(t, expert_ids, weights)

    def count(self, forward_rows: int, real_rows: int) -> None:
        """Add the routing of the first `real_rows` of the last forward over `forward_rows` rows to the stats."""
        ids = self._ids.get(forward_rows)
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
