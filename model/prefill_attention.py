"""Prefill-chunk attention over the paged KV cache: many queries per sequence, per-head sinks, sliding window, GQA.

A flash-attention-style Triton kernel for CUDA tensors (scores never leave registers) and a torch fallback (the
reference) with one contract. Owns no cache layout: it reads PagedKVCache's `k_heads`/`v_heads` through the block
tables the engine passes, after this step's keys and values have been written.
Legend: T=query rows of the step, N=sequences, M=block-table columns, B=block size, n=query heads, k=KV heads,
g=n/k, D=head_dim, S=keys of one sequence, BQ=queries per kernel tile, R=BQ*g rows of a tile, KT=keys per tile.
"""
from __future__ import annotations

import torch

from model.attention import mask_bias, sink_attention_heads, window_mask
from model.triton_support import KERNEL_AVAILABLE, NO_WINDOW, choose_impl, tl, triton



def paged_prefill_attention(q: torch.Tensor, k_heads: torch.Tensor, v_heads: torch.Tensor,
                            block_tables: torch.Tensor, q_start: torch.Tensor, q_len: torch.Tensor,
                            ctx_start: torch.Tensor, sinks: torch.Tensor, window: int | None, sm_scale: float,
                            block_size: int, impl: str | None = None) -> torch.Tensor:
    """q [T, n, D], k_heads/v_heads [k, slots, D] (slot = block_id * B + offset; this step's keys already written),
    block_tables [N, M], q_start/q_len/ctx_start [N] (int32 or int64), sinks [n] -> o [T, n, D] in q's dtype.

    Sequence i owns rows q_start[i] .. q_start[i] + q_len[i] - 1 of q, at positions ctx_start[i] .. ctx_start[i] +
    q_len[i] - 1 (ctx_start = tokens already cached before this chunk). Column c of its table holds the block of key
    positions [c * B, (c + 1) * B). A query at position p sees keys max(0, p - window + 1) .. p (all of 0 .. p with
    window None) plus its head's sink logit (not scaled, no value vector: gpt-oss-spec.md §2.3); query head h reads
    KV head h // g. Table entries outside the keys some query of the sequence sees (NULL_BLOCK, garbage, columns
    past M) are never dereferenced; an invalid id (< 0 or >= num_blocks) inside them makes its keys not visible.
    Rows of q no sequence owns come back as zeros; q_len 0 is allowed. Scores and softmax in fp32.
    impl: "triton" (the kernel; CPU tensors run only under TRITON_INTERPRET=1), "torch" (the fallback, which reads
    the lengths back to the host), or None: the kernel for CUDA tensors when triton imports, else the fallback.
    """
    args = (q, k_heads, v_heads, block_tables, q_start, q_len, ctx_start, sinks, window, sm_scale, block_size)
    if choose_impl("paged_prefill_attention", impl, q) == "torch":
        return prefill_attention_torch(*args)
    return prefill_attention_triton(*args)


def prefill_attention_torch(q, k_heads, v_heads, block_tables, q_start, q_len, ctx_start, sinks, window, sm_scale,
                            block_size):
    """The fallback: per sequence, gather its visible keys and run `sink_attention_heads` (scores [k, g, L, S]
    materialised). Reads q_start/q_len/ctx_start back to the host: a reference, not a serving path."""
    (_, n, D), kv, M = q.shape, k_heads.shape[0], block_tables.shape[1]
    B, num_blocks = block_size, k_heads.shape[1] // block_size
    o = torch.zeros_like(q)                                                                     # [T, n, D]
    for i, (first, L, ctx) in enumerate(zip(q_start.tolist(), q_len.tolist(), ctx_start.tolist())):
        if L == 0:
            continue
        kpos = torch.arange(0 if window is None else max(0, ctx - window + 1), ctx + L, device=q.device)  # [S]
        cols = torch.div(kpos, B, rounding_mode="floor")
        bid = block_tables[i].long()[cols.clamp(max=M - 1)]
        real = (cols < M) & (bid >= 0) & (bid < num_blocks)                                     # [S]
        read = torch.where(real, bid, 0) * B + kpos % B
        # Zero the keys of invalid entries: a stale slot holding inf/nan must not leak through 0 * nan.
        kh, vh = (torch.where(real[:, None], x.index_select(1, read), 0)[:, None] for x in (k_heads, v_heads))
        if q.dtype == torch.float32:                             # a 16-bit cache under fp32 queries: upcast keys
            kh, vh = kh.float(), vh.float()                                                     # [k, 1, S, D]
        allowed = window_mask(ctx + torch.arange(L, device=q.device), kpos, window) & real      # [L, S]
        qh = q[first:first + L].reshape(L, kv, n // kv, D).permute(1, 2, 0, 3)[:, None]         # [k, 1, g, L, D]
        out = sink_attention_heads(qh, kh, vh, sinks, mask_bias(allowed)[None], sm_scale)       # [k, 1, g, L, D]
        o[first:first + L] = out[:, 0].permute(2, 0, 1, 3).reshape(L, n, D)
    return o


def prefill_attention_triton(q, k_heads, v_heads, block_tables, q_start, q_len, ctx_start, sinks, window, sm_scale,
                             block_size, block_q: int | None = None, keys_per_tile: int = 64):
    """The kernel: one program per (query tile, KV head); a tile is BQ queries of one sequence times the g query
    heads of the KV head (R = BQ * g rows of one tl.dot). The grid is T // BQ + N tiles, an upper bound on
    sum_i ceil(q_len_i / BQ) known from shapes alone; the tile -> (sequence, first query) map is computed on the
    device, and surplus programs load and store nothing (no host sync).
    block_q BQ: queries per tile (a power of 2; None: 128 // g rows' worth). keys_per_tile KT: a power of 2 >= 16."""
    (T, n, D), kv, (N, M) = q.shape, k_heads.shape[0], block_tables.shape
    g = n // kv
    G_PAD = triton.next_power_of_2(g)
    BQ = block_q or max(1, 128 // G_PAD)
    if BQ & (BQ - 1) or keys_per_tile < 16 or keys_per_tile & (keys_per_tile - 1):
        raise ValueError(f"block_q must be a power of 2 and keys_per_tile a power of 2 >= 16, got {BQ}, "
                         f"{keys_per_tile}")
    BQ = max(BQ, 16 // G_PAD)                                                    # tl.dot needs >= 16 rows
    o = torch.zeros(T, n, D, dtype=q.dtype, device=q.device)                    # [T, n, D]
    if N == 0 or T == 0:
        return o
    q, k_heads, v_heads = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k_heads, v_heads))
    block_tables = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
    q_start, q_len, ctx_start, sinks = (x.contiguous() for x in (q_start, q_len, ctx_start, sinks))
    # CPU tensors reach the kernel only in Triton's interpreter, whose bf16 tl.dot multiplies the raw uint16 bits
    # (triton 3.9): there, and whenever q and the cache differ in dtype, the dots run on fp32 operands.
    dot_fp32 = (not q.is_cuda) or q.dtype != k_heads.dtype or q.dtype == torch.float32
    rows = BQ * G_PAD
    _prefill_kernel[(T // BQ + N, kv)](
        q, k_heads, v_heads, block_tables, q_start, q_len, ctx_start, sinks, o,
        float(sm_scale), NO_WINDOW if window is None else int(window), k_heads.shape[1] // block_size, N, M,
        q.stride(0), q.stride(1), k_heads.stride(0), k_heads.stride(1), v_heads.stride(0), v_heads.stride(1),
        block_tables.stride(0), o.stride(0), o.stride(1),
        G=g, D=D, B=block_size, G_PAD=G_PAD, D_PAD=max(16, triton.next_power_of_2(D)), BQ=BQ,
        KT=keys_per_tile, N_PAD=max(16, triton.next_power_of_2(N)), DOT_FP32=dot_fp32, num_warps=8 if rows >= 128 else 4)
    return o


if KERNEL_AVAILABLE:
    from model.triton_support import online_softmax_step

    @triton.jit
    def _tile(qlen_ptr, N, BQ: tl.constexpr, N_PAD: tl.constexpr):
        """Program id 0 -> (sequence, first query of the tile, queries in the tile). Sequence i's tiles are numbered
        after those of sequences < i (a cumsum of ceil(q_len / BQ)), its last (most keys) tile first so that the
        heaviest programs start early. Surplus programs get sequence N and 0 queries."""
        pid = tl.program_id(0)
        i = tl.arange(0, N_PAD)
        qlen = tl.load(qlen_ptr + i, mask=i < N, other=0).to(tl.int32)                 # [N_PAD]
        tiles = tl.cdiv(qlen, BQ)
        seq = tl.sum((tl.cumsum(tiles, 0) <= pid).to(tl.int32), 0)
        first_tile = tl.sum(tl.where(i < seq, tiles, 0), 0)
        L = tl.sum(tl.where(i == seq, qlen, 0), 0)                                     # 0 for surplus programs
        q0 = tl.maximum(tl.cdiv(L, BQ) - 1 - (pid - first_tile), 0) * BQ
        return seq, q0, tl.minimum(L - q0, BQ)

    @triton.jit
    def _prefill_kernel(q_ptr, k_ptr, v_ptr, table_ptr, qstart_ptr, qlen_ptr, ctx_ptr, sinks_ptr, o_ptr,
                        sm_scale, window, num_blocks, N, M,
                        stride_qt, stride_qh, stride_kh, stride_ks, stride_vh, stride_vs, stride_tn,
                        stride_ot, stride_oh,
                        G: tl.constexpr, D: tl.constexpr, B: tl.constexpr, G_PAD: tl.constexpr,
                        D_PAD: tl.constexpr, BQ: tl.constexpr, KT: tl.constexpr, N_PAD: tl.constexpr,
                        DOT_FP32: tl.constexpr):
        """Online softmax over tiles of KT keys, from the first key the tile's first query sees to its last query,
        started from the sink: m = sink, l = 0 (the sink's own exp(sink - m) is added once at the end). Row
        r = query (r // G_PAD) x head in group (r % G_PAD); each score is masked by its own causal/window test."""
        seq, q0, nq = _tile(qlen_ptr, N, BQ, N_PAD)
        kv = tl.program_id(1)
        tile_ok = nq > 0
        r = tl.arange(0, BQ * G_PAD)                                               # [R]
        qi, j = r // G_PAD, r % G_PAD
        d = tl.arange(0, D_PAD)                                                    # [D_PAD]
        dmask = d < D
        row_ok = (qi < nq) & (j < G)                                               # [R]
        heads = kv * G + j
        first = tl.load(qstart_ptr + seq, mask=tile_ok, other=0).to(tl.int32)
        ctx = tl.load(ctx_ptr + seq, mask=tile_ok, other=0).to(tl.int32)
        trow = (first + q0 + qi).to(tl.int64)                                      # [R] row of q and o
        pos = ctx + q0 + qi                                                        # [R] query position
        q = tl.load(q_ptr + trow[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None] & dmask[None, :], other=0.0)              # [R, D_PAD]
        if DOT_FP32:
            q = q.to(tl.float32)
        sink = tl.load(sinks_ptr + heads, mask=j < G, other=0.0).to(tl.float32)    # [R]
        m, l = sink, tl.zeros([BQ * G_PAD], tl.float32)
        acc = tl.zeros([BQ * G_PAD, D_PAD], tl.float32)

        lo = tl.maximum(ctx + q0 - window + 1, 0)                                  # first key the tile sees
        last = ctx + q0 + nq - 1                                                   # the tile's last query
        t_lo = lo // KT
        t_hi = tl.where(tile_ok, last // KT + 1, t_lo)                             # no keys for surplus programs
        table_row = table_ptr + seq.to(tl.int64) * stride_tn
        k_head = k_ptr + kv.to(tl.int64) * stride_kh                              # int64: kv * stride may pass 2**31
        v_head = v_ptr + kv.to(tl.int64) * stride_vh
        for t in range(t_lo, t_hi):
            kp = t * KT + tl.arange(0, KT)                                         # [KT] key positions
            col = kp // B
            ok = (kp >= lo) & (kp <= last) & (col < M)
            bid = tl.load(table_row + col, mask=ok, other=-1)
            ok &= (bid >= 0) & (bid < num_blocks)
            slot = (tl.where(ok, bid, 0).to(tl.int64) * B + kp % B)
            k = tl.load(k_head + slot[:, None] * stride_ks + d[None, :],
                        mask=ok[:, None] & dmask[None, :], other=0.0)              # [KT, D_PAD]
            if DOT_FP32:
                s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))                                         # [R, KT]
            diff = pos[:, None] - kp[None, :]
            seen = ok[None, :] & (diff >= 0) & (diff < window)                     # causal and window, per score
            s = tl.where(seen, s * sm_scale, float("-inf"))                        # [R, KT]
            v = tl.load(v_head + slot[:, None] * stride_vs + d[None, :],
                        mask=ok[:, None] & dmask[None, :], other=0.0)              # [KT, D_PAD]
            m, l, acc = online_softmax_step(s, v, m, l, acc, DOT_FP32)

        o = acc / (l + tl.exp(sink - m))[:, None]
        tl.store(o_ptr + trow[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 o.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & dmask[None, :])
