"""Paged KV cache and the attention backend that reads it: sinks and sliding window over fixed-size blocks.

Two KV groups: full-attention layers keep every position, sliding-window layers only the blocks that the window
can still reach (the block manager in engine/ recycles the rest). Block tables and slots come from the engine as
plain lists; this module never decides which block holds what.
Legend: N=sequences in a part of the step, Q=max query tokens of one sequence, S=max keys of one sequence,
T=step tokens, B=block size, n=query heads, k=KV heads, g=n/k, D=head_dim.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.attention import mask_bias, sink_attention_heads
from model.config import ModelConfig
from model.prefill_attention import KERNEL_AVAILABLE, paged_prefill_attention

FULL, SLIDING = "full", "sliding"


@dataclass(frozen=True)
class SeqSpan:
    """One sequence's share of a step: query positions [start, start + num_tokens), block table per group."""
    start: int
    num_tokens: int
    block_tables: dict[str, list[int]]


class PagedKVCache:
    """Per layer a key and a value tensor [num_blocks(group), B, k, D]; layer l lives in its group's pool.

    The memory is KV-head-major (`k_heads`/`v_heads`: [k, num_blocks * B, D]), so the keys of a batch of sequences
    gather straight into the [k, N, S, D] layout the attention matmuls read; `k`/`v` are views of the same memory
    indexed by block.
    """

    def __init__(self, config: ModelConfig, num_blocks: dict[str, int], block_size: int, dtype: torch.dtype,
                 device: torch.device | str):
        self.block_size = block_size
        self.groups = [SLIDING if config.is_sliding(i) else FULL for i in range(config.num_hidden_layers)]
        self.windows = [config.window(i) for i in range(config.num_hidden_layers)]
        self.num_blocks = dict(num_blocks)
        kv, D = config.num_key_value_heads, config.head_dim
        # Two blocks past each pool's last: a scratch block that padding rows of a fixed-size (CUDA-graph) decode
        # write, and a block of zeros nothing writes, which the torch decode path reads for keys it masks out.
        self.k_heads = [torch.zeros(kv, (num_blocks[g] + 2) * block_size, D, dtype=dtype, device=device)
                        for g in self.groups]                                                  # [k, slots, D]
        self.v_heads = [torch.zeros_like(t) for t in self.k_heads]
        self.k = [t.view(kv, num_blocks[g] + 2, block_size, D).permute(1, 2, 0, 3)[:num_blocks[g]]
                  for t, g in zip(self.k_heads, self.groups)]                                  # [blocks, B, k, D]
        self.v = [t.view(kv, num_blocks[g] + 2, block_size, D).permute(1, 2, 0, 3)[:num_blocks[g]]
                  for t, g in zip(self.v_heads, self.groups)]

    def scratch_slot(self, group: str) -> int:
        """A slot no block id maps to: where padding rows write their (ignored) keys and values."""
        return self.num_blocks[group] * self.block_size

    def zero_slot(self, group: str) -> int:
        """A slot that always holds zeros (no block id maps to it, nothing writes it)."""
        return (self.num_blocks[group] + 1) * self.block_size

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype, group: str) -> int:
        """Bytes one block id costs in a group: K and V in every layer of that group."""
        layers = sum((SLIDING if config.is_sliding(i) else FULL) == group for i in range(config.num_hidden_layers))
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * layers * block_size * config.num_key_value_heads * config.head_dim * elem


class _Part:
    """Sequences of a step attended together: decodes (one query each) or prefill chunks (padded to Q queries).

    rows [N, Q]: the step's token row of each query (padding repeats row 0); None when the part is the whole step
    with as many queries in every sequence (a decode-only step: no gather, no scatter). valid [N, Q] marks real
    queries. keys[group] = (read slots [N, S], additive mask [N, Q, S]: 0 where the query sees the key, -inf not).
    """

    def __init__(self, spans: list[SeqSpan], first_rows: list[int], cache: PagedKVCache, device, is_step: bool):
        num = torch.tensor([s.num_tokens for s in spans], device=device)                        # [N]
        Q = max(s.num_tokens for s in spans)
        whole = is_step and all(s.num_tokens == Q for s in spans)
        j = torch.arange(Q, device=device)                                                      # [Q]
        self.valid = j < num[:, None]                                                           # [N, Q]
        self.rows = self.out_rows = self.keep = None
        if not whole:
            rows = torch.tensor(first_rows, device=device)[:, None] + j                         # [N, Q]
            self.rows = torch.where(self.valid, rows, 0)                                        # [N, Q]
            # Real queries' indices, from the host's lists (a boolean mask would read back to the host).
            keep = [i * Q + q for i, s in enumerate(spans) for q in range(s.num_tokens)]
            self.keep = torch.tensor(keep, device=device)                                       # [R] into N*Q
            self.out_rows = torch.tensor([r + q for r, s in zip(first_rows, spans) for q in range(s.num_tokens)],
                                         device=device)                                         # [R]
        self.q_pos = torch.tensor([s.start for s in spans], device=device)[:, None] + j        # [N, Q]
        B = cache.block_size
        self.keys = {g: _keys(spans, g, w, self.q_pos, B, device)
                     for g, w in set(zip(cache.groups, cache.windows))}


def _keys(spans: list[SeqSpan], group: str, window: int | None, q_pos: torch.Tensor, B: int, device):
    """(read slots [N, S], mask [N, Q, S]) of one KV group: each sequence reads keys lo .. end-1, where lo is the
    first key its first query can see; padded keys repeat the last real one and are masked out."""
    lo = [0 if window is None else max(0, s.start - window + 1) for s in spans]
    end = [s.start + s.num_tokens for s in spans]
    first = [p // B for p in lo]
    nb = max((e - 1) // B - f + 1 for e, f in zip(end, first))
    tables = [s.block_tables[group][f:f + nb] for s, f in zip(spans, first)]
    table = torch.tensor([t + [0] * (nb - len(t)) for t in tables], device=device)             # [N, nb] from `first`
    lo_t, end_t = torch.tensor(lo, device=device)[:, None], torch.tensor(end, device=device)[:, None]
    kpos = lo_t + torch.arange(max(e - p for p, e in zip(lo, end)), device=device)              # [N, S]
    valid = kpos < end_t
    kpos = torch.minimum(kpos, end_t - 1)
    block = torch.div(kpos, B, rounding_mode="floor") - torch.div(lo_t, B, rounding_mode="floor")
    read = table.gather(1, block) * B + kpos % B                                                # [N, S]
    diff = q_pos[:, :, None] - kpos[:, None, :]                                                 # [N, Q, S]
    allowed = (diff >= 0) & valid[:, None, :]
    if window is not None:
        allowed &= diff < window
    return read, mask_bias(allowed)


def _kernel_indices(spans: list[SeqSpan], firsts: list[int], cache: PagedKVCache, device):
    """The kernel's per-step indices from the host's lists in one host-to-device copy: (q_start, q_len, ctx_start),
    each [N], and per group the block tables [N, M] from column 0, M = blocks up to the last query (-1 past a list).
    Written through numpy, so only the blocks in use cross from Python lists."""
    B, N = cache.block_size, len(spans)
    M = max(-(-(s.start + s.num_tokens) // B) for s in spans)
    groups = sorted(set(cache.groups))
    host = np.full(3 * N + len(groups) * N * M, -1, dtype=np.int32)
    host[:3 * N] = firsts + [s.num_tokens for s in spans] + [s.start for s in spans]
    for i, g in enumerate(groups):
        table = host[3 * N + i * N * M:3 * N + (i + 1) * N * M].reshape(N, M)
        for row, s in zip(table, spans):
            blocks = s.block_tables[g][:M]
            row[:len(blocks)] = blocks
    buf = torch.from_numpy(host).to(device)
    tables = {g: buf[3 * N + i * N * M:3 * N + (i + 1) * N * M].view(N, M) for i, g in enumerate(groups)}
    return (buf[:N], buf[N:2 * N], buf[2 * N:3 * N]), tables                                   # [N] x 3, [N, M]


class PagedMetadata:
    """The step's view of the cache: slots to write, keys each sequence reads, and the masks (built once per
    step and group with a few tensor ops, shared by every layer of the group).

    impl "triton" (default for CUDA when triton imports; CPU tensors need TRITON_INTERPRET=1): every sequence of the
    step, decodes included (a chunk of one query), attends in one flash-attention kernel call per layer that
    never materialises scores (model/prefill_attention.py). impl "torch" (default elsewhere): decodes and prefill
    chunks attend as separate gathered parts, so a long chunk never pads the decodes' queries.
    """

    def __init__(self, cache: PagedKVCache, spans: list[SeqSpan], device: torch.device | str,
                 impl: str | None = None):
        self.cache = cache
        B = cache.block_size
        if impl is None:
            impl = "triton" if KERNEL_AVAILABLE and torch.device(device).type == "cuda" else "torch"
        if impl not in ("triton", "torch"):
            raise ValueError(f"PagedMetadata: impl must be 'triton', 'torch' or None, got {impl!r}")
        self.impl = impl
        firsts, row = [], 0
        for s in spans:
            firsts.append(row)
            row += s.num_tokens
        self.positions = torch.tensor([p for s in spans for p in range(s.start, s.start + s.num_tokens)],
                                      device=device)                                           # [T]
        self._write = {g: torch.tensor([s.block_tables[g][p // B] * B + p % B for s in spans
                                        for p in range(s.start, s.start + s.num_tokens)], device=device)
                       for g in set(cache.groups)}                                              # [T] per group
        self._parts: list[_Part] = []
        if impl == "triton":
            self._seqs, self._tables = _kernel_indices(spans, firsts, cache, device)
            return
        decodes = [i for i, s in enumerate(spans) if s.num_tokens == 1]
        chunks = [i for i, s in enumerate(spans) if s.num_tokens > 1]
        self._parts = [_Part([spans[i] for i in idx], [firsts[i] for i in idx], cache, device,
                             is_step=len(idx) == len(spans)) for idx in (decodes, chunks) if idx]

    def attend(self, layer_idx, q, k, v, sinks, window, sm_scale):
        """Write this step's k/v into the layer's cache, then attend each sequence over its cached keys."""
        group = self.cache.groups[layer_idx]
        k_heads, v_heads = self.cache.k_heads[layer_idx], self.cache.v_heads[layer_idx]          # [k, slots, D]
        k_heads.index_copy_(1, self._write[group], k.transpose(0, 1).to(k_heads.dtype))
        v_heads.index_copy_(1, self._write[group], v.transpose(0, 1).to(v_heads.dtype))
        if self.impl == "triton":
            return paged_prefill_attention(q, k_heads, v_heads, self._tables[group], *self._seqs, sinks, window,
                                           sm_scale, self.cache.block_size, impl="triton")      # [T, n, D]
        if len(self._parts) == 1 and self._parts[0].rows is None:
            return self._attend_part(self._parts[0], group, q, k_heads, v_heads, sinks, sm_scale)
        o = torch.empty_like(q)                                                                 # [T, n, D]
        for part in self._parts:
            o.index_copy_(0, part.out_rows, self._attend_part(part, group, q, k_heads, v_heads, sinks, sm_scale))
        return o

    @staticmethod
    def _attend_part(part: _Part, group, q, k_heads, v_heads, sinks, sm_scale) -> torch.Tensor:
        """q [T, n, D] of the whole step -> o [R, n, D] of the part's real queries, in part order."""
        read, bias = part.keys[group]
        (N, Q), (kv, _, D), n = part.valid.shape, k_heads.shape, q.shape[1]
        qp = q if part.rows is None else q.index_select(0, part.rows.flatten())                 # [N*Q, n, D]
        qh = qp.view(N, Q, kv, n // kv, D).permute(2, 0, 3, 1, 4)                               # [k, N, g, Q, D]
        kh = k_heads.index_select(1, read.flatten()).view(kv, N, -1, D)                          # [k, N, S, D]
        vh = v_heads.index_select(1, read.flatten()).view(kv, N, -1, D)
        o = sink_attention_heads(qh, kh, vh, sinks, bias, sm_scale)                             # [k, N, g, Q, D]
        o = o.permute(1, 3, 0, 2, 4).reshape(N * Q, n, D)                                       # [N*Q, n, D]
        return o if part.rows is None else o.index_select(0, part.keep)
