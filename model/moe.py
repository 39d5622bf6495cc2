"""The MoE block: gate (top-k router) and the expert backend seam (gpt-oss-spec.md §2.4).

Expert parallelism enters here and nowhere else: `MLP.experts` is any `ExpertBackend`; `LocalExperts` computes the
experts a process holds, an EP backend (cluster/) dispatches tokens to other ranks and combines their outputs.
Legend: T=tokens, H=hidden, E=experts (local), K=top-k, I=intermediate, P=T*K (token, expert) pairs, R=pairs held
here.
"""
from __future__ import annotations

import functools
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

    Pairs are grouped by expert (one sort). Without autograd, on a device and dtype `torch._grouped_mm` serves,
    all experts run in two grouped matmuls: a fixed number of ops per layer however many experts are hit.
    Otherwise (training, other devices, a subclass overriding `expert_forward`) the reference loop runs one
    `expert_forward` per hit expert. Both sum a token's K outputs in fp32, in expert order.
    Pairs routed to experts this process does not hold contribute nothing (an EP backend sends them elsewhere).
    """

    def __init__(self, config: ModelConfig, dtype: torch.dtype, num_experts: int | None = None,
                 first_expert: int = 0):
        super().__init__()
        E = config.num_local_experts if num_experts is None else num_experts
        H, I = config.hidden_size, config.intermediate_size
        self.first_expert = first_expert
        self.num_logical_experts = config.num_local_experts       # ids the gate can emit: [0, this)
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
        E, K = self.num_experts, expert_ids.shape[1]
        order, sorted_ids, counts = group_pairs(expert_ids, self.first_expert, E)          # [P], [P], [E]
        rows = order // K                                                                   # [P] token of pair
        if self.grouped_ok(t):                                                              # no host sync
            y = self._grouped(t.index_select(0, rows), sorted_ids.clamp(max=E - 1), counts)  # [P, H]
            if self.first_expert != 0 or E != self.num_logical_experts:                     # pairs not held -> 0
                y = torch.where((sorted_ids < E)[:, None], y, 0)
        else:
            groups = _groups(counts.tolist())
            held = sum(n for _, _, n in groups)
            order, rows = order[:held], rows[:held]                                         # [R] held pairs
            y = torch.cat([self.expert_forward(e, t[rows[s:s + n]]) for e, s, n in groups] or [t[:0]])  # [R, H]
        y = y.float().mul_(weights.flatten()[order].float()[:, None])                       # [R, H] fp32
        out = torch.zeros(t.shape, dtype=torch.float32, device=t.device)                    # [T, H]
        return out.index_add_(0, rows, y).to(t.dtype)

    def grouped_ok(self, t: torch.Tensor) -> bool:
        """Whether the grouped path may run: no autograd, the reference expert_forward, a supported layout."""
        if torch.is_grad_enabled() and (t.requires_grad or self.gate_up_proj.requires_grad):
            return False
        if type(self).expert_forward is not LocalExperts.expert_forward or t.dtype != self.down_proj.dtype:
            return False
        I = self.down_proj.shape[1]
        return grouped_mm_supported(t.device, t.dtype, (t.shape[1], 2 * I, I))

    def _grouped(self, x: torch.Tensor, expert_of_row: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [R, H] sorted by expert, counts [E] -> expert outputs [R, H] (down bias included, no weighting)."""
        offsets = counts.cumsum(0, dtype=torch.int32)                                       # [E] group ends
        gate_up = torch._grouped_mm(x, self.gate_up_proj, offs=offsets)                     # [R, 2I]
        h = swiglu(gate_up.add_(self.gate_up_proj_bias.index_select(0, expert_of_row)), self.alpha, self.limit)
        y = torch._grouped_mm(h, self.down_proj, offs=offsets)                              # [R, H]
        return y.add_(self.down_proj_bias.index_select(0, expert_of_row))


def group_pairs(expert_ids: torch.Tensor, first_expert: int, num_experts: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """expert_ids [T, K] (logical) -> (order [P]: pair indices grouped by local expert, stable; sorted local ids
    [P], pairs not held here = num_experts and last; counts [E] pairs per local expert). No host sync (counts by
    scatter_add: CUDA's bincount reads its input's range back to the host), so it can run inside a CUDA graph."""
    E = num_experts
    ids = (expert_ids - first_expert).flatten()                                         # [P] local ids
    ids = torch.where((ids >= 0) & (ids < E), ids, E)                                   # not held -> E
    order = torch.argsort(ids, stable=True)                                             # [P] grouped
    counts = torch.zeros(E + 1, dtype=torch.long, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))
    return order, ids[order], counts[:E]


def _groups(counts: list[int]) -> list[tuple[int, int, int]]:
    """(expert, first row, rows) of every expert with rows, for rows grouped by expert."""
    out, start = [], 0
    for e, n in enumerate(counts):
        if n:
            out.append((e, start, n))
            start += n
    return out


@functools.lru_cache(maxsize=None)
def grouped_mm_supported(device: torch.device, dtype: torch.dtype, dims: tuple[int, ...]) -> bool:
    """`torch._grouped_mm` serves this device and dtype (probed once), and rows of every width in `dims` are
    16-byte aligned as it requires. Its CPU kernel takes fp32/bf16/fp16; CUDA's wants bf16 on recent GPUs."""
    size = torch.empty((), dtype=dtype).element_size()
    if not hasattr(torch, "_grouped_mm") or any(d * size % 16 for d in dims):
        return False
    try:
        w = torch.ones(2, 16, 16, dtype=dtype, device=device)
        y = torch._grouped_mm(torch.ones(3, 16, dtype=dtype, device=device), w,
                              offs=torch.tensor([1, 3], dtype=torch.int32, device=device))
        return bool((y == 16).all())
    except (RuntimeError, NotImplementedError):
        return False


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
