"""The expert placement of an EP group that lost ranks: a map over the survivors that covers every expert.

Survivors keep every slot they hold (no weights move for experts they have), so experts with a surviving copy are
covered by it (the redundant copies first). Experts whose every copy died are loaded into free slots: slots that held
an extra copy of an expert with copies elsewhere, then new slots when the survivors' slots cannot hold every expert
(the slots per rank grow to ceil(E / survivors)). Pure torch, like cluster/expert_placement.py.
Legend: L=MoE layers, E=logical experts, S=slots per rank before, S2=after, n=survivors.
"""
from __future__ import annotations

import math
from collections import Counter

import torch

from cluster.expert_placement import ExpertPlacement


def survivor_slots(num_experts: int, num_survivors: int, slots_per_rank: int) -> int:
    """Slots per surviving rank: the old count while the survivors' slots can hold every expert, else
    ceil(E / survivors)."""
    if num_survivors < 1:
        raise ValueError("an EP group needs at least one surviving rank")
    return max(slots_per_rank, math.ceil(num_experts / num_survivors))


def survivor_placement(old: ExpertPlacement, survivors: list[int]) -> ExpertPlacement:
    """`old` over its ranks -> a map over `survivors` (old rank ids, in their new rank order: survivor i becomes rank
    i) holding every expert of every layer. A survivor's slot i keeps its expert unless that slot is needed for an
    expert that lost every copy; spare new slots get extra copies of the experts with the fewest."""
    if not survivors or len(set(survivors)) != len(survivors) or not all(0 <= r < old.ep_size for r in survivors):
        raise ValueError(f"survivors must be distinct ranks of the old group [0, {old.ep_size}), got {survivors}")
    E, n = old.num_experts, len(survivors)
    S2 = survivor_slots(E, n, old.slots_per_rank)
    rows = [_layer_row([old.experts_of_rank(layer, r) for r in survivors], E, S2) for layer in range(old.num_layers)]
    return ExpertPlacement.from_phy2log(torch.tensor(rows, dtype=torch.int64), E, n)


def _layer_row(held: list[list[int]], num_experts: int, S2: int) -> list[int]:
    """One layer: each survivor's experts by slot (old slots) -> the new phy2log row [n * S2]."""
    slots = [list(h) + [None] * (S2 - len(h)) for h in held]                     # None: a new, empty slot
    copies = Counter(e for rank in slots for e in rank if e is not None)
    loaded = [0] * len(slots)                                                    # experts each rank must load
    for e in (e for e in range(num_experts) if copies[e] == 0):
        rank, slot = _free_slot(slots, copies, loaded)
        if slots[rank][slot] is not None:
            copies[slots[rank][slot]] -= 1
        slots[rank][slot] = e
        copies[e] += 1
        loaded[rank] += 1
    for rank, experts in enumerate(slots):                                       # spare new slots: extra copies
        for slot in (i for i, e in enumerate(experts) if e is None):
            e = min(range(num_experts), key=lambda x: (x in experts, copies[x], x))
            experts[slot] = e
            copies[e] += 1
    return [e for rank in slots for e in rank]


def _free_slot(slots: list[list[int | None]], copies: Counter, loaded: list[int]) -> tuple[int, int]:
    """Where the next lost expert goes: the rank that loads fewest so far among those with a free slot; on it an
    empty slot, else the slot of the expert with the most copies (more than one)."""
    best = None
    for rank, experts in enumerate(slots):
        free = [(0, 0, i) if e is None else (1, -copies[e], i) for i, e in enumerate(experts)
                if e is None or copies[e] > 1]
        if free:
            key = (loaded[rank], rank)
            if best is None or key < best[0]:
                best = (key, rank, min(free)[2])
    if best is None:          # survivor_slots guarantees room: n * S2 >= E
        raise AssertionError("no free slot for a lost expert")
    return best[1], best[2]
