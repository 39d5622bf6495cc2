"""EPExperts: the expert backend of one expert-parallel rank (the seam in model/moe.py).

Per MoE layer and step: choose a physical replica per (token, expert) from the placement -> all-to-all dispatch
with uneven splits -> grouped expert MLP over this rank's slots -> all-to-all combine -> weighted sum at the
source. A rank with no tokens still joins both collectives. Knows nothing of Ray; the placement is given.
Legend: T=tokens on this rank, K=top-k, P=T*K pairs, R=pairs received, S=slots per rank, H=hidden, I=intermediate.
"""
from __future__ import annotations

import time

import torch

from torch import nn

from model.config import ModelConfig
from model.moe import LocalExperts
from model.packed_experts import PackedMXFP4Experts


class EPStats:
    """Shared by every layer of a rank: token counts per (layer, logical expert) and all-to-all time (the dispatch
    and combine collectives only, not the expert MLP between them). On CUDA the collectives run asynchronously, so
    they are timed with CUDA events on the stream (no host sync on the step path), read in `take` after the step,
    whose sampled-token read-back has already waited for them; on CPU with the host clock."""

    def __init__(self, num_layers: int, num_experts: int, device: torch.device | str):
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.long, device=device)  # [L, E]
        self.all_to_all_s = 0.0
        self._events: list = []                 # CUDA: (start, end) event pairs of this step

    @staticmethod
    def mark(device: torch.device):
        """A point in time on `device`'s stream: a recorded CUDA event, or perf_counter on CPU."""
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def add(self, start, end) -> None:
        if isinstance(start, float):
            self.all_to_all_s += end - start
        else:
            self._events.append((start, end))

    def take(self) -> tuple[torch.Tensor, float]:
        for start, end in self._events:
            end.synchronize()                   # long done: the step's outputs were read back after it
            self.all_to_all_s += start.elapsed_time(end) / 1e3
        counts, seconds = self.counts.clone(), self.all_to_all_s
        self.counts.zero_()
        self.all_to_all_s, self._events = 0.0, []
        return counts, seconds


class EPExperts(nn.Module):
    """This rank's S expert slots of one layer, held by a local backend indexed by slot: dense (LocalExperts, grouped
    GEMM where available) or packed MXFP4 (PackedMXFP4Experts: 17/32 byte per weight, the fused kernel on CUDA).
    Which logical expert a slot holds comes from the placement."""

    def __init__(self, config: ModelConfig, layer_idx: int, rank: int, ep_size: int, placement, stats: EPStats,
                 dtype: torch.dtype, group=None, packed: bool = False):
        super().__init__()
        S = placement.slots_per_rank
        self.slots = (PackedMXFP4Experts(config, dtype, S, 0, layer_idx) if packed
                      else LocalExperts(config, dtype, S, 0))
        self.packed = packed
        self.layer_idx, self.rank, self.ep_size, self.group = layer_idx, rank, ep_size, group
        self.placement, self.stats = placement, stats

    @property
    def num_slots(self) -> int:
        return self.slots.num_experts

    def slot_experts(self) -> list[int]:
        """Logical expert held by each local slot under the current placement."""
        return self.placement.experts_of_rank(self.layer_idx, self.rank)

    @torch.no_grad()
    def load_from(self, checkpoint, dtype: torch.dtype, slots: list[int] | None = None) -> None:
        """Read the experts of `slots` (default: all local slots) from the checkpoint, one expert at a time, as the
        slot backend holds them (packed bytes, or dequantised)."""
        experts = self.slot_experts()
        for s in range(self.num_slots) if slots is None else slots:
            e = experts[s]
            tensors = (checkpoint.packed_experts(self.layer_idx, e, e + 1) if self.packed
                       else checkpoint.experts(self.layer_idx, e, e + 1, dtype))
            for key, value in tensors.items():
                getattr(self.slots, key)[s].copy_(value[0])

    def forward(self, t: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        T, K = expert_ids.shape
        S, device = self.num_slots, t.device
        self.stats.counts[self.layer_idx] += torch.bincount(expert_ids.flatten(), minlength=self.stats.counts.shape[1])
        key = torch.arange(T, device=device) + self.rank                                 # spreads replicas
        slots = self.placement.choose_slots(self.layer_idx, expert_ids, key)             # [T, K] physical
        dest = (slots // S).flatten()                                                    # [P] rank of each pair
        order = torch.argsort(dest, stable=True)                                         # [P] pairs by rank
        send_counts = torch.bincount(dest, minlength=self.ep_size)                       # [ep]
        x = t[order // K]                                                                # [P, H]
        local_slot = (slots.flatten()[order] % S)                                        # [P]
        start = self.stats.mark(device)                              # dispatch: counts, rows and their slots
        recv_counts = self._exchange_counts(send_counts)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        recv_x = self._all_to_all(x, recv, send)                                         # [R, H]
        recv_slot = self._all_to_all(local_slot, recv, send)                             # [R]
        self.stats.add(start, self.stats.mark(device))
        y = self._grouped_mlp(recv_x, recv_slot)                                         # [R, H]
        start = self.stats.mark(device)                              # combine
        back = self._all_to_all(y, send, recv)                                           # [P, H] in `order`
        self.stats.add(start, self.stats.mark(device))
        pair_out = torch.empty_like(back)
        pair_out[order] = back                                                           # [P, H] pair order
        pair_out = pair_out.view(T, K, t.shape[1]).float()
        out = (pair_out * weights.float()[:, :, None]).sum(dim=1)                         # [T, H]
        return out.to(t.dtype)

    def _grouped_mlp(self, x: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """x [R, H] rows for local slots `slot` [R] -> expert outputs [R, H] (no routing weight): the slot backend
        with one expert per row at weight 1 (exact: x 1.0 in fp32)."""
        if x.shape[0] == 0:
            return x.clone()
        return self.slots(x, slot[:, None], torch.ones(slot.shape[0], 1, device=x.device))

    def _exchange_counts(self, send_counts: torch.Tensor) -> torch.Tensor:
        recv = torch.empty_like(send_counts)
        self._collective(recv, send_counts, None, None)
        return recv

    def _all_to_all(self, x: torch.Tensor, recv: list[int], send: list[int]) -> torch.Tensor:
        out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
        self._collective(out, x.contiguous(), recv, send)
        return out

    def _collective(self, out, x, recv, send) -> None:
        import deepspeed.comm as dist
        dist.all_to_all_single(out, x, output_split_sizes=recv, input_split_sizes=send, group=self.group)
