"""mxfp4_grouped_linear: one Triton launch computing x @ W_e^T + b_e for rows grouped by expert, reading MXFP4 weights
as packed bytes and dequantising them in registers (no host sync, grid from shapes only: CUDA-graph safe).
Owns the kernel and its torch reference; knows nothing of routing or layers. Triton is optional.
Legend: R=rows (sorted by expert), E=experts, N=out features, K=in features, G=K/32 scale blocks.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from model import mxfp4
from model.triton_support import KERNEL_AVAILABLE, tl, triton


VARIANTS = ("dequant", "dot_scaled")


def mxfp4_grouped_linear(x: torch.Tensor, group_ends: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor,
                         bias: torch.Tensor | None = None, variant: str = "dequant",
                         config: dict | None = None) -> torch.Tensor:
    """x [R, K] (fp32/bf16/fp16) whose rows are grouped by expert; group_ends int [E]: expert e owns rows
    [group_ends[e-1], group_ends[e]) (the `offs` of torch._grouped_mm), non-decreasing, group_ends[-1] <= R;
    blocks uint8 [E, N, G, 16], scales uint8 [E, N, G] (spec §3.4, "out x in"); bias [E, N] or None.
    -> y [R, N] in x.dtype: y[r] = x[r] @ dequant(W_e)^T + bias[e], accumulated in fp32; rows past
    group_ends[-1] are written as zeros (so a caller may weight them by 0 without meeting NaN garbage).

    Reads no tensor value on the host; launches one kernel whose grid depends only on (R, E, N). On CPU tensors it
    runs only under TRITON_INTERPRET=1 (tests); production code chooses it for CUDA tensors.
    variant "dequant": nibbles and scales decoded arithmetically in registers, then bf16/fp32 tl.dot (any dtype).
    variant "dot_scaled" (bf16 x only): the packed bytes and E8M0 scales go straight into tl.dot_scaled (e2m1), which
    Triton lowers natively where the hardware has MX formats and by upcasting elsewhere; which is faster on Hopper is
    what bench/gpu_check.py measures. `config` overrides block_config's tiles (bench/expert_kernel_sweep.py).
    """
    if not KERNEL_AVAILABLE:
        raise RuntimeError("mxfp4_grouped_linear needs the `triton` package; without it use the torch path "
                           "(PackedMXFP4Experts(use_kernel=False)) or mxfp4_grouped_linear_reference")
    _check(x, group_ends, blocks, scales, bias)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "dot_scaled" and x.dtype != torch.bfloat16:
        raise ValueError(f"variant 'dot_scaled' multiplies bf16 activations, got {x.dtype}")
    R, K = x.shape
    E, N = blocks.shape[:2]
    x = x if x.stride(1) == 1 else x.contiguous()
    # CPU tensors mean Triton's interpreter, whose bf16 support is partial: its tl.dot multiplies bf16 bit patterns
    # (triton-lang/triton#11584) and its fp32 -> bf16 cast truncates. There the dot runs in fp32 (bf16 values are
    # exact in fp32) and the output is stored in fp32 and rounded by torch.
    interpreted = not x.is_cuda
    y = torch.empty(R, N, dtype=torch.float32 if interpreted else x.dtype, device=x.device)  # [R, N]
    if R == 0 or N == 0:
        return y.to(x.dtype)
    cfg = config or block_config(R, E, variant)
    # Tiles of BLOCK_M rows never straddle two groups. Groups are the E experts plus the tail [group_ends[-1], R);
    # sum_g ceil(n_g / M) <= sum_g floor(n_g / M) + #non-empty groups <= R // M + min(E + 1, R).
    grid = (R // cfg["BLOCK_M"] + min(E + 1, R), triton.cdiv(N, cfg["BLOCK_N"]))
    args = (x, group_ends, blocks.contiguous(), scales.contiguous(), bias.contiguous() if bias is not None else x,
            y, R, N, K, E, x.stride(0), y.stride(0))
    if variant == "dot_scaled":
        _launch_scaled(grid, *args, HAS_BIAS=bias is not None, E_POW2=triton.next_power_of_2(E + 1), **cfg)
        return y.to(x.dtype)
    if x.dtype == torch.float32 or interpreted:
        dot_dtype, precision = tl.float32, "ieee"                                       # exact products, fp32 sums
    else:
        dot_dtype, precision = (tl.bfloat16 if x.dtype == torch.bfloat16 else tl.float16), None
    _launch(grid, *args, HAS_BIAS=bias is not None, DOT_DTYPE=dot_dtype, DOT_PRECISION=precision,
            E_POW2=triton.next_power_of_2(E + 1), **cfg)
    return y.to(x.dtype)


def block_config(R: int, E: int, variant: str = "dequant") -> dict:
    """Tile sizes from shapes only (autotune-free). Decode (few rows per expert) is bound by reading the packed
    weights: BLOCK_M 16 (tl.dot's minimum), N tiles narrow enough that enough programs stream the weights, long K
    tiles for 64-128-byte row segments. Prefill re-dequantises each weight tile once per BLOCK_M rows: larger M and N.
    dot_scaled at decode shapes: the best of bench/expert_kernel_sweep.py's 24 tiles on an H200 (2026-12-04, 20b
    shapes): 1.4-2.0x the previous tiles at one token, 1.6x at 64 tokens."""
    rows_per_expert = R / max(E, 1)
    if rows_per_expert <= 16:
        if variant == "dot_scaled":
            return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256 if R <= 64 else 128, num_warps=4, num_stages=3)
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4)
    if rows_per_expert <= 64:
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


def _launch(grid, *args, **meta) -> None:
    """The only statement that leaves torch: one kernel launch (a seam the no-sync tests can stub or exempt)."""
    _grouped_kernel[grid](*args, **meta)


def _launch_scaled(grid, *args, **meta) -> None:
    _scaled_kernel[grid](*args, **meta)


def _check(x, group_ends, blocks, scales, bias) -> None:
    """Shape/dtype/device validation from metadata only (never reads values)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.dim() != 4 or blocks.shape[-1] != mxfp4.BYTES_PER_BLOCK or tuple(scales.shape) != blocks.shape[:3]:
        raise ValueError(f"expected blocks [E, N, G, 16] and scales [E, N, G], got {tuple(blocks.shape)} and "
                         f"{tuple(scales.shape)}")
    E, N, G = blocks.shape[:3]
    if x.dim() != 2 or x.shape[1] != G * mxfp4.BLOCK:
        raise ValueError(f"x must be [R, {G * mxfp4.BLOCK}] for blocks {tuple(blocks.shape)}, got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if tuple(group_ends.shape) != (E,) or group_ends.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"group_ends must be int32/int64 [{E}], got {group_ends.dtype} {tuple(group_ends.shape)}")
    if bias is not None and tuple(bias.shape) != (E, N):
        raise ValueError(f"bias must be [{E}, {N}], got {tuple(bias.shape)}")
    tensors = (x, group_ends, blocks, scales) + ((bias,) if bias is not None else ())
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"all inputs must be on one device, got {[str(t.device) for t in tensors]}")


def mxfp4_grouped_linear_reference(x: torch.Tensor, group_ends: torch.Tensor, blocks: torch.Tensor,
                                   scales: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same contract in plain torch: per expert, dequantise (model/mxfp4.py) and F.linear. Host-syncs
    (`group_ends.tolist()`) and materialises each weight: for tests only."""
    R, N = x.shape[0], blocks.shape[1]
    y = x.new_zeros(R, N)                                                                  # [R, N]
    start = 0
    for e, end in enumerate(group_ends.tolist()):
        if end > start:
            w = mxfp4.dequantize(blocks[e], scales[e], x.dtype)                             # [N, K]
            y[start:end] = F.linear(x[start:end], w, None if bias is None else bias[e].to(x.dtype))
        start = max(start, end)
    return y


if KERNEL_AVAILABLE:
    @triton.jit
    def _tile(ends_ptr, R, E, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
        """Program id 0 -> (group, first row, group's row end), computed in registers from group_ends.
        Groups 0..E-1 are the experts, group E the tail [group_ends[E-1], R); the tiles of group g are numbered
        after those of groups < g (an exclusive cumsum of ceil(rows / BLOCK_M)). Surplus programs get group > E
        and row end 0, so they load and store nothing."""
        pid = tl.program_id(0)
        g = tl.arange(0, E_POW2)
        end = tl.load(ends_ptr + g, mask=g < E, other=R).to(tl.int32)
        end = tl.where(g < E, tl.minimum(tl.maximum(end, 0), R), R)
        start = tl.load(ends_ptr + g - 1, mask=(g > 0) & (g <= E), other=0).to(tl.int32)
        start = tl.where(g <= E, tl.minimum(tl.maximum(start, 0), R), R)
        tiles = tl.cdiv(tl.maximum(end - start, 0), BLOCK_M)
        grp = tl.sum((tl.cumsum(tiles, 0) <= pid).to(tl.int32), 0)
        first_tile = tl.sum(tl.where(g < grp, tiles, 0), 0)
        row0 = tl.sum(tl.where(g == grp, start, 0), 0) + (pid - first_tile) * BLOCK_M
        return grp, row0, tl.sum(tl.where(g == grp, end, 0), 0)

    @triton.jit
    def _rows_and_cols(ends_ptr, R, N, E, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, E_POW2: tl.constexpr):
        """This program's group, its BLOCK_M rows (int64) with their mask, and its BLOCK_N output columns with theirs."""
        grp, row0, row_end = _tile(ends_ptr, R, E, BLOCK_M, E_POW2)
        rows = row0 + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        return grp, rows.to(tl.int64), rows < row_end, cols, cols < N

    @triton.jit
    def _store(y_ptr, stride_y, acc, rows, row_ok, cols, col_ok):
        tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _fp4(code):
        """FP4 E2M1 code (int32, 0..15) -> fp32 value, exactly FP4_VALUES[code]: for |code| >= 2 the 3 low bits are
        exponent:mantissa, placed under an fp32 exponent bias of 126; |code| == 1 is the subnormal 0.5."""
        mag = code & 7
        bits = tl.where(mag >= 2, (mag << 22) + (126 << 23), mag * (126 << 23))
        return (bits | ((code & 8) << 28)).to(tl.float32, bitcast=True)                 # bit 3 -> sign bit

    @triton.jit
    def _e8m0(s):
        """E8M0 scale byte (int32) -> 2^(s-127) in fp32, exactly (s = 0 is the subnormal 2^-127, 255 is inf)."""
        return tl.where(s == 0, 1 << 22, s << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _weights(w_rows, s_rows, kb0, KB, col_ok, DOT_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_N: tl.constexpr):
        """Bytes [kb0, kb0 + BLOCK_K/2) of the weight rows at w_rows [BN] (scales at s_rows [BN]) -> the even and
        the odd inputs' weights, each [BLOCK_K/2, BN] in DOT_DTYPE. Tiles are [BLOCK_K/32 scale blocks, 16 bytes, BN]
        so that each scale byte is loaded once and broadcast over its block's 16 bytes in registers."""
        blk = kb0 // 16 + tl.arange(0, BLOCK_K // 32)[:, None, None]                   # [KG, 1, 1] scale block
        ok = (blk < KB // 16) & col_ok[None, None, :]                                   # [KG, 1, BN]
        kb = blk * 16 + tl.arange(0, 16)[None, :, None]                                 # [KG, 16, 1] byte
        packed = tl.load(w_rows[None, None, :] + kb, mask=ok, other=0).to(tl.int32)     # [KG, 16, BN]
        scale = _e8m0(tl.load(s_rows[None, None, :] + blk, mask=ok, other=127).to(tl.int32))  # [KG, 1, BN]
        lo = (_fp4(packed & 15) * scale).to(DOT_DTYPE)
        hi = (_fp4(packed >> 4) * scale).to(DOT_DTYPE)
        return tl.reshape(lo, (BLOCK_K // 2, BLOCK_N)), tl.reshape(hi, (BLOCK_K // 2, BLOCK_N))

    @triton.jit
    def _grouped_kernel(x_ptr, ends_ptr, w_ptr, s_ptr, b_ptr, y_ptr, R, N, K, E, stride_x, stride_y,
                        HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_POW2: tl.constexpr):
        # Program (tile of BLOCK_M rows of one group, BLOCK_N outputs). Per K step it loads a [BLOCK_K/2, BLOCK_N]
        # tile of packed bytes: the low nibbles are inputs 2m (dotted with x's even columns), the high nibbles
        # inputs 2m+1 (odd columns), so nothing is interleaved; byte m of a row uses the row's scale m // 16.
        grp, rows, row_ok, cols, col_ok = _rows_and_cols(ends_ptr, R, N, E, BLOCK_M, BLOCK_N, E_POW2)
        KB = K // 2                                              # bytes per weight row
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if grp < E:                                              # the tail group only writes zeros
            e = grp.to(tl.int64)
            w_rows = w_ptr + e * N * KB + cols * KB              # [BN] first byte of each weight row
            s_rows = s_ptr + e * N * (K // 32) + cols * (K // 32)
            j = tl.arange(0, BLOCK_K // 2)
            for kb0 in range(0, KB, BLOCK_K // 2):
                kb = kb0 + j                                     # [BK/2] byte (= input pair) index
                x_at = x_ptr + rows[:, None] * stride_x + 2 * kb[None, :]
                x_ok = row_ok[:, None] & (kb < KB)[None, :]
                x_even = tl.load(x_at, mask=x_ok, other=0.0).to(DOT_DTYPE)         # [BM, BK/2]
                x_odd = tl.load(x_at + 1, mask=x_ok, other=0.0).to(DOT_DTYPE)      # [BM, BK/2]
                w_lo, w_hi = _weights(w_rows, s_rows, kb0, KB, col_ok, DOT_DTYPE, BLOCK_K, BLOCK_N)  # [BK/2, BN]
                acc = tl.dot(x_even, w_lo, acc, input_precision=DOT_PRECISION)
                acc = tl.dot(x_odd, w_hi, acc, input_precision=DOT_PRECISION)
            if HAS_BIAS:
                acc += tl.load(b_ptr + e * N + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        _store(y_ptr, stride_y, acc, rows, row_ok, cols, col_ok)

    @triton.jit
    def _scaled_kernel(x_ptr, ends_ptr, w_ptr, s_ptr, b_ptr, y_ptr, R, N, K, E, stride_x, stride_y,
                       HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       E_POW2: tl.constexpr):
        # The same tiles as _grouped_kernel; per K step the weights stay packed: bytes [BLOCK_K/2, BLOCK_N] (K-packed,
        # low nibble first, as the checkpoint stores them) and scales [BLOCK_N, BLOCK_K/32] feed tl.dot_scaled.
        grp, rows, row_ok, cols, col_ok = _rows_and_cols(ends_ptr, R, N, E, BLOCK_M, BLOCK_N, E_POW2)
        KB, KG = K // 2, K // 32                                 # bytes and scale blocks per weight row
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if grp < E:                                              # the tail group only writes zeros
            e = grp.to(tl.int64)
            w_rows = w_ptr + e * N * KB + cols * KB              # [BN] first byte of each weight row
            s_rows = s_ptr + e * N * KG + cols * KG
            k = tl.arange(0, BLOCK_K)
            kb = tl.arange(0, BLOCK_K // 2)
            kg = tl.arange(0, BLOCK_K // 32)
            for k0 in range(0, K, BLOCK_K):
                x = tl.load(x_ptr + rows[:, None] * stride_x + (k0 + k)[None, :],
                            mask=row_ok[:, None] & (k0 + k < K)[None, :], other=0.0)      # [BM, BK] bf16
                w = tl.load(w_rows[None, :] + (k0 // 2 + kb)[:, None],
                            mask=(k0 // 2 + kb < KB)[:, None] & col_ok[None, :], other=0)  # [BK/2, BN] u8
                sc = tl.load(s_rows[:, None] + (k0 // 32 + kg)[None, :],
                             mask=col_ok[:, None] & (k0 // 32 + kg < KG)[None, :], other=127)  # [BN, BK/32]
                acc = tl.dot_scaled(x, None, "bf16", w, sc, "e2m1", acc)
            if HAS_BIAS:
                acc += tl.load(b_ptr + e * N + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        _store(y_ptr, stride_y, acc, rows, row_ok, cols, col_ok)
