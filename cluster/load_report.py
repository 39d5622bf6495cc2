"""LoadReport: an EP group's expert load on its way to the router. Each step's [L, E] token counts are summed over
the ranks; a step every member has reported goes to the router, in step order, batched (one actor call for several
steps); and it says when a periodic rebalance check is due. Thread-safe; steps of an older group (before a regroup)
are not counted.
"""
from __future__ import annotations

import threading

import torch


class LoadReport:
    def __init__(self, router, report_every_steps: int, rebalance_interval_steps: int):
        self.router, self.report_every, self.interval = router, report_every_steps, rebalance_interval_steps
        self._lock = threading.Lock()
        self._counts: dict[int, torch.Tensor] = {}              # step -> [L, E] summed over the ranks so far
        self._rank_step: dict[int, int] = {}                    # worker id -> the last step it reported
        self._pending: list[tuple[int, torch.Tensor]] = []      # complete steps not sent yet
        self._last_check = 0                                    # step of the last periodic rebalance check
        self._sent = -1                                         # the last step sent (the router wants them in order)

    def reset(self, members: list[int], step: int) -> None:
        """The group (re-)formed with `members` at step `step`: partial sums of older steps are dropped."""
        with self._lock:
            self._counts, self._rank_step = {}, {w: step for w in members}
            self._last_check = max(self._last_check, step)

    def add(self, worker: int, step: int, counts: torch.Tensor) -> None:
        with self._lock:
            if worker in self._rank_step:
                self._counts[step] = self._counts.get(step, 0) + counts
                self._rank_step[worker] = step

    def report(self, check: bool = True) -> int | None:
        """Send what is complete once a batch is full; returns the step to check a rebalance at when one is due
        (and `check`), having sent everything first."""
        with self._lock:
            done = min(self._rank_step.values(), default=0)
            for step in sorted(s for s in self._counts if s <= done):
                counts = self._counts.pop(step)
                if step > self._sent:                               # else: a late count of a step already sent
                    self._pending.append((step, counts))
                    self._sent = step
            due = check and self.interval and done - self._last_check >= self.interval
            if due:
                self._last_check = done
        if due or len(self._pending) >= self.report_every:
            self.flush()
        return done if due else None

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        if pending:
            self.router.record_many.remote(pending)
