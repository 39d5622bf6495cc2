"""Decode attention over the paged KV cache: one new query per sequence, per-head sinks, sliding window, GQA.

A Triton kernel for CUDA tensors and a torch fallback (CPU, and the reference) with one contract; both have static
shapes and never sync with the host, so a decode step can be captured in a CUDA graph. Owns no cache layout: it
reads PagedKVCache's `k_heads`/`v_heads` through the block tables the engine passes.
Legend: N=sequences, M=block-table columns, B=block size, n=query heads, k=KV heads, g=n/k, D=head_dim,
S=M*B candidate keys, KT=keys per kernel tile, P=splits of a sequence's keys.
"""
from __future__ import annotations

import torch

from model.attention import mask_bias, sink_attention_heads
from model.triton_support import KERNEL_AVAILABLE, NO_WINDOW, choose_impl, tl, triton



def paged_decode_attention(q: torch.Tensor, k_heads: torch.Tensor, v_heads: torch.Tensor,
                           block_tables: torch.Tensor, table_start: torch.Tensor, seq_lens: torch.Tensor,
                           sinks: torch.Tensor, window: int | None, sm_scale: float, block_size: int,
                           impl: str | None = None, plan: tuple[torch.Tensor, torch.Tensor] | None = None,
                           zero_slot: int | None = None) -> torch.Tensor:
    """q [N, n, D], k_heads/v_heads [k, slots, D] (slot = block_id * B + offset; the newest token already written),
    block_tables [N, M], table_start [N], seq_lens [N] (int32 or int64), sinks [n] -> o [N, n, D] in q's dtype.

    Column c of a sequence's table holds the block of key positions [(table_start + c) * B, (table_start + c + 1) * B).
    The query sits at position L - 1 (L = seq_len) and sees keys max(0, L - window) .. L - 1 (all L with window None),
    plus its head's sink logit (not scaled, no value vector: gpt-oss-spec.md §2.3). Query head h reads KV head
    h // g. Table entries outside the visible keys (NULL_BLOCK, padding) are never dereferenced, nor is an invalid
    id (< 0 or >= num_blocks) inside them: its keys count as not visible. Rows with seq_len 0 (padding; their
    table_start and table may be garbage) give zeros. Scores and softmax in fp32.
    impl: "triton" (the kernel; CPU tensors run only under TRITON_INTERPRET=1), "torch" (the fallback), or None:
    the kernel for CUDA tensors when triton imports, else the fallback. plan: the torch path's `decode_plan` of
    these tables, shared by the layers of a group, and zero_slot: a cache slot that always holds zeros (both ignored
    by the kernel).
    """
    args = (q, k_heads, v_heads, block_tables, table_start, seq_lens, sinks, window, sm_scale, block_size)
    if choose_impl("paged_decode_attention", impl, q) == "torch":
        return decode_attention_torch(*args, plan=plan, zero_slot=zero_slot)
    return decode_attention_triton(*args)


def decode_plan(block_tables: torch.Tensor, table_start: torch.Tensor, seq_lens: torch.Tensor, window: int | None,
                block_size: int, num_blocks: int, zero_slot: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch path's per-step work that every layer of a KV group shares: (read slots [N, S] (invalid ids
    clamped to block 0), allowed [N, S] bool), S = M * B candidate keys. Static shapes, no host sync.
    zero_slot: a cache slot that always holds zeros (PagedKVCache.zero_slot); keys not allowed are read from there,
    so the gathered keys and values need no masking."""
    (N, M), B, device = block_tables.shape, block_size, block_tables.device
    tables = block_tables.long()                                                                  # [N, M]
    real = (tables >= 0) & (tables < num_blocks)                                                  # [N, M]
    offset = torch.arange(B, device=device)                                                       # [B]
    read = (torch.where(real, tables, 0)[:, :, None] * B + offset).reshape(N, M * B)              # [N, S]
    cols = torch.arange(M, device=device)                                                         # [M]
    pos = ((table_start.long()[:, None] + cols) * B)[:, :, None] + offset                         # [N, M, B]
    end = seq_lens.long()[:, None, None]                                                          # [N, 1, 1]
    lo = 0 if window is None else (end - window).clamp(min=0)                                    # first visible
    allowed = (real[:, :, None] & (pos >= lo) & (pos < end)).reshape(N, M * B)                   # [N, S]
    if zero_slot is not None:
        read = torch.where(allowed, read, zero_slot)
    return read, allowed


def decode_attention_torch(q, k_heads, v_heads, block_tables, table_start, seq_lens, sinks, window, sm_scale,
                           block_size, plan: tuple[torch.Tensor, torch.Tensor] | None = None,
                           zero_slot: int | None = None):
    """The fallback: gather all M * B candidate keys of every sequence, mask by position, `sink_attention_heads`.

    Shapes depend only on (N, M, B, n, k, D); invalid table entries are clamped to block 0 and masked out.
    plan: `decode_plan(...)` of these tables, when the caller shares it between the layers of a group; zero_slot:
    the cache's always-zero slot the plan redirected masked keys to (then the gathered keys need no masking)."""
    (N, n, D), (kv, slots, _) = q.shape, k_heads.shape
    read, allowed = plan or decode_plan(block_tables, table_start, seq_lens, window, block_size, slots // block_size,
                                        zero_slot)
    S = read.shape[1]
    qh = q.view(N, kv, n // kv, 1, D).permute(1, 0, 2, 3, 4)                                      # [k, N, g, 1, D]
    kh, vh = (x.index_select(1, read.flatten()).view(kv, N, S, D) for x in (k_heads, v_heads))   # [k, N, S, D]
    if zero_slot is None:       # zero the keys not seen: a stale slot's inf/nan must not leak through 0 * nan
        kh, vh = (torch.where(allowed[:, :, None], x, 0) for x in (kh, vh))
    if q.dtype == torch.float32:                                 # a 16-bit cache under fp32 queries: upcast keys
        kh, vh = kh.float(), vh.float()
    o = sink_attention_heads(qh, kh, vh, sinks, mask_bias(allowed[:, None]), sm_scale)           # [k, N, g, 1, D]
    return o.permute(1, 0, 2, 3, 4).reshape(N, n, D)


def decode_attention_triton(q, k_heads, v_heads, block_tables, table_start, seq_lens, sinks, window, sm_scale,
                            block_size, num_splits: int | None = None, keys_per_tile: int = 64):
    """The kernel: one program per (sequence, KV head, split) attends its g query heads over the split's keys.

    num_splits P > 1 (flash-decoding) cuts each sequence's visible keys into P ranges whose partial softmax states
    a second kernel merges with the sink; None picks P from the shapes alone (so CUDA-graph replays stay valid).
    keys_per_tile KT: keys loaded per loop step (a power of 2, >= 16)."""
    (N, n, D), kv, M = q.shape, k_heads.shape[0], block_tables.shape[1]
    g = n // kv
    if keys_per_tile < 16 or keys_per_tile & (keys_per_tile - 1):
        raise ValueError(f"keys_per_tile must be a power of 2 >= 16, got {keys_per_tile}")
    P = num_splits or _pick_splits(N * kv, M * block_size, keys_per_tile, q.device)
    q, k_heads, v_heads = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k_heads, v_heads))
    block_tables = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
    table_start, seq_lens, sinks = table_start.contiguous(), seq_lens.contiguous(), sinks.contiguous()
    o = torch.empty(N, n, D, dtype=q.dtype, device=q.device)                                      # [N, n, D]
    if P == 1:
        part_o = part_m = part_l = o                                                              # unused
    else:
        part_o = torch.empty(N, n, P, D, dtype=torch.float32, device=q.device)                   # [N, n, P, D]
        part_m = torch.empty(N, n, P, dtype=torch.float32, device=q.device)                      # [N, n, P]
        part_l = torch.empty_like(part_m)
    # CPU tensors reach the kernel only in Triton's interpreter, whose bf16 tl.dot multiplies the raw uint16 bits
    # (triton 3.9): there, and whenever q and the cache differ in dtype, the dots run on fp32 operands.
    dot_fp32 = (not q.is_cuda) or q.dtype != k_heads.dtype or q.dtype == torch.float32
    _decode_kernel[(N, kv, P)](
        q, k_heads, v_heads, block_tables, table_start, seq_lens, sinks, o, part_o, part_m, part_l,
        float(sm_scale), NO_WINDOW if window is None else int(window), k_heads.shape[1] // block_size, M,
        q.stride(0), q.stride(1), k_heads.stride(0), k_heads.stride(1), v_heads.stride(0), v_heads.stride(1),
        block_tables.stride(0),
        G=g, D=D, B=block_size, G_PAD=max(16, triton.next_power_of_2(g)),
        D_PAD=max(16, triton.next_power_of_2(D)), KT=keys_per_tile, P=P, DOT_FP32=dot_fp32, num_warps=4)
    if P > 1:
        _combine_kernel[(N, n)](part_o, part_m, part_l, sinks, o, P=P,
                                P_PAD=triton.next_power_of_2(P), D=D, D_PAD=triton.next_power_of_2(D))
    return o


def _pick_splits(programs: int, max_keys: int, keys_per_tile: int, device: torch.device) -> int:
    """Splits so that about two programs run per SM, each split keeping >= 4 tiles of the widest table; a power
    of 2 (P is a compile-time constant: at most 7 kernel variants as the table widens)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    by_work = triton.cdiv(max_keys, 4 * keys_per_tile)
    want = max(1, min(triton.cdiv(2 * sms, programs), by_work, 64))
    return 1 << (want.bit_length() - 1)


if KERNEL_AVAILABLE:
    from model.triton_support import online_softmax_step

    @triton.jit
    def _decode_kernel(q_ptr, k_ptr, v_ptr, table_ptr, start_ptr, len_ptr, sinks_ptr, o_ptr,
                       part_o_ptr, part_m_ptr, part_l_ptr, sm_scale, window, num_blocks, M,
                       stride_qn, stride_qh, stride_kh, stride_ks, stride_vh, stride_vs, stride_tn,
                       G: tl.constexpr, D: tl.constexpr, B: tl.constexpr, G_PAD: tl.constexpr,
                       D_PAD: tl.constexpr, KT: tl.constexpr, P: tl.constexpr, DOT_FP32: tl.constexpr):
        """Online softmax over tiles of KT keys, started from the sink: m = sink, l = 0 (the sink's own
        exp(sink - m) is added once at the end, or by the combine kernel when P > 1)."""
        seq, kv, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        j = tl.arange(0, G_PAD)                                                    # [G_PAD] head in group
        d = tl.arange(0, D_PAD)                                                    # [D_PAD]
        hmask, dmask = j < G, d < D
        heads = kv * G + j
        q = tl.load(q_ptr + seq * stride_qn + heads[:, None] * stride_qh + d[None, :],
                    mask=hmask[:, None] & dmask[None, :], other=0.0)               # [G_PAD, D_PAD]
        if DOT_FP32:
            q = q.to(tl.float32)
        sink = tl.load(sinks_ptr + heads, mask=hmask, other=0.0).to(tl.float32)    # [G_PAD]
        m, l = sink, tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], tl.float32)

        L = tl.load(len_ptr + seq)
        lo = tl.maximum(L - window, 0)                                             # first visible key
        first_tile = lo // KT
        per_split = tl.cdiv(tl.cdiv(L, KT) - first_tile, P)
        t_begin = first_tile + split * per_split
        t_end = tl.minimum(t_begin + per_split, tl.cdiv(L, KT))
        table_row = table_ptr + seq * stride_tn
        col0 = tl.load(start_ptr + seq)
        k_head = k_ptr + kv.to(tl.int64) * stride_kh                              # int64: kv * stride may pass 2**31
        v_head = v_ptr + kv.to(tl.int64) * stride_vh
        for t in range(t_begin, t_end):
            pos = t * KT + tl.arange(0, KT)                                        # [KT] key positions
            col = pos // B - col0
            ok = (pos >= lo) & (pos < L) & (col >= 0) & (col < M)
            bid = tl.load(table_row + col, mask=ok, other=-1)
            ok &= (bid >= 0) & (bid < num_blocks)
            slot = (tl.where(ok, bid, 0) * B + pos % B).to(tl.int64)
            kt = tl.load(k_head + slot[None, :] * stride_ks + d[:, None],
                         mask=ok[None, :] & dmask[:, None], other=0.0)             # [D_PAD, KT]
            if DOT_FP32:
                s = tl.dot(q, kt.to(tl.float32), input_precision="ieee")
            else:
                s = tl.dot(q, kt)
            s = tl.where(ok[None, :], s * sm_scale, float("-inf"))                 # [G_PAD, KT]
            v = tl.load(v_head + slot[:, None] * stride_vs + d[None, :],
                        mask=ok[:, None] & dmask[None, :], other=0.0)              # [KT, D_PAD]
            m, l, acc = online_softmax_step(s, v, m, l, acc, DOT_FP32)

        out_mask = hmask[:, None] & dmask[None, :]
        row = seq * G * tl.num_programs(1) + heads                                 # [G_PAD] index into N * n
        if P == 1:
            o = acc / (l + tl.exp(sink - m))[:, None]
            tl.store(o_ptr + row[:, None] * D + d[None, :], o.to(o_ptr.dtype.element_ty), mask=out_mask)
        else:
            tl.store(part_o_ptr + (row[:, None] * P + split) * D + d[None, :], acc, mask=out_mask)
            tl.store(part_m_ptr + row * P + split, m, mask=hmask)
            tl.store(part_l_ptr + row * P + split, l, mask=hmask)

    @triton.jit
    def _combine_kernel(part_o_ptr, part_m_ptr, part_l_ptr, sinks_ptr, o_ptr,
                        P: tl.constexpr, P_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr):
        """Merge P partial states of one (sequence, query head) and add the sink once."""
        seq, head = tl.program_id(0), tl.program_id(1)
        row = seq * tl.num_programs(1) + head
        s, d = tl.arange(0, P_PAD), tl.arange(0, D_PAD)
        smask, dmask = s < P, d < D
        m = tl.load(part_m_ptr + row * P + s, mask=smask, other=float("-inf"))    # [P_PAD], each >= sink
        l = tl.load(part_l_ptr + row * P + s, mask=smask, other=0.0)
        acc = tl.load(part_o_ptr + (row * P + s[:, None]) * D + d[None, :],
                      mask=smask[:, None] & dmask[None, :], other=0.0)             # [P_PAD, D_PAD]
        sink = tl.load(sinks_ptr + head).to(tl.float32)
        m_all = tl.maximum(tl.max(m, 0), sink)
        w = tl.exp(m - m_all)                                                      # [P_PAD]; 0 for padding
        denom = tl.sum(l * w, 0) + tl.exp(sink - m_all)
        o = tl.sum(acc * w[:, None], 0) / denom                                    # [D_PAD]
        tl.store(o_ptr + row * D + d, o.to(o_ptr.dtype.element_ty), mask=dmask)
