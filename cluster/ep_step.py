"""EPStep: the rows per rank that every MoE layer of one step dispatches (the fixed dispatch capacity), agreed by all
ranks of an EP group once per step.

Ranks run their own batches (data-parallel attention), so their step sizes differ, but a fixed-capacity dispatch
needs one block size on every rank: the MAX over ranks of the step's rows, rounded up to a decode graph size (so a
rank replaying the graph of that size and a rank running eagerly send equal blocks). One all_reduce of one host
integer on a CPU (gloo) group: no device value is read. Who agrees: the model runner before each forward once
`attach`ed (it must, to pick the graph to replay), else the first MoE layer of each eager forward.
"""
from __future__ import annotations

import bisect

import torch


class EPStep:
    def __init__(self):
        self.group = None               # the group to agree on (a gloo group; None: the default group)
        self.sizes: list[int] = []      # decode graph sizes, ascending: capacities are rounded up to one
        self.attached = False           # a runner agrees before each forward (else the first MoE layer does)
        self.rows: int | None = None    # this step's agreed rows per rank; None before the first agreement
        self.agreements = 0             # ever (instrumentation)

    def attach(self, runner, group=None) -> None:
        """Agree in `runner` (engine.model_runner.ModelRunner) before each of its forwards, on `group`; a rank that
        runs no forward in a step must still call `agree(0)` before joining the layers' collectives."""
        self.group, self.sizes, self.attached = group, sorted(runner.graph_sizes), True
        runner.peers = self.agree

    def agree(self, rows: int) -> int:
        """All ranks at once: this rank's rows this step -> the rows every rank dispatches (>= rows)."""
        import torch.distributed as dist
        self.agreements += 1
        most = rows
        if dist.is_initialized() and dist.get_world_size(self.group) > 1:       # else a group of one
            device = "cuda" if dist.get_backend(self.group) == "nccl" else "cpu"    # without a gloo group
            value = torch.tensor([rows], dtype=torch.int64, device=device)
            dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
            most = int(value.item())
        i = bisect.bisect_left(self.sizes, most)
        self.rows = self.sizes[i] if i < len(self.sizes) else most
        return self.rows

    def rows_for(self, layer_idx: int, rows: int, captured: bool) -> int:
        """Rows to dispatch in layer `layer_idx` of a forward of `rows` rows (agreeing first, at layer 0, when no
        runner does). A captured graph's rows are its own: every rank replays the graph of the agreed size."""
        if captured:
            return rows
        if not self.attached and layer_idx == 0:
            self.agree(rows)
        if self.rows is None:          # start-up forwards (memory profile, graph warm-up): alike on every rank
            return rows
        if rows > self.rows:
            raise RuntimeError(f"a forward of {rows} rows in a step whose ranks agreed on {self.rows}: every forward "
                               "of an EP rank must follow its step's agreement")
        return self.rows
