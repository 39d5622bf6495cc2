"""RankLoop: an EP rank's own step loop (data-parallel attention), run on a thread of the rank's actor.

Owns the rank's inbox (adds, aborts and expert placements arrive asynchronously, batched, from any thread), the
per-step agreement with the other ranks (one tiny all_reduce on a CPU group: does anyone have work, which placement
has everyone received) and the outbox (StepResults, taken in batches by whoever streams them out). Knows nothing
of Ray; the step itself is the caller's (EPWorker.step_once).
"""
from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)
IDLE_WAIT_MIN_S = 0.001      # an idle group polls its peers this often at first ...
IDLE_WAIT_MAX_S = 0.02       # ... backing off to this: a new request waits at most this long for idle peers


class RankFailed(RuntimeError):
    """The rank's loop stopped on an error (a collective timed out, a peer died, the step raised)."""


class RankLoop:
    def __init__(self, rank: int, ep_size: int, apply: Callable[[tuple], None], has_work: Callable[[], bool],
                 step: Callable[[], object], apply_placement: Callable[[object], None], control_group=None):
        self.rank, self.ep_size = rank, ep_size
        self._apply, self._has_work, self._step, self._apply_placement = apply, has_work, step, apply_placement
        self._group = control_group                 # a gloo group for the agreement (None: the default group)
        self._inbox: list[tuple] = []
        self._inbox_lock = threading.Lock()
        self._wake = threading.Event()
        self._out: collections.deque = collections.deque()
        self._out_ready = threading.Condition()
        self._placements: dict[int, object] = {}    # received, not yet applied: version -> placement
        self.placement_version = 0
        self.error: BaseException | None = None
        self.stopped = False
        self._thread = threading.Thread(target=self._run, name=f"rank-{rank}-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # ---- any thread ----
    def submit(self, commands: list[tuple]) -> None:
        """Queue commands for the next step boundary: ("add", ...), ("abort", id), ("placement", version, map),
        ("stop",)."""
        with self._inbox_lock:
            self._inbox.extend(commands)
        self._wake.set()

    def put(self, item) -> None:
        with self._out_ready:
            self._out.append(item)
            self._out_ready.notify()

    def take(self, timeout_s: float) -> list:
        """Everything produced since the last take (waits up to timeout_s for something); raises RankFailed once
        the loop failed and its last results were taken; [] when stopped."""
        with self._out_ready:
            if not self._out and self.error is None and not self.stopped:
                self._out_ready.wait(timeout_s)
            items, self._out = list(self._out), collections.deque()
        if not items and self.error is not None:
            raise RankFailed(f"rank {self.rank}: {type(self.error).__name__}: {self.error}")
        return items

    # ---- the loop thread ----
    def _run(self) -> None:
        idle_wait = IDLE_WAIT_MIN_S
        try:
            while not self.stopped:
                self._drain_inbox()
                if self.stopped:
                    break
                any_work = self._agree()
                if any_work:
                    idle_wait = IDLE_WAIT_MIN_S
                    result = self._step()
                    if result is not None:
                        self.put(result)
                    continue
                # idle: sleep until a command arrives (one rank alone) or poll the peers with backoff
                self._wake.wait(timeout=1.0 if self.ep_size == 1 else idle_wait)
                self._wake.clear()
                idle_wait = min(2 * idle_wait, IDLE_WAIT_MAX_S)
        except BaseException as e:          # noqa: BLE001  (reported through the outbox, never lost)
            logger.error("rank %d step loop failed: %s", self.rank, e)
            self.error = e
        finally:
            with self._out_ready:
                self._out_ready.notify_all()

    def _drain_inbox(self) -> None:
        with self._inbox_lock:
            commands, self._inbox = self._inbox, []
        for command in commands:
            if command[0] == "stop":
                self.stopped = True
            elif command[0] == "placement":
                self._placements[command[1]] = command[2]
            else:
                self._apply(command)

    def _agree(self) -> bool:
        """All ranks at once: whether any has work, and the newest placement every rank has received (applied
        by all in this same iteration, so outputs never see two maps in one step)."""
        ready = max(self._placements, default=self.placement_version)
        if self.ep_size == 1:
            any_work, agreed = self._has_work(), ready
        else:
            import torch.distributed as dist
            flags = torch.tensor([float(self._has_work()), -float(ready)])          # MAX of -v = -(min v)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
            any_work, agreed = bool(flags[0] > 0), int(-flags[1])
        if agreed > self.placement_version:
            self._apply_placement(self._placements[agreed])
            self.placement_version = agreed
            self._placements = {v: p for v, p in self._placements.items() if v > agreed}
        return any_work
