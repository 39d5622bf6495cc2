"""Expert placement: one model replica's logical -> physical expert map over all MoE layers, and the EPLB policy.

Owns the map (a frozen value object), the replica choice per (token, expert), rank loads, balancedness and DeepSeek's
EPLB global policy (replicate hot experts, pack replicas onto ranks). Pure torch: never imports Ray or moves weights.
Legend: L=MoE layers, E=logical experts, P=physical slots per layer, M=most replicas of one expert, R=ep ranks,
S=slots per rank (P = R*S), T=tokens, K=top-k.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch


def num_physical_slots(num_experts: int, ep_size: int, num_redundant: int) -> int:
    """P = ceil((E + redundant) / ep_size) * ep_size: every rank gets the same number of slots, and slots beyond
    E + redundant (rounding) also hold redundant replicas."""
    if num_experts < 1 or ep_size < 1 or num_redundant < 0:
        raise ValueError(f"need num_experts >= 1, ep_size >= 1, num_redundant >= 0; got {num_experts}, "
                         f"{ep_size}, {num_redundant}")
    return math.ceil((num_experts + num_redundant) / ep_size) * ep_size


def _tables(phy2log: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """phy2log [L, P] (values in [0, E)) -> (log2phy [L, E, M] slots ascending, padded with -1; logcnt [L, E])."""
    L, P = phy2log.shape
    dev = phy2log.device
    logcnt = torch.zeros(L, num_experts, dtype=torch.int64, device=dev)
    logcnt.scatter_add_(1, phy2log, torch.ones_like(phy2log))                            # [L, E]
    M = max(int(logcnt.max()), 1) if L else 1
    order = torch.argsort(phy2log, dim=1, stable=True)                                    # [L, P] slots by expert
    experts = phy2log.gather(1, order)                                                    # [L, P] ascending
    starts = logcnt.cumsum(1) - logcnt                                                    # [L, E] first position
    replica = torch.arange(P, device=dev)[None, :] - starts.gather(1, experts)           # [L, P] replica index
    log2phy = torch.full((L, num_experts, M), -1, dtype=torch.int64, device=dev)
    log2phy[torch.arange(L, device=dev)[:, None].expand(L, P), experts, replica] = order
    return log2phy, logcnt


@dataclass(frozen=True, eq=False)
class ExpertPlacement:
    """Logical -> physical expert map of one model replica. Slot p lives on rank p // S at local index p % S.

    Build it with `initial`, `from_phy2log` or `rebalance`; log2phy and logcnt are derived from phy2log (slots of an
    expert in ascending order) and checked against it. Equality compares the maps (phy2log and ep_size).
    """

    phy2log: torch.Tensor  # [L, P] int64: logical expert held by each physical slot
    log2phy: torch.Tensor  # [L, E, M] int64: slots holding each expert, ascending, padded with -1
    logcnt: torch.Tensor   # [L, E] int64: replicas of each expert, >= 1
    ep_size: int

    def __post_init__(self) -> None:
        p2l, l2p, cnt = self.phy2log, self.log2phy, self.logcnt
        for name, t, dims in (("phy2log", p2l, 2), ("log2phy", l2p, 3), ("logcnt", cnt, 2)):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != dims:
                raise ValueError(f"{name} must be a {dims}-D int64 tensor, got {getattr(t, 'dtype', type(t))} "
                                 f"{tuple(getattr(t, 'shape', ()))}; build maps with ExpertPlacement.from_phy2log")
        (L, P), E = p2l.shape, cnt.shape[1]
        if self.ep_size < 1 or P % self.ep_size:
            raise ValueError(f"{P} slots per layer cannot be split evenly over ep_size={self.ep_size}; "
                             "use num_physical_slots(num_experts, ep_size, num_redundant) slots")
        if cnt.shape[0] != L or l2p.shape[:2] != (L, E) or E < 1 or P < E:
            raise ValueError(f"inconsistent shapes: phy2log {tuple(p2l.shape)}, log2phy {tuple(l2p.shape)}, "
                             f"logcnt {tuple(cnt.shape)}; need [L, P], [L, E, M], [L, E] with P >= E")
        if P and (int(p2l.min()) < 0 or int(p2l.max()) >= E):
            raise ValueError(f"phy2log holds expert ids outside [0, {E}): min {int(p2l.min())}, max {int(p2l.max())}")
        want_l2p, want_cnt = _tables(p2l, E)
        missing = (want_cnt == 0).nonzero().tolist()
        if missing:
            raise ValueError(f"every expert needs at least one physical slot; (layer, expert) without one: "
                             f"{missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if not torch.equal(cnt, want_cnt) or not torch.equal(l2p, want_l2p):
            raise ValueError("log2phy/logcnt do not match phy2log; build maps with ExpertPlacement.from_phy2log")

    @classmethod
    def from_phy2log(cls, phy2log: torch.Tensor, num_experts: int, ep_size: int) -> ExpertPlacement:
        """The map whose slot p of layer l holds expert phy2log[l, p] (phy2log [L, P])."""
        phy2log = torch.as_tensor(phy2log, dtype=torch.int64)
        if phy2log.dim() != 2 or phy2log.numel() == 0 or int(phy2log.min()) < 0 or int(phy2log.max()) >= num_experts:
            raise ValueError(f"phy2log must be a non-empty [layers, slots] tensor of expert ids in "
                             f"[0, {num_experts}), got shape {tuple(phy2log.shape)}")
        return cls(phy2log, *_tables(phy2log, num_experts), ep_size)

    @classmethod
    def initial(cls, num_layers: int, num_experts: int, ep_size: int, num_redundant: int) -> ExpertPlacement:
        """No load known yet: experts in order (contiguous per rank), spare slots round-robin over experts 0, 1, ..."""
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        P = num_physical_slots(num_experts, ep_size, num_redundant)
        row = torch.arange(P) % num_experts                                               # [P]
        return cls.from_phy2log(row.expand(num_layers, P).clone(), num_experts, ep_size)

    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def num_experts(self) -> int:
        return self.logcnt.shape[1]

    @property
    def num_slots(self) -> int:
        return self.phy2log.shape[1]

    @property
    def slots_per_rank(self) -> int:
        return self.num_slots // self.ep_size

    def to(self, device: torch.device | str) -> ExpertPlacement:
        """The same map with its tables on `device`; keep one per device, made once when a map is adopted."""
        return ExpertPlacement(self.phy2log.to(device), self.log2phy.to(device), self.logcnt.to(device), self.ep_size)

    def slots_of_rank(self, rank: int) -> range:
        """Physical slot ids held by `rank`."""
        if not 0 <= rank < self.ep_size:
            raise ValueError(f"rank {rank} outside [0, {self.ep_size})")
        return range(rank * self.slots_per_rank, (rank + 1) * self.slots_per_rank)

    def experts_of_rank(self, layer: int, rank: int) -> list[int]:
        """Logical expert id of each local slot of `rank` in `layer` (index i = local slot i)."""
        s = self.slots_of_rank(rank)
        return self.phy2log[layer, s.start:s.stop].tolist()

    def choose_slots(self, layer: int, expert_ids: torch.Tensor, key: torch.Tensor | None = None) -> torch.Tensor:
        """expert_ids [T, K] logical -> physical slot ids [T, K], on the caller's device, no host sync.

        Replica (key[t] + k) % logcnt: deterministic, and round-robin over the replicas of each expert. `key` [T] is
        any per-token integer (default: the token's index); adding the rank spreads ranks over different replicas.
        """
        if expert_ids.device != self.log2phy.device:
            raise ValueError(f"expert_ids on {expert_ids.device} but the map on {self.log2phy.device}; "
                             "keep a copy made with placement.to(device)")
        T, K = expert_ids.shape
        if key is None:
            key = torch.arange(T, device=expert_ids.device)                                # [T]
        k = torch.arange(K, device=expert_ids.device)[None, :]                              # [1, K]
        replica = (key.view(T, 1) + k) % self.logcnt[layer][expert_ids]                     # [T, K]
        return self.log2phy[layer][expert_ids, replica]                                     # [T, K]

    def rank_loads(self, layer: int, expert_load: torch.Tensor) -> torch.Tensor:
        """expert_load [E] -> load of each rank [R] (float64), each expert's load split evenly over its replicas."""
        load = torch.as_tensor(expert_load)
        if load.shape != (self.num_experts,):
            raise ValueError(f"expert load must be [{self.num_experts}], got {tuple(load.shape)}")
        return self._rank_loads(load[None], slice(layer, layer + 1))[0]

    def balancedness(self, expert_load: torch.Tensor) -> torch.Tensor:
        """expert_load [L, E] -> mean rank load / max rank load per layer [L] (1.0 = perfect; 1.0 when no load)."""
        load = torch.as_tensor(expert_load)
        if load.shape != (self.num_layers, self.num_experts):
            raise ValueError(f"expert load must be [{self.num_layers}, {self.num_experts}], got {tuple(load.shape)}")
        loads = self._rank_loads(load, slice(None))                                        # [L, R]
        top = loads.amax(1)                                                                # [L]
        return torch.where(top > 0, loads.mean(1) / top.clamp(min=1e-300), torch.ones_like(top))

    def _rank_loads(self, expert_load: torch.Tensor, layers: slice) -> torch.Tensor:
        """expert_load [l, E] of the layers in `layers` -> rank loads [l, R] float64."""
        p2l, cnt = self.phy2log[layers], self.logcnt[layers]                               # [l, P], [l, E]
        load = expert_load.to(p2l.device, torch.float64)
        per_slot = load.gather(1, p2l) / cnt.gather(1, p2l)                                # [l, P]
        return per_slot.view(-1, self.ep_size, self.slots_per_rank).sum(2)                # [l, R]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ExpertPlacement):
            return NotImplemented
        return (self.ep_size == other.ep_size and self.phy2log.shape == other.phy2log.shape
                and torch.equal(self.phy2log.cpu(), other.phy2log.cpu()))

    def _check_compatible(self, other: ExpertPlacement) -> None:
        mine, theirs = (self.ep_size, *self.log2phy.shape[:2], self.num_slots), \
            (other.ep_size, *other.log2phy.shape[:2], other.num_slots)
        if mine != theirs:
            raise ValueError(f"maps of different layouts (ep_size, L, E, P): {mine} vs {theirs}")

    def moves(self, other: ExpertPlacement) -> int:
        """Number of (layer, slot) whose expert differs: the expert weights that must be copied."""
        self._check_compatible(other)
        return int((self.phy2log.cpu() != other.phy2log.cpu()).sum())

    def transfers(self, new: ExpertPlacement) -> list[tuple[int, int, int, int]]:
        """Weight copies turning this map into `new`: (layer, dst_slot, expert_id, src_slot) per changed slot.

        src_slot holds expert_id under THIS map, on dst's own rank when it has one (a local copy), else a replica
        chosen round-robin. Copies read the old weights: stage every copy before overwriting any slot.
        """
        self._check_compatible(new)
        old_p2l, new_p2l, old_l2p = self.phy2log.cpu(), new.phy2log.cpu(), self.log2phy.cpu().tolist()
        S = self.slots_per_rank
        plan = []
        for layer, slot in (old_p2l != new_p2l).nonzero().tolist():
            e = int(new_p2l[layer, slot])
            srcs = [p for p in old_l2p[layer][e] if p >= 0]
            local = [p for p in srcs if p // S == slot // S]
            plan.append((layer, slot, e, local[0] if local else srcs[slot % len(srcs)]))
        return plan


def rebalance(expert_load: torch.Tensor, ep_size: int, num_slots: int,
              previous: ExpertPlacement | None = None) -> ExpertPlacement:
    """DeepSeek EPLB, global policy (gpt-oss has no expert groups): expert_load [L, E] -> a new map.

    Per layer: replicate (each spare slot goes to the expert with the highest load per replica), then pack the
    replicas onto ranks, S per rank, heaviest first onto the least-loaded rank with room that does not hold that
    expert yet. With `previous`: ranks and slots are relabelled to keep experts where they were, and a layer whose
    balancedness would not improve keeps its previous map, so fewer weights move.
    """
    load = torch.as_tensor(expert_load).detach().to("cpu", torch.float64)                  # [L, E]
    if load.dim() != 2 or load.numel() == 0 or not bool(torch.isfinite(load).all()) or bool((load < 0).any()):
        raise ValueError(f"expert_load must be a [layers, experts] tensor of finite non-negative token counts, "
                         f"got shape {tuple(load.shape)}")
    L, E = load.shape
    if ep_size < 1 or num_slots < E or num_slots % ep_size:
        raise ValueError(f"num_slots={num_slots} must be >= num_experts={E} and a multiple of ep_size={ep_size}; "
                         "use num_physical_slots(num_experts, ep_size, num_redundant)")
    if previous is not None and (previous.ep_size, tuple(previous.phy2log.shape), previous.num_experts) != \
            (ep_size, (L, num_slots), E):
        raise ValueError("previous placement has another shape; pass previous=None after changing the layout")
    previous = None if previous is None else previous.to("cpu")
    S = num_slots // ep_size
    rows = []
    for layer, layer_load in enumerate(load.tolist()):
        logcnt = _replicate(layer_load, num_slots)
        bins = _pack([w / n for w, n in zip(layer_load, logcnt)], logcnt, ep_size, S)
        rows.append(_lay_out(bins, None if previous is None else previous.phy2log[layer].tolist(), S))
    new = ExpertPlacement.from_phy2log(torch.tensor(rows), E, ep_size)
    if previous is None:
        return new
    keep = new.balancedness(load) <= previous.balancedness(load)                           # [L] no gain
    return ExpertPlacement.from_phy2log(torch.where(keep[:, None], previous.phy2log, new.phy2log), E, ep_size)


def _replicate(load: list[float], num_slots: int) -> list[int]:
    """One layer's load [E] -> replicas per expert [E] summing to num_slots: each spare slot to the highest load per
    replica (ties: fewest replicas, then lowest id, so a layer without load gets round-robin replicas)."""
    logcnt = [1] * len(load)
    for _ in range(num_slots - len(load)):
        logcnt[max(range(len(load)), key=lambda e: (load[e] / logcnt[e], -logcnt[e], -e))] += 1
    return logcnt


def _pack(per_replica: list[float], logcnt: list[int], num_ranks: int, S: int) -> list[list[int]]:
    """Balanced packing of replicas (expert e weighs per_replica[e], logcnt[e] copies) into num_ranks bins of
    exactly S: heaviest first onto the least-loaded bin with room that lacks the expert; then swaps remove any
    duplicate left when another bin can take it. Returns the experts of each bin."""
    items = sorted(((per_replica[e], e) for e, n in enumerate(logcnt) for _ in range(n)), key=lambda i: (-i[0], i[1]))
    bins: list[list[int]] = [[] for _ in range(num_ranks)]
    loads = [0.0] * num_ranks
    for w, e in items:
        room = [r for r in range(num_ranks) if len(bins[r]) < S]
        fresh = [r for r in room if e not in bins[r]] or room
        r = min(fresh, key=lambda r: (loads[r], len(bins[r]), r))
        bins[r].append(e)
        loads[r] += w
    for r, b in enumerate(bins):
        for e in [e for e, n in Counter(b).items() for _ in range(n - 1)]:
            swaps = [(max(loads[r] - per_replica[e] + per_replica[f], loads[q] - per_replica[f] + per_replica[e]),
                      q, f) for q in range(num_ranks) if e not in bins[q] for f in set(bins[q]) if f not in b]
            if not swaps:                                                                  # unavoidable
                continue
            _, q, f = min(swaps)
            b[b.index(e)], bins[q][bins[q].index(f)] = f, e
            loads[r] += per_replica[f] - per_replica[e]
            loads[q] += per_replica[e] - per_replica[f]
    return bins


def _lay_out(bins: list[list[int]], prev_row: list[int] | None, S: int) -> list[int]:
    """Bins -> one phy2log row [P]. Without a previous row, bin r is rank r with its experts ascending. With one,
    bins go to the ranks whose previous experts they share most (greedy matching), and experts already on that
    rank keep their local slot: balance is unchanged, fewer weights move."""
    if prev_row is None:
        return [e for b in bins for e in sorted(b)]
    R = len(bins)
    prev = [prev_row[r * S:(r + 1) * S] for r in range(R)]
    have, had = [Counter(b) for b in bins], [Counter(p) for p in prev]
    overlap = sorted((-sum((have[b] & had[r]).values()), b, r) for b in range(R) for r in range(R))
    rank_of: dict[int, int] = {}                                                           # bin -> rank
    taken: set[int] = set()
    for _, b, r in overlap:
        if b not in rank_of and r not in taken:
            rank_of[b] = r
            taken.add(r)
    row = [-1] * (R * S)
    for b, r in rank_of.items():
        left = Counter(bins[b])
        slots = [None] * S
        for i, e in enumerate(prev[r]):
            if left[e]:
                slots[i], left[e] = e, left[e] - 1
        rest = iter(sorted(left.elements()))
        row[r * S:(r + 1) * S] = [e if e is not None else next(rest) for e in slots]
    return row
