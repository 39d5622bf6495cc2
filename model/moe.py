"""The MoE block: gate (top-k router) and the expert backend seam (gpt-oss-spec.md §2.4).

Expert parallelism enters here and nowhere else: `MLP.experts` is any `ExpertBackend`; `LocalExperts` computes the
experts a process holds, an EP backend (cluster/) dispatches tokens to other ranks and combines their outputs.
Legend: T=tokens, H=hidden, E=experts (local), K=top-k, I=intermediate, P=T*K (token, expert) pairs.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from model.config import ModelConfig


def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, K] fp32, expert_ids [T, K]).

    Top-k on the raw logits (sorted descending), then a softmax over the K selected logits only.
    """
    vals, ids = torch.topk(router_logits, top_k, dim=-1)                                  # [T, K]
    return torch.softmax(vals.float(), dim=-1), ids


def swiglu(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gate_up [P, 2I] with gate/up INTERLEAVED (even columns gate, odd up) -> [P, I].

    gate clamped from above only, up clamped both sides, and the "+1" on the linear branch.
    """
    gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (up + 1)


class ExpertBackend(Protocol):
    def __call__(self, t: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """t [T, H], expert_ids [T, K] (logical ids), weights [T, K] -> sum_k weights * expert(t) [T, H]."""
        ...


class LocalExperts(nn.Module):
    """Experts [first_expert, first_expert + num_experts) held by this process, weights "in x out" as in HF's
    unquantised layout (spec §3.3): gate_up_proj [E, H, 2I], down_proj [E, I, H], biases [E, 2I] / [E, H].

    Reference path: tokens grouped by expert (one sort), one matmul per expert that received tokens.
    Pairs routed to experts this process does not hold contribute nothing (an EP backend sends them elsewhere).
    """

    def __init__(self, config: ModelConfig, dtype: torch.dtype, num_experts: int | None = None,
                 first_expert: int = 0):
        super().__init__()
        E = config.num_local_experts if num_experts is None else num_experts
        H, I = config.hidden_size, config.intermediate_size
        self.first_expert = first_expert
        self.alpha, self.limit = config.swiglu_alpha, config.swiglu_limit
        self.gate_up_proj = nn.Parameter(torch.empty(E, H, 2 * I, dtype=dtype))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(E, 2 * I, dtype=dtype))
        self.down_proj = nn.Parameter(torch.empty(E, I, H, dtype=dtype))
        self.down_proj_bias = nn.Parameter(torch.empty(E, H, dtype=dtype))

    @property
    def num_experts(self) -> int:
        return self.gate_up_proj.shape[0]

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Local expert e on x [n, H] -> [n, H] (down bias included)."""
        h = swiglu(x @ self.gate_up_proj[e] + self.gate_up_proj_bias[e], self.alpha, self.limit)  # [n, I]
        return h @ self.down_proj[e] + self.down_proj_bias[e]

    def forward(self, t: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        T, K = expert_ids.shape
        local = (expert_ids - self.first_expert).flatten()                                  # [P]
        held = (local >= 0) & (local < self.num_experts)
        order = torch.argsort(torch.where(held, local, self.num_experts), stable=True)      # [P] grouped
        counts = torch.bincount(local[held], minlength=self.num_experts).tolist()
        out = torch.zeros(T, t.shape[1], dtype=torch.float32, device=t.device)              # [T, H]
        start = 0
        for e, n in enumerate(counts):
            if n:
                pairs = order[start:start + n]
                y = self.expert_forward(e, t[pairs // K])                                   # [n, H]
                out.index_add_(0, pairs // K, y.float() * weights.flatten()[pairs, None])
                start += n
        return out.to(t.dtype)


class MLP(nn.Module):
    """HF names: `mlp.router` (the gate: a linear with bias over H -> E) and `mlp.experts`."""

    def __init__(self, config: ModelConfig, experts: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.router = nn.Linear(config.hidden_size, config.num_local_experts, bias=True, dtype=dtype)
        self.experts = experts

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        weights, expert_ids = route(self.router(t), self.top_k)                             # [T, K]
        return self.experts(t, expert_ids, weights)
