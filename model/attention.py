"""Attention of gpt-oss: q/k/v/o projections with biases, RoPE, GQA, per-head sinks, sliding window.

The math lives in `sink_attention`; where keys come from (a dense prefix, a paged KV cache) is decided by the
`AttentionMetadata` passed explicitly to every forward (STYLE.md: no global context).
Legend: T=query tokens, S=key tokens, n=query heads, k=KV heads, g=query heads per KV head, D=head_dim.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from model.config import ModelConfig
from model.layers import apply_rotary


def sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                   allowed: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """q [..., T, n, D], k/v [..., S, k, D], sinks [n], allowed [..., T, S] bool -> o [..., T, n, D] in q's dtype.

    Each row's softmax runs over its allowed keys plus one sink logit per head (not scaled by sm_scale, no value
    vector), so the weights sum to less than 1 (gpt-oss-spec.md §2.3). Query head h reads KV head h // g.
    Scores and softmax are computed in fp32. Leading dims (...) are a batch of independent sequences.
    """
    *batch, T, n, D = q.shape
    kv_heads = k.shape[-2]
    g = n // kv_heads
    qg = q.float().view(*batch, T, kv_heads, g, D)
    scores = torch.einsum("...tkgd,...skd->...kgts", qg, k.float()) * sm_scale             # [..., k, g, T, S]
    scores = scores.masked_fill(~allowed[..., None, None, :, :], float("-inf"))
    sink = sinks.float().view(kv_heads, g, 1, 1).expand(*scores.shape[:-1], 1)            # [..., k, g, T, 1]
    probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]            # [..., k, g, T, S]
    o = torch.einsum("...kgts,...skd->...tkgd", probs, v.float())                          # [..., T, k, g, D]
    return o.reshape(*batch, T, n, D).to(q.dtype)


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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        """x [T, H] (already normed) -> [T, H]. Biases are added before RoPE."""
        T = x.shape[0]
        q = apply_rotary(self.q_proj(x).view(T, self.num_heads, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).view(T, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(T, self.num_kv_heads, self.head_dim)
        o = metadata.attend(self.layer_idx, q, k, v, self.sinks, self.window, self.sm_scale)  # [T, n, D]
        return self.o_proj(o.reshape(T, self.num_heads * self.head_dim))
