"""Fitting one rank's expert slots of one MoE layer to a new placement after the group changed size or rank order.

The slot count may change (a survivor of a lost rank may need more slots; back at full size, the configured count):
then the layer gets a new EPExperts of the new size. Each new slot is filled from a local slot that already holds its
expert (a copy on the device) or else read from the checkpoint. Knows nothing of Ray or of the process group.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def slot_tensors(experts: nn.Module) -> dict[str, torch.Tensor]:
    """The per-slot tensors of an expert backend (parameters and buffers whose first dim is its slot count)."""
    S = experts.num_slots
    return {k: t for k, t in experts.state_dict(keep_vars=True).items() if t.dim() and t.shape[0] == S}


@torch.no_grad()
def refit(experts: nn.Module, placement, rank: int, ep_size: int, checkpoint, dtype: torch.dtype,
          make: Callable[[], nn.Module]) -> tuple[nn.Module, int]:
    """`experts` (an EPExperts holding its slots under its current placement) -> a backend holding the slots of `rank`
    of `ep_size` under `placement`: the same module when the slot count is unchanged, else `make()` (a new one of the
    new size). Returns (backend, slots read from the checkpoint)."""
    before = experts.slot_experts()                            # logical expert of each current local slot
    old = slot_tensors(experts)
    target = experts if placement.slots_per_rank == experts.num_slots else make()
    target.rank, target.ep_size, target.placement = rank, ep_size, placement
    after = target.slot_experts()
    new = old if target is experts else slot_tensors(target)
    copyable = set(new) == set(old) and all(new[k].shape[1:] == old[k].shape[1:] for k in new)
    source = {e: s for s, e in reversed(list(enumerate(before)))}                 # first local slot of each expert
    copies = {s: source[e] for s, e in enumerate(after)
              if copyable and e in source and not (target is experts and before[s] == e)}
    staged = {s: {k: t[src].clone() for k, t in old.items()} for s, src in copies.items()}   # read before writing
    for s, rows in staged.items():
        for k, row in rows.items():
            new[k][s].copy_(row)
    unchanged = target is experts
    load = [s for s, e in enumerate(after) if s not in copies and not (unchanged and before[s] == e)]
    if load:
        target.load_from(checkpoint, dtype, load)
    return target, len(load)
