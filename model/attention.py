"""Attention of gpt-oss: q/k/v/o projections with biases, RoPE, GQA, per-head sinks, sliding window.

The math lives in `sink_attention_heads`; where keys come from (a dense prefix, a paged KV cache) is decided by the
`AttentionMetadata` passed explicitly to every forward (STYLE.md: no global context).
Legend: N=sequences, T=query tokens, S=key tokens, n=query heads, k=KV heads, g=query heads per KV head, D=head_dim.
"""
from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F

from model.config import ModelConfig
from model.layers import apply_rotary


def sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                   allowed: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """q [..., T, n, D], k/v [..., S, k, D], sinks [n], allowed [..., T, S] bool -> o [..., T, n, D] in q's dtype.

    Leading dims (...) are a batch of independent sequences (N of them); `allowed` may broadcast over them.
    A layout wrapper around `sink_attention_heads`, where the math lives.
    """
    *batch, T, n, D = q.shape
    S, kv_heads = k.shape[-3], k.shape[-2]
    N = math.prod(batch)
    qh = q.reshape(N, T, kv_heads, n // kv_heads, D).permute(2, 0, 3, 1, 4)                 # [k, N, g, T, D]
    kh, vh = (x.reshape(N, S, kv_heads, D).permute(2, 0, 1, 3) for x in (k, v))           # [k, N, S, D]
    bias = mask_bias(allowed.expand(*batch, T, S).reshape(N, T, S))
    o = sink_attention_heads(qh, kh, vh, sinks, bias, sm_scale)                             # [k, N, g, T, D]
    return o.permute(1, 3, 0, 2, 4).reshape(*batch, T, n, D)


def mask_bias(allowed: torch.Tensor) -> torch.Tensor:
    """allowed bool [...] -> additive fp32 mask [...]: 0 where allowed, -inf elsewhere."""
    return torch.zeros(allowed.shape, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def sink_attention_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                         bias: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """q [k, N, g, T, D], k/v [k, N, S, D], sinks [n], bias [N, T, S] fp32 (0 allowed, -inf not) -> o [k, N, g, T, D].

    KV-head-major: one small matmul per (KV head, sequence) over keys contiguous in [S, D]; query head
    h = kv_head * g + j. Each row's softmax runs over its allowed keys plus one sink logit per head (not scaled by
    sm_scale, no value vector), so the weights sum to less than 1 (gpt-oss-spec.md §2.3). Scores and softmax in
    fp32, scores = (q @ k^T) * sm_scale as in transformers' eager attention; o in q's dtype. Autograd-safe.
    """
    kv_heads, N, g, T, D = q.shape
    S = k.shape[-2]
    f32 = q.dtype == torch.float32
    qf, kf, vf = (q, k, v) if f32 else (q.float(), k.float(), v.float())
    scores = torch.matmul(qf.reshape(kv_heads, N, g * T, D), kf.transpose(-1, -2)) * sm_scale   # [k, N, gT, S]
    scores = scores.view(kv_heads, N, g, T, S) + bias[:, None]                                    # [k, N, g, T, S]
    sink = sinks.view(kv_heads, 1, g, 1, 1).to(torch.float32).expand(kv_heads, N, g, T, 1)
    probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :S]                  # [k, N, g, T, S]
    o = torch.matmul(probs.reshape(kv_heads, N, g * T, S), vf).view(kv_heads, N, g, T, D)      # [k, N, g, T, D]
    return o if f32 else o.to(q.dtype)


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """q_pos [T], k_pos [S] -> allowed [T, S]: causal, and with a window W the W keys i-W+1 .. i."""
    diff = q_pos[:, None] - k_pos[None, :]                                                   # [T, S]
    allowed = diff >= 0
    if window is not None:
        allowed &= diff < window
    return allowed


class AttentionMetadata(Protocol):
    """Where a layer's keys and values come from. Built once per forward by whoever owns the batch."""

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
               window: int | None, sm_scale: float) -> torch.Tensor:
        """q [T, n, D], k/v [T, k, D] of this step's tokens -> o [T, n, D]."""
        ...


class DenseMetadata:
    """No KV cache: the batch is whole sequences laid end to end, each starting at position 0.

    The reference path (and `epserve logits`): a block-diagonal causal mask over the concatenated tokens.
    """

    def __init__(self, seq_lens: list[int], device: torch.device | str = "cpu"):
        seq_ids = torch.repeat_interleave(torch.arange(len(seq_lens), device=device),
                                          torch.tensor(seq_lens, device=device))              # [T]
        starts = torch.cumsum(torch.tensor([0] + seq_lens[:-1], device=device), 0)
        self.positions = torch.arange(int(sum(seq_lens)), device=device) - starts[seq_ids]    # [T]
        self._same_seq = seq_ids[:, None] == seq_ids[None, :]                                 # [T, T]
        self._masks: dict[int | None, torch.Tensor] = {}

    def attend(self, layer_idx, q, k, v, sinks, window, sm_scale):
        if window not in self._masks:
            self._masks[window] = self._same_seq & window_mask(self.positions, self.positions, window)
        return sink_attention(q, k, v, sinks, self._masks[window], sm_scale)


class Attention(nn.Module):
    """Module and parameter names equal the HF checkpoint's `self_attn.*` (q_proj, k_proj, v_proj, o_proj, sinks)."""

    def __init__(self, config: ModelConfig, layer_idx: int, dtype: torch.dtype):
        super().__init__()
        self.layer_idx = layer_idx
        self.window = config.window(layer_idx)
        self.num_heads, self.num_kv_heads, self.head_dim = (config.num_attention_heads,
                                                            config.num_key_value_heads, config.head_dim)
        self.sm_scale = self.head_dim ** -0.5
        H, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(H, self.num_heads * self.head_dim, bias=bias, dtype=dtype)
        self.k_proj = nn.Linear(H, self.num_kv_heads * self.head_dim, bias=bias, dtype=dtype)
        self.v_proj = nn.Linear(H, self.num_kv_heads * self.head_dim, bias=bias, dtype=dtype)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, H, bias=bias, dtype=dtype)
        self.sinks = nn.Parameter(torch.empty(self.num_heads, dtype=dtype))
        self._fused_ptrs: tuple[int, ...] = ()                     # see _qkv
        self._fused_weight: torch.Tensor | None = None
        self._fused_bias: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        """x [T, H] (already normed) -> [T, H]. Biases are added before RoPE."""
        T, n, kv, D = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self._qkv(x).view(T, n + 2 * kv, D)                                             # [T, n+2k, D]
        qk = apply_rotary(qkv[:, :n + kv], cos, sin)                                          # [T, n+k, D]
        o = metadata.attend(self.layer_idx, qk[:, :n], qk[:, n:], qkv[:, n + kv:], self.sinks, self.window,
                            self.sm_scale)                                                    # [T, n, D]
        return self.o_proj(o.reshape(T, n * D))

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, (n + 2k) * D]: the q, k and v projections in one matmul.

        Parameters that need no grad (a loaded model) are re-pointed once at slices of one fused weight (and bias):
        no memory is duplicated, in-place writes to q_proj/k_proj/v_proj stay visible, and a parameter replaced
        since (moved, reloaded) triggers a new fusion; their state_dict() entries then share one storage (clone
        them for safetensors' save_file). Trainable parameters keep three linears."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        if self.q_proj.weight.requires_grad:
            return torch.cat([p(x) for p in projs], dim=-1)
        if self._fused_ptrs != _data_ptrs(projs):
            self._fuse(projs)
        return F.linear(x, self._fused_weight, self._fused_bias)

    @torch.no_grad()
    def _fuse(self, projs: tuple[nn.Linear, ...]) -> None:
        rows = [p.weight.shape[0] for p in projs]
        self._fused_weight = torch.cat([p.weight for p in projs])                              # [(n+2k)D, H]
        for p, w in zip(projs, self._fused_weight.split(rows)):
            p.weight.data = w
        self._fused_bias = None if projs[0].bias is None else torch.cat([p.bias for p in projs])
        if self._fused_bias is not None:
            for p, b in zip(projs, self._fused_bias.split(rows)):
                p.bias.data = b
        self._fused_ptrs = _data_ptrs(projs)


def _data_ptrs(projs) -> tuple[int, ...]:
    return tuple(t.data_ptr() for p in projs for t in (p.weight, p.bias) if t is not None)
