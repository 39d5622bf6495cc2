"""Small layers of gpt-oss: RMSNorm and rotary embeddings with YaRN (gpt-oss-spec.md §2.1, §2.2).

Legend: T=tokens, n=heads, D=head_dim.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from model.config import ModelConfig


class RMSNorm(nn.Module):
    """y = x * rsqrt(mean(x^2) + eps) * w in fp32, cast back (weight `w`, not `1 + w`); the weight stays fp32."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=torch.float32))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:      # one call; torch's rms_norm runs these very ops (bitwise equal in fp32)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def yarn_bounds(head_dim: int, theta: float, original_ctx: int, beta_fast: float, beta_slow: float,
                truncate: bool) -> tuple[float, float]:
    """Dims (low, high) between which YaRN blends; gpt-oss: 8.09278, 17.39802 (not rounded: truncate false)."""
    d_half = head_dim / 2
    low = d_half * math.log(original_ctx / (beta_fast * 2 * math.pi)) / math.log(theta)
    high = d_half * math.log(original_ctx / (beta_slow * 2 * math.pi)) / math.log(theta)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0.0), min(high, head_dim - 1.0)


class RotaryEmbedding(nn.Module):
    """Rotate-half (NeoX) RoPE; YaRN NTK-by-parts frequencies and concentration 0.1 ln(factor) + 1 on cos and sin.

    No buffers: the D/2 frequencies are computed on first use on the positions' device and kept per device (not in
    the state dict), so a model built on the meta device needs no re-initialisation after loading.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.theta = config.rope_theta
        self.yarn = config.rope_scaling
        self._inv_freq: dict[torch.device, tuple[torch.Tensor, float]] = {}

    def inv_freq_and_concentration(self, device: torch.device) -> tuple[torch.Tensor, float]:
        d = self.head_dim
        freq = self.theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)   # [D/2]
        if self.yarn is None:
            return 1.0 / freq, 1.0
        y = self.yarn
        low, high = yarn_bounds(d, self.theta, y.original_max_position_embeddings, y.beta_fast, y.beta_slow,
                                y.truncate)
        if high == low:
            high += 0.001
        ramp = ((torch.arange(d // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
        inv_freq = (1.0 / freq) * (1 - ramp) + (1.0 / (y.factor * freq)) * ramp
        concentration = 0.1 * math.log(y.factor) + 1.0 if y.factor > 1 else 1.0
        return inv_freq, concentration

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos, sin) [T, D/2], computed in fp32 and cast to the activation dtype."""
        if positions.device not in self._inv_freq:
            self._inv_freq[positions.device] = self.inv_freq_and_concentration(positions.device)
        inv_freq, concentration = self._inv_freq[positions.device]
        angles = positions.float()[:, None] * inv_freq[None, :]                                 # [T, D/2]
        return (angles.cos() * concentration).to(dtype), (angles.sin() * concentration).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, n, D]; cos/sin [T, D/2]. Halves (not interleaved pairs) rotate together."""
    x1, x2 = x.chunk(2, dim=-1)                                                                # [T, n, D/2]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
