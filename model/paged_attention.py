"""Paged KV cache and the attention backend that reads it: sinks and sliding window over fixed-size blocks.

Two KV groups: full-attention layers keep every position, sliding-window layers only the blocks that the window
can still reach (the block manager in engine/ recycles the rest). Block tables and slots come from the engine as
plain lists; this module never decides which block holds what.
Legend: N=sequences in the step, Q=max query tokens of one sequence, S=max keys of one sequence, T=step tokens,
B=block size, n=query heads, k=KV heads, D=head_dim.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from model.attention import sink_attention
from model.config import ModelConfig

FULL, SLIDING = "full", "sliding"


@dataclass(frozen=True)
class SeqSpan:
    """One sequence's share of a step: query positions [start, start + num_tokens), block table per group."""
    start: int
    num_tokens: int
    block_tables: dict[str, list[int]]


class PagedKVCache:
    """Per layer a key and a value tensor [num_blocks(group), B, k, D]; layer l lives in its group's pool."""

    def __init__(self, config: ModelConfig, num_blocks: dict[str, int], block_size: int, dtype: torch.dtype,
                 device: torch.device | str):
        self.block_size = block_size
        self.groups = [SLIDING if config.is_sliding(i) else FULL for i in range(config.num_hidden_layers)]
        self.windows = [config.window(i) for i in range(config.num_hidden_layers)]
        shape = (config.num_key_value_heads, config.head_dim)
        self.k = [torch.zeros(num_blocks[g], block_size, *shape, dtype=dtype, device=device) for g in self.groups]
        self.v = [torch.zeros_like(t) for t in self.k]

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype, group: str) -> int:
        """Bytes one block id costs in a group: K and V in every layer of that group."""
        layers = sum((SLIDING if config.is_sliding(i) else FULL) == group for i in range(config.num_hidden_layers))
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * layers * block_size * config.num_key_value_heads * config.head_dim * elem


class PagedMetadata:
    """The step's view of the cache: slots to write, keys each sequence reads, and the masks (built once per
    step and group, shared by every layer of the group)."""

    def __init__(self, cache: PagedKVCache, spans: list[SeqSpan], device: torch.device | str):
        self.cache = cache
        B = cache.block_size
        self.positions = torch.tensor([p for s in spans for p in range(s.start, s.start + s.num_tokens)],
                                      device=device)                                       # [T]
        Q = max(s.num_tokens for s in spans)
        rows = [list(range(off, off + s.num_tokens)) for off, s in zip(_offsets(spans), spans)]
        self.q_index = torch.tensor([r + [0] * (Q - len(r)) for r in rows], device=device)     # [N, Q]
        self.q_valid = torch.tensor([[True] * len(r) + [False] * (Q - len(r)) for r in rows], device=device)
        q_pos = torch.tensor([[s.start + j for j in range(Q)] for s in spans], device=device)  # [N, Q]
        self._groups = {}
        for group, window in {(g, w) for g, w in zip(cache.groups, cache.windows)}:
            self._groups[group] = self._group_view(spans, group, window, q_pos, B, device)

    @staticmethod
    def _group_view(spans, group, window, q_pos, B, device):
        """(write slots [T], read slots [N, S], allowed [N, Q, S]) for one KV group."""
        write, reads, key_pos = [], [], []
        for s in spans:
            table = s.block_tables[group]
            end = s.start + s.num_tokens
            lo = 0 if window is None else max(0, s.start - window + 1)       # first key the chunk can see
            write += [table[p // B] * B + p % B for p in range(s.start, end)]
            reads.append([table[p // B] * B + p % B for p in range(lo, end)])
            key_pos.append(list(range(lo, end)))
        S = max(len(r) for r in reads)
        read = torch.tensor([r + [0] * (S - len(r)) for r in reads], device=device)          # [N, S]
        kpos = torch.tensor([p + [0] * (S - len(p)) for p in key_pos], device=device)        # [N, S]
        kvalid = torch.tensor([[True] * len(p) + [False] * (S - len(p)) for p in key_pos], device=device)
        diff = q_pos[:, :, None] - kpos[:, None, :]                                          # [N, Q, S]
        allowed = (diff >= 0) & kvalid[:, None, :]
        if window is not None:
            allowed &= diff < window
        return torch.tensor(write, device=device), read, allowed

    def attend(self, layer_idx, q, k, v, sinks, window, sm_scale):
        """Write this step's k/v into the layer's cache, then attend each sequence over its cached keys."""
        write, read, allowed = self._groups[self.cache.groups[layer_idx]]
        k_cache = self.cache.k[layer_idx].flatten(0, 1)                                       # [blocks*B, k, D]
        v_cache = self.cache.v[layer_idx].flatten(0, 1)
        k_cache.index_copy_(0, write, k.to(k_cache.dtype))
        v_cache.index_copy_(0, write, v.to(v_cache.dtype))
        o = sink_attention(q[self.q_index], k_cache[read], v_cache[read], sinks, allowed, sm_scale)  # [N, Q, n, D]
        return o[self.q_valid]                                                                 # [T, n, D]


def _offsets(spans: list[SeqSpan]) -> list[int]:
    out, total = [], 0
    for s in spans:
        out.append(total)
        total += s.num_tokens
    return out
