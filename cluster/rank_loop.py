"""RankLoop: an EP rank's own step loop (data-parallel attention), run on a thread of the rank's actor.

Owns the rank's inbox (adds, aborts, expert placements and park requests arrive asynchronously, batched, from any
thread), the per-step agreement with the other ranks (one tiny all_reduce on a CPU group: does anyone have work,
which placement has everyone received, has everyone been asked to park) and the outbox (StepResults, taken in
batches by whoever streams them out). Knows nothing of Ray; the step itself is the caller's (EPWorker.step_once).

Parked: the loop waits between steps until `resume` (the group was re-formed, maybe with another rank and size).
It parks when every rank agreed to (a planned regroup: a replacement rank joins), or when the agreement or a step
raised (a peer died or hung): then it calls `on_failure` (which drops the process group, so peers blocked on this
rank fail at once rather than at their collective timeout) and reports RankBroken through the outbox. A failed
step changed nothing the next step depends on: its tokens were never sampled, so it simply runs again.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)
IDLE_WAIT_MIN_S = 0.001      # an idle group polls its peers this often at first ...
IDLE_WAIT_MAX_S = 0.02       # ... backing off to this: a new request waits at most this long for idle peers


class RankFailed(RuntimeError):
    """The rank's loop stopped on an error it cannot park on."""


@dataclasses.dataclass(frozen=True)
class RankBroken:
    """Outbox item: the agreement or a step of `epoch` failed on `rank`; it dropped its process group and is parked
    until the group is re-formed."""
    rank: int
    epoch: int
    error: str


class RankLoop:
    def __init__(self, rank: int, ep_size: int, apply: Callable[[tuple], None], has_work: Callable[[], bool],
                 step: Callable[[], object], apply_placement: Callable[[object], None], control_group=None,
                 on_failure: Callable[[], None] | None = None, parked: bool = False):
        self.rank, self.ep_size = rank, ep_size
        self._apply, self._has_work, self._step, self._apply_placement = apply, has_work, step, apply_placement
        self._on_failure = on_failure
        self._group = control_group                 # a gloo group for the agreement (None: the default group)
        self._inbox: list[tuple] = []
        self._inbox_lock = threading.Lock()
        self._wake = threading.Event()
        self._out: collections.deque = collections.deque()
        self._out_ready = threading.Condition()
        self._placements: dict[int, object] = {}    # received, not yet applied: version -> placement
        self.placement_version = 0
        self.epoch = 0                              # the group's generation: +1 at each regroup
        self._park_for = 0                          # the newest epoch a ("park", epoch) command asked to park for
        self.parked = threading.Event()             # set while parked (a new rank starts parked, until it joins)
        self._resume = threading.Event()
        if parked:
            self.parked.set()
        self.error: BaseException | None = None
        self.stopped = False
        self._thread = threading.Thread(target=self._run, name=f"rank-{rank}-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # ---- any thread ----
    def submit(self, commands: list[tuple]) -> None:
        """Queue commands for the next step boundary: ("add", ...), ("abort", id), ("placement", version, map),
        ("park", epoch), ("stop",) (stops at once, parked or not)."""
        if any(c[0] == "stop" for c in commands):
            self.stop()
        with self._inbox_lock:
            self._inbox.extend(commands)
        self._wake.set()

    def stop(self) -> None:
        self.stopped = True
        self._resume.set()
        self._wake.set()

    def resume(self, rank: int, ep_size: int, control_group, epoch: int, placement_version: int) -> None:
        """Continue stepping as `rank` of `ep_size` in the re-formed group (parked loops only); placements received
        for the old group are dropped."""
        if not self.parked.is_set():
            raise RuntimeError(f"rank {self.rank}: resume of a loop that is not parked")
        self.rank, self.ep_size, self._group, self.epoch = rank, ep_size, control_group, epoch
        self.placement_version, self._placements = placement_version, {}
        self.parked.clear()
        self._resume.set()

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
                if self.parked.is_set():
                    self._resume.wait()
                    self._resume.clear()
                    continue
                failed = None
                try:
                    self._drain_inbox()
                    if self.stopped:
                        break
                    any_work, park = self._agree()
                    if park:
                        self._park()
                        continue
                    if any_work:
                        idle_wait = IDLE_WAIT_MIN_S
                        result = self._step()
                        if result is not None:
                            self.put(result)
                        continue
                except Exception as e:      # noqa: BLE001  a peer died or hung (or the step raised): park
                    failed = f"{type(e).__name__}: {e}"
                if failed is not None:      # outside the handler: the failed call's frames (which hold the
                    self._broken(failed)    # process group) are gone, so dropping the group closes its sockets
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

    def _park(self) -> None:
        self._resume.clear()
        self.parked.set()

    def _broken(self, error: str) -> None:
        logger.warning("rank %d: step of epoch %d failed (%s); parked until the group is re-formed", self.rank,
                       self.epoch, error.splitlines()[0][:300])
        if self._on_failure is not None:
            try:
                self._on_failure()
            except Exception:                # noqa: BLE001  the report below matters more
                logger.exception("rank %d: on_failure raised", self.rank)
        self._park()
        self.put(RankBroken(self.rank, self.epoch, error[:500]))

    def _drain_inbox(self) -> None:
        with self._inbox_lock:
            commands, self._inbox = self._inbox, []
        for command in commands:
            if command[0] == "stop":
                self.stopped = True
            elif command[0] == "placement":
                self._placements[command[1]] = command[2]
            elif command[0] == "park":
                self._park_for = max(self._park_for, command[1])
            else:
                self._apply(command)

    def _agree(self) -> tuple[bool, bool]:
        """All ranks at once: whether any has work, the newest placement every rank has received (applied by all
        in this same iteration, so outputs never see two maps in one step), and whether every rank was asked to park
        (all park in this same iteration). Returns (any work, park now)."""
        ready = max([self.placement_version, *self._placements])
        if self.ep_size == 1:
            any_work, agreed, park_for = self._has_work(), ready, self._park_for
        else:
            import torch.distributed as dist
            flags = torch.tensor([float(self._has_work()), -float(ready), -float(self._park_for)],
                                 dtype=torch.float64)                              # MAX of -v = -(min v)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
            any_work, agreed, park_for = bool(flags[0] > 0), int(-flags[1]), int(-flags[2])
        if agreed > self.placement_version:
            self._apply_placement(self._placements[agreed])
            self.placement_version = agreed
            self._placements = {v: p for v, p in self._placements.items() if v > agreed}
        return any_work, park_for > self.epoch
