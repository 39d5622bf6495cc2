"""EPExperts: the expert backend of one expert-parallel rank (the seam in model/moe.py).

Per MoE layer and step, the fixed path (default): choose a physical replica per (token, expert) from the placement
-> ONE all-to-all dispatch of fixed-capacity rows, each token with its slot ids and weights (cluster/ep_dispatch.py)
-> this rank's slots on every received row (weighted sum over the pairs it holds) -> ONE all-to-all combine -> sum
of the ranks' partials at the source. Two collectives a layer, no host sync, shapes fixed by the step's agreed rows
(cluster/ep_step.py): capturable in CUDA graphs. The variable path (dispatch="variable", kept for the benchmark's
comparison): counts, rows, slot ids and results as four all-to-alls with host-side split sizes.
A rank with no tokens still joins every collective. Knows nothing of Ray; the placement is given.
Legend: T=tokens on this rank, K=top-k, P=T*K pairs, R=pairs received, S=slots per rank, H=hidden, C=rows per rank.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from cluster.ep_dispatch import RowLayout, sum_partials
from cluster.ep_stats import EPStats, capturing
from model.config import ModelConfig
from model.moe import LocalExperts
from model.packed_experts import PackedMXFP4Experts

__all__ = ["EPExperts", "EPStats"]
DISPATCHES = ("fixed", "variable")


class EPExperts(nn.Module):
    """This rank's S expert slots of one layer, held by a local backend indexed by slot: dense (LocalExperts, grouped
    GEMM where available) or packed MXFP4 (PackedMXFP4Experts: 17/32 byte per weight, the fused kernel on CUDA).
    Which logical expert a slot holds comes from the placement. `group`, `rank`, `ep_size` and `placement` are read
    at every call, so a re-formed group can be swapped in between steps."""

    def __init__(self, config: ModelConfig, layer_idx: int, rank: int, ep_size: int, placement, stats: EPStats,
                 dtype: torch.dtype, group=None, packed: bool = False, dispatch: str = "fixed"):
        super().__init__()
        S = placement.slots_per_rank
        self.slots = (PackedMXFP4Experts(config, dtype, S, 0, layer_idx) if packed
                      else LocalExperts(config, dtype, S, 0))
        self.slots.num_logical_experts = S + 1       # ids it is given: [0, S], S = held elsewhere (computes 0)
        self.packed = packed
        self.layer_idx, self.rank, self.ep_size, self.group = layer_idx, rank, ep_size, group
        self.placement, self.stats = placement, stats
        if dispatch not in DISPATCHES:
            raise ValueError(f"EP dispatch must be one of {DISPATCHES}, got {dispatch!r}")
        self.dispatch = dispatch

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
        captured = capturing()
        if self.stats.step.attached:           # the runner counts after the step (a graph's real rows only)
            self.stats.keep(self.layer_idx, expert_ids, captured)
        else:
            self.stats.record(self.layer_idx, expert_ids, captured)
        key = torch.arange(t.shape[0], device=t.device) + self.rank                      # spreads replicas
        slots = self.placement.choose_slots(self.layer_idx, expert_ids, key)             # [T, K] physical
        if self.dispatch == "variable":
            return self._variable(t, slots, weights)
        return self._fixed(t, slots, weights, self.stats.step.rows_for(self.layer_idx, t.shape[0], captured))

    def count(self, forward_rows: int, real_rows: int, graphed: bool) -> None:
        """After a step: add the routing of its forward's first `real_rows` rows to the stats (attached: every
        forward; otherwise eager forwards counted themselves, only a replayed graph's rows are added here)."""
        self.stats.count(self.layer_idx, forward_rows, real_rows, graphed, eager=self.stats.step.attached)

    def _fixed(self, t: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, capacity: int) -> torch.Tensor:
        T, H = t.shape
        if capacity == 0:                                        # no rank has a token this step
            return t.new_zeros(0, H)
        ep, S = self.ep_size, self.num_slots
        layout = RowLayout(H, slots.shape[1], t.dtype)
        send = layout.pack(t, slots, weights, capacity, ep)                              # [ep*C, B]
        recv = torch.empty_like(send)
        self._exchange(recv, send)                                                       # dispatch
        x, local, w = layout.unpack(recv, self.rank * S, S)                              # [ep*C, H], [ep*C, K] x2
        y = self._held_mlp(x, local, w)                                                  # [ep*C, H] partial sums
        back = torch.empty_like(y)
        self._exchange(back, y)                                                          # combine
        return sum_partials(back, ep, T)                                                 # [T, H]

    def _variable(self, t: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        T, K = slots.shape
        S = self.num_slots
        dest = (slots // S).flatten()                                                    # [P] rank of each pair
        order = torch.argsort(dest, stable=True)                                         # [P] pairs by rank
        send_counts = torch.bincount(dest, minlength=self.ep_size)                       # [ep]
        x = t[order // K]                                                                # [P, H]
        local_slot = (slots.flatten()[order] % S)                                        # [P]
        recv_counts = torch.empty_like(send_counts)
        self._exchange(recv_counts, send_counts)
        send, recv = send_counts.tolist(), recv_counts.tolist()                          # host syncs
        recv_x = self._variable_all_to_all(x, recv, send)                                # [R, H]
        recv_slot = self._variable_all_to_all(local_slot, recv, send)                    # [R]
        y = self._grouped_mlp(recv_x, recv_slot)                                         # [R, H] unweighted
        back = self._variable_all_to_all(y, send, recv)                                  # [P, H] in `order`
        pair_out = torch.empty_like(back)
        pair_out[order] = back                                                           # [P, H] pair order
        pair_out = pair_out.view(T, K, t.shape[1]).float()
        return (pair_out * weights.float()[:, :, None]).sum(dim=1).to(t.dtype)          # [T, H]

    def _held_mlp(self, x: torch.Tensor, local: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Rows x [N, H], local slot ids [N, K] (S: held elsewhere), weights [N, K] -> each row's weighted sum over
        the pairs held here [N, H]."""
        return self.slots(x, local, w)

    def _grouped_mlp(self, x: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """x [R, H] rows for local slots `slot` [R] -> expert outputs [R, H] (no routing weight): the slot backend
        with one expert per row at weight 1 (exact: x 1.0 in fp32)."""
        if x.shape[0] == 0:
            return x.clone()
        return self.slots(x, slot[:, None], torch.ones(slot.shape[0], 1, device=x.device))

    def _variable_all_to_all(self, x: torch.Tensor, recv: list[int], send: list[int]) -> torch.Tensor:
        out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
        self._exchange(out, x.contiguous(), recv, send)
        return out

    def _exchange(self, out: torch.Tensor, x: torch.Tensor, recv: list[int] | None = None,
                  send: list[int] | None = None) -> None:
        """One all-to-all (equal splits unless given), counted, and timed unless it is being captured."""
        stats = self.stats
        stats.collectives += 1
        if capturing():
            self._collective(out, x, recv, send)
            return
        if stats.barrier_timing:
            comm().barrier(group=self.group)
        start = stats.mark(x.device)
        self._collective(out, x, recv, send)
        stats.add(start, stats.mark(x.device))

    def _collective(self, out: torch.Tensor, x: torch.Tensor, recv: list[int] | None, send: list[int] | None) -> None:
        comm().all_to_all_single(out, x, output_split_sizes=recv, input_split_sizes=send, group=self.group)


def comm():
    """The collectives' module: deepspeed.comm once initialised (the EP ranks), else torch.distributed (a machine
    without DeepSpeed, a group formed directly)."""
    ds = sys.modules.get("deepspeed.comm")
    if ds is not None and ds.is_initialized():
        return ds
    import torch.distributed
    return torch.distributed
