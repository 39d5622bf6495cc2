"""RowLayout: the dispatch rows of the fixed-capacity EP path, a token's hidden state with its routing riding along.

One row per token as bytes: hidden [H] in the activation dtype, then its K physical slot ids (int32, -1 on padding
rows) and K routing weights (fp32), bit for bit, so one all-to-all carries tokens and routing together whatever the
dtype. A rank sends the same block of C rows to every rank (C = the step's agreed rows per rank, its T tokens first,
then padding); a receiver turns the ep*C rows into (hidden, local slot ids, weights), where a pair whose slot lives
on another rank, and every padding pair, gets the id S (not held: it computes nothing). Shapes follow from (C, ep, H,
K) only: no host sync, capturable in a CUDA graph.
Legend: T=tokens, C=rows per rank, K=top-k, H=hidden, S=slots per rank, N=ep*C rows received, B=bytes per row.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

ALIGN = 16                   # bytes: rows start aligned for vectorised copies


@dataclass(frozen=True)
class RowLayout:
    hidden: int
    top_k: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if self.hidden_bytes % 4:
            raise ValueError(f"hidden {self.hidden} in {self.dtype} is not a whole number of 4-byte words")

    @property
    def hidden_bytes(self) -> int:
        return self.hidden * torch.empty((), dtype=self.dtype).element_size()

    @property
    def row_bytes(self) -> int:
        used = self.hidden_bytes + 8 * self.top_k
        return -(-used // ALIGN) * ALIGN

    def pack(self, t: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, capacity: int,
             ep_size: int) -> torch.Tensor:
        """t [T, H], slots [T, K] physical, weights [T, K] -> the send buffer uint8 [ep*C, B]: the same C rows for
        every rank."""
        T, pad = t.shape[0], capacity - t.shape[0]
        hidden = t.contiguous().view(torch.uint8)                                        # [T, H bytes]
        ids = slots.to(torch.int32).contiguous().view(torch.uint8)                       # [T, 4K]
        w = weights.to(torch.float32).contiguous().view(torch.uint8)                     # [T, 4K]
        tail = self.row_bytes - self.hidden_bytes - 8 * self.top_k
        rows = torch.cat([hidden, ids, w, hidden.new_zeros(T, tail)], dim=1)             # [T, B]
        rows = F.pad(rows, (0, 0, 0, pad), value=0)                                      # [C, B]
        lo = self.hidden_bytes
        rows[T:, lo:lo + 4 * self.top_k] = 255                                           # padding slots: -1
        return rows.repeat(ep_size, 1)                                                   # [ep*C, B]

    def unpack(self, recv: torch.Tensor, first_slot: int, num_slots: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """recv uint8 [N, B] -> (hidden [N, H] (a strided view), local slot ids [N, K] int64 in [0, S], S = not
        held here, weights [N, K] fp32)."""
        lo, K = self.hidden_bytes, self.top_k
        hidden = recv[:, :lo].view(self.dtype)                                           # [N, H]
        slot = recv[:, lo:lo + 4 * K].view(torch.int32).long() - first_slot              # [N, K]
        local = torch.where((slot >= 0) & (slot < num_slots), slot, num_slots)          # [N, K]
        weights = recv[:, lo + 4 * K:lo + 8 * K].view(torch.float32)                     # [N, K]
        return hidden, local, weights


def sum_partials(back: torch.Tensor, ep_size: int, num_tokens: int) -> torch.Tensor:
    """back [ep*C, H]: each rank's weighted sum over the pairs it held, for this rank's C rows -> [T, H], summed
    in fp32 (a rank that held none of a token's pairs adds exactly 0)."""
    partials = back.view(ep_size, -1, back.shape[1])[:, :num_tokens]                     # [ep, T, H]
    return partials.float().sum(dim=0).to(back.dtype)
