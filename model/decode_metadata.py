"""DecodeMetadata: the attention metadata of a decode-only step (one new token per sequence) with static shapes.

Every index the step needs (input ids, positions, KV write slots, the block-table columns each layer group reads,
key counts) lives in one int64 device buffer filled by one host-to-device copy (through pinned memory on CUDA, so
the copy does not block the host). Shapes depend only on (rows, table columns), never on the data, and nothing
in `attend` reads a value back to the host, so a decode forward over this metadata can be captured in a CUDA graph
and replayed with new contents (engine/decode_graphs.py). Rows past the step's sequences are padding: they read no
keys (seq_len 0) and write their keys to the cache's scratch slot.
Legend: N=rows (sequences + padding), M=block-table columns of a group, B=block size, n=query heads, D=head_dim.
"""
from __future__ import annotations

import numpy as np
import torch

from model.decode_attention import KERNEL_AVAILABLE, decode_plan, paged_decode_attention
from model.paged_attention import SLIDING, PagedKVCache, SeqSpan


def table_columns(cache: PagedKVCache, max_len: int) -> dict[str, int]:
    """Block-table columns each group needs for queries at positions < max_len: a full-attention layer reads
    every block up to the query, a sliding one at most the blocks its window spans (from `table_start`)."""
    B, cols = cache.block_size, {}
    for group, window in zip(cache.groups, cache.windows):
        span = min(max_len, window) if group == SLIDING and window is not None else max_len
        cols[group] = max(1, (span + B - 2) // B + 1) if group == SLIDING else max(1, -(-max_len // B))
    return cols


class DecodeMetadata:
    """Static buffers for `num_rows` decode rows; `fill` writes a step into them, `attend` is the
    `AttentionMetadata` seam (model/attention.py)."""

    def __init__(self, cache: PagedKVCache, num_rows: int, columns: dict[str, int], device: torch.device | str):
        self.cache, self.num_rows, self.columns = cache, num_rows, dict(columns)
        self.device = torch.device(device)
        self.impl = "triton" if KERNEL_AVAILABLE and self.device.type == "cuda" else "torch"
        self._plans: dict = {}                      # torch path: (group, window) -> decode_plan, per fill
        self.groups = sorted(set(cache.groups))
        N = num_rows
        sizes = [("input_ids", N), ("positions", N), ("seq_lens", N)]
        for g in self.groups:
            sizes += [(f"write.{g}", N), (f"start.{g}", N), (f"tables.{g}", N * columns[g])]
        self.buffer = torch.zeros(sum(n for _, n in sizes), dtype=torch.long, device=self.device)     # [F]
        self._host = (self.buffer if self.device.type != "cuda"
                      else torch.zeros(self.buffer.shape, dtype=torch.long, pin_memory=True))    # staging, pinned
        self._host_np = self._host.numpy()
        views, at = {}, 0
        for name, n in sizes:
            views[name], at = (at, n), at + n
        self._layout = views
        view = lambda name: self.buffer[views[name][0]:views[name][0] + views[name][1]]     # noqa: E731
        self.input_ids, self.positions, self.seq_lens = view("input_ids"), view("positions"), view("seq_lens")
        self.write = {g: view(f"write.{g}") for g in self.groups}                                   # [N]
        self.table_start = {g: view(f"start.{g}") for g in self.groups}                             # [N]
        self.tables = {g: view(f"tables.{g}").view(N, columns[g]) for g in self.groups}              # [N, M]

    @classmethod
    def for_step(cls, cache: PagedKVCache, spans: list[SeqSpan], token_ids: list[int],
                 device: torch.device | str) -> DecodeMetadata:
        """Buffers sized to this step alone (eager decode: no padding, columns up to the longest sequence)."""
        metadata = cls(cache, len(spans), table_columns(cache, max(s.start + 1 for s in spans)), device)
        metadata.fill(spans, token_ids)
        return metadata

    def fill(self, spans: list[SeqSpan], token_ids: list[int]) -> None:
        """Write a step's rows (spans of one token each, in row order) and pad the rest; one host-to-device copy.
        Written through numpy: only the blocks sequences use cross from Python lists (64 rows x 2,048 columns, the
        tables of max_model_len 32k: 0.6 ms a step, 17 ms through torch.tensor of the padded lists).

        The pinned staging buffer is reused: the caller must have synchronised with the previous step's copy
        (the engine does, reading the sampled tokens back) before filling again.
        """
        if len(spans) > self.num_rows or any(s.num_tokens != 1 for s in spans):
            raise ValueError(f"DecodeMetadata holds {self.num_rows} single-token rows, got "
                             f"{[s.num_tokens for s in spans]}")
        B, n = self.cache.block_size, len(spans)
        host = self._host_np                                      # numpy view of the staging (or CPU) buffer
        host.fill(0)
        field = lambda name: host[self._layout[name][0]:sum(self._layout[name])]        # noqa: E731
        field("input_ids")[:n] = token_ids
        field("positions")[:n] = [s.start for s in spans]
        field("seq_lens")[:n] = [s.start + 1 for s in spans]               # padding rows: 0 keys, zero output
        for g, window in {g: w for g, w in zip(self.cache.groups, self.cache.windows)}.items():
            M = self.columns[g]
            starts = [0 if g != SLIDING or window is None else max(0, s.start + 1 - window) // B for s in spans]
            write = field(f"write.{g}")
            write[:n] = [s.block_tables[g][s.start // B] * B + s.start % B for s in spans]
            write[n:] = self.cache.scratch_slot(g)                        # padding rows write the scratch slot
            field(f"start.{g}")[:n] = starts
            tables = field(f"tables.{g}").reshape(self.num_rows, M)
            for i, (s, first) in enumerate(zip(spans, starts)):          # only the blocks in use cross from Python
                row = s.block_tables[g][first:first + M]
                tables[i, :len(row)] = row
            np.maximum(tables, 0, out=tables)                             # NULL_BLOCK (recycled) -> 0, never read
        self._plans.clear()
        if self._host is not self.buffer:
            self.buffer.copy_(self._host, non_blocking=True)

    def attend(self, layer_idx, q, k, v, sinks, window, sm_scale):
        """Write the rows' k/v into the layer's cache (padding -> scratch slot), then decode attention."""
        group = self.cache.groups[layer_idx]
        k_heads, v_heads = self.cache.k_heads[layer_idx], self.cache.v_heads[layer_idx]          # [k, slots, D]
        k_heads.index_copy_(1, self.write[group], k.transpose(0, 1).to(k_heads.dtype))
        v_heads.index_copy_(1, self.write[group], v.transpose(0, 1).to(v_heads.dtype))
        args = (self.tables[group], self.table_start[group], self.seq_lens)
        plan = None
        if self.impl == "torch":                    # masks and read slots once per group, not once per layer
            if (group, window) not in self._plans:
                B = self.cache.block_size
                self._plans[group, window] = decode_plan(*args, window, B, k_heads.shape[1] // B,
                                                         self.cache.zero_slot(group))
            plan = self._plans[group, window]
        return paged_decode_attention(q, k_heads, v_heads, *args, sinks, window, sm_scale, self.cache.block_size,
                                      impl=self.impl, plan=plan, zero_slot=self.cache.zero_slot(group))
