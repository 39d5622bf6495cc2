"""MXFP4 (OCP microscaling: FP4 E2M1 elements, E8M0 scales, blocks of 32) decoding and encoding.

Owns the bit-exact format of gpt-oss's expert weights (gpt-oss-spec.md §3.4); knows nothing of layers.
"""
from __future__ import annotations

import torch

BLOCK = 32  # elements per scale
BYTES_PER_BLOCK = BLOCK // 2
SCALE_BIAS = 127

# Code -> value; bit 3 sign, bits 2-1 exponent (bias 1), bit 0 mantissa (FP4_VALUES in OAI-torch weights.py).
FP4_VALUES = (
    +0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
)


def _lut(device: torch.device) -> torch.Tensor:
    return torch.tensor(FP4_VALUES, dtype=torch.float32, device=device)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """blocks uint8 [..., G, 16], scales uint8 [..., G] -> values [..., G*32] in `dtype`.

    Element 2m of a block is the low nibble of byte m, element 2m+1 the high nibble; the scale is 2^(s-127).
    Exact: every MXFP4 value is representable in bf16 and fp32.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BYTES_PER_BLOCK:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    lut = _lut(blocks.device)
    lo = lut[(blocks & 0x0F).long()]                       # [..., G, 16]
    hi = lut[(blocks >> 4).long()]                         # [..., G, 16]
    vals = torch.stack((lo, hi), dim=-1).flatten(-2)       # [..., G, 32]: lo, hi, lo, hi ...
    exp = scales.to(torch.int32) - SCALE_BIAS              # [..., G]
    vals = torch.ldexp(vals, exp.unsqueeze(-1).to(torch.float32))
    return vals.flatten(-2).to(dtype)                      # [..., G*32]


def quantize(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """values [..., N] (N a multiple of 32) -> (blocks uint8 [..., N/32, 16], scales uint8 [..., N/32]).

    Per block the scale is the smallest power of two that maps the block's max |x| into [-6, 6]; elements round
    to the nearest FP4 value. `dequantize(*quantize(x))` is the MXFP4 rounding of x, and exact when x already is
    an MXFP4 value set.
    """
    if values.shape[-1] % BLOCK:
        raise ValueError(f"MXFP4 needs the last dim to be a multiple of {BLOCK}, got {values.shape[-1]}")
    x = values.to(torch.float32).unflatten(-1, (-1, BLOCK))              # [..., G, 32]
    amax = x.abs().amax(dim=-1)                                          # [..., G]
    exp = torch.ceil(torch.log2(amax / 6.0))
    exp = torch.where(amax > 0, exp, torch.full_like(exp, -SCALE_BIAS)).clamp(-SCALE_BIAS, 128)
    scaled = x / torch.ldexp(torch.ones_like(exp), exp).unsqueeze(-1)     # in [-6, 6]
    lut = _lut(values.device)
    codes = (scaled.unsqueeze(-1) - lut).abs().argmin(dim=-1)           # [..., G, 32] nearest code
    neg_zero = (codes == 0) & (torch.signbit(scaled))
    codes = torch.where(neg_zero, torch.full_like(codes, 8), codes).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)                  # [..., G, 16]
    scales = (exp + SCALE_BIAS).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()
