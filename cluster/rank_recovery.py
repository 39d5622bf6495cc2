"""RankRecovery: what an EP group does when it loses a rank, and how it gets back to full size.

Lost: a rank's result stream raised (its process died) or a rank reported RankBroken (a collective failed: a peer
died or hung). Then, with new adds and aborts held back: ping every member (a dead one raises; one that does not
answer within probe_timeout_s is stuck and killed), wait until the others have parked, form a new process group of
the survivors (ranks 0..n-1, a new rendezvous) under a placement over them that covers every expert (the router's
`shrink`), and continue each request of the lost ranks on the least-loaded survivor from its prompt plus the tokens
it already handed out (token-exact: greedy, and seeded sampling, whose random stream is keyed by token index).
Requests on survivors keep their KV and simply re-run the failed step.
Back to full size (a thread): replacements start in the lost ranks' placement-group bundles and load their weights
for a fresh EPLB placement while the survivors serve; then every member parks at the same step, all regroup at full
size, and nothing in flight is interrupted. RankWatch (cluster/rank_watch.py) finds stuck ranks between steps.
"""
from __future__ import annotations

import logging
import threading
import time

import ray
from ray.exceptions import GetTimeoutError

from cluster.rank_loop import RankBroken
from cluster.rank_watch import RankWatch

logger = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 2.0          # a rank that does not answer a ping within this (and reports nothing) is stuck
MAX_ATTEMPTS = 3               # regroups tried when ranks keep failing during one
PREPARE_TIMEOUT_S = 600.0      # a replacement's start and weight load


class EPStepError(RuntimeError):
    """The EP group failed (a rank died, hung or raised, and the group could not continue); the message names the
    rank. The group must be rebuilt."""


class RankRecovery:
    def __init__(self, group):
        self.group = group
        self.lock = threading.RLock()           # one membership change at a time: a regroup after a loss, or a grow
        self.busy = False
        self._epochs = 0                        # the last epoch a regroup used (a failed attempt's is not reused)
        self.watch = RankWatch(group, self) if group.ep.elastic and group.ep.ep_size > 1 else None
        self._growing: threading.Thread | None = None

    # ---- a lost rank (on the thread reading results) ----
    def recover(self, worker: int, error) -> None:
        """Regroup the survivors of the failure `worker` reported (or died of) and continue the lost requests;
        raises EPStepError when the group cannot continue (no rank is lost: a step raised; or none survives)."""
        g = self.group
        started = time.monotonic()
        with self.lock:
            if worker not in g.members or worker in g.actors.dead:
                return                                  # handled while we waited for the lock
            if isinstance(error, RankBroken) and error.epoch < g.epoch:
                return
            self.busy = True
            g.hold()
            try:
                lost = self._regroup_survivors(worker, error)
                migrated = self._continue_lost(lost)
            except EPStepError as e:
                g.error = e
                logger.error("%s", e)
                raise
            finally:
                self.busy = False
                if g.error is None:
                    g.release_held()
        seconds = time.monotonic() - started
        logger.warning("EP group recovered from losing %d rank(s) in %.2fs: %d ranks, %d requests continued on "
                       "survivors", len(lost), seconds, len(g.members), migrated)
        if g.metrics is not None:
            g.metrics.on_recovery(seconds)
        if g.ep.replace_lost_ranks:
            self.start_growing()

    def _regroup_survivors(self, worker: int, error) -> list[int]:
        """Drop the lost ranks and re-form the group of the others; returns the lost ones. No rank lost: the step
        raised on its own (a bug, not a peer), which regrouping cannot mend."""
        g = self.group
        dead = self.find_lost(g.members)
        if not dead:
            why = error.error if isinstance(error, RankBroken) else error
            raise EPStepError(f"EP group failed at step {g.num_steps}: "
                              f"{self.diagnose(g.actors.rank_of(worker), why)}")
        return self._reform(dead)

    def _reform(self, dead: list[int]) -> list[int]:
        """Re-form the group of the members not in `dead` (and not found lost meanwhile); returns every lost one."""
        g = self.group
        lost: list[int] = []
        for _ in range(MAX_ATTEMPTS):
            self._drop(dead)
            lost += dead
            survivors = [w for w in g.members if w not in lost]
            if not survivors:
                raise EPStepError(f"EP group failed at step {g.num_steps}: every rank is lost")
            for w in survivors:                             # NCCL: a step hung on the dead peer fails now
                g.actors.handles[w].abort_collectives.remote()
            try:
                layout = ray.get(g.router.shrink.remote([g.actors.rank_of(w) for w in survivors]))
                self._join(survivors, layout)
                return lost
            except (ray.exceptions.RayError, TimeoutError) as e:      # another rank failed during the regroup
                logger.warning("regroup of %d survivors failed (%s); retrying", len(survivors), e)
                g.actors.members = survivors          # the router's map is over them now
                dead = self.find_lost(survivors)
        raise EPStepError(f"EP group failed at step {g.num_steps}: ranks kept failing while regrouping")

    def _continue_lost(self, lost: list[int]) -> int:
        """Requests of the lost workers continue on the survivors (booked and sent as continuations)."""
        g = self.group
        with g._lock:
            continuations, unrecoverable = g.book.take_lost(set(lost))
            batches = g._place([("add", c.request_id, c.prompt, c.params, c.resume) for c in continuations])
            g.lost += [(rid, "its EP rank was lost after it streamed tokens of several completions (n > 1)")
                       for rid in unrecoverable]
        g._send(batches)
        if g.metrics is not None:
            for _ in continuations:
                g.metrics.on_request_migrated()
        return len(continuations)

    # ---- finding lost ranks ----
    def find_lost(self, members: list[int]) -> list[int]:
        """Ping `members`: those that raise are dead; those that do not answer within probe_timeout_s are stuck and
        killed. Returns both."""
        g = self.group
        gone = [w for w in members if g.actors.local_state(w) in ("gone", "Z")]   # seen on this node: no need to
        refs = {w: g.actors.handles[w].ping.remote() for w in members if w not in gone}    # wait for Ray to tell
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=g.ep.probe_timeout_s)
        late = [ref for w, ref in refs.items() if ref not in ready and self.patience(w) > g.ep.probe_timeout_s]
        if late:                              # alive on this node and not stopped: a starved machine, wait longer
            ready += ray.wait(late, num_returns=len(late), timeout=g.ep.collective_timeout_s)[0]
        lost = gone
        for w, ref in refs.items():
            if ref not in ready:
                logger.error("rank %d is stuck (no answer within %.1fs): killing it", g.actors.rank_of(w),
                             g.ep.probe_timeout_s)
                g.actors.kill(w)
                lost.append(w)
                continue
            try:
                ray.get(ref)
            except ray.exceptions.RayError:
                lost.append(w)
        return lost

    def patience(self, worker: int) -> float:
        """How long a rank may stay silent before it counts as stuck: probe_timeout_s, unless its process is on
        this node and not stopped (its ping is late because the machine is starved): then the collective timeout."""
        g = self.group
        if g.actors.local_state(worker) in ("R", "S", "D"):
            return max(g.ep.probe_timeout_s, g.ep.collective_timeout_s)
        return g.ep.probe_timeout_s

    def kill_stuck(self, worker: int) -> None:
        """RankWatch found `worker` stuck: kill it; its stream's end then starts the recovery."""
        logger.error("rank %d is stuck (no step and no answer for %.1fs): killing it",
                     self.group.actors.rank_of(worker), self.group.ep.probe_timeout_s)
        self.group.actors.kill(worker)

    def _drop(self, workers: list[int]) -> None:
        g = self.group
        for w in workers:
            logger.error("EP rank %d (worker %d) is lost", g.actors.rank_of(w), w)
            g.actors.dead.add(w)
            g.actors.kill(w)
            if g.metrics is not None:
                g.metrics.on_rank_lost(g.actors.rank_of(w))

    def diagnose(self, rank: int, error) -> str:
        """Which rank is at fault (dead ones raise a ping, stuck ones do not answer), then the reporter's error."""
        g = self.group
        refs = [w.ping.remote() for w in g.workers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=g.ep.probe_timeout_s)
        problems = []
        for r, ref in enumerate(refs):
            if ref not in ready:
                problems.append(f"rank {r} is stuck (no answer within {g.ep.probe_timeout_s:.0f}s)")
                continue
            try:
                ray.get(ref)
            except Exception as e:          # noqa: BLE001
                problems.append(f"rank {r} died ({type(e).__name__})")
        if not any(p.startswith(f"rank {rank} ") for p in problems):
            problems.append(f"rank {rank} raised {short(error)}")
        return "; ".join(problems)

    # ---- forming a group ----
    def _join(self, members: list[int], placement: tuple[int, object], new: tuple[int, ...] = ()) -> None:
        """Park `members` (already parked after a failure; else at an agreed step), then regroup them all as ranks
        0..n-1 under `placement` (version, map)."""
        g = self.group
        timeout = g.ep.collective_timeout_s + 5
        self._epochs = epoch = max(self._epochs, g.epoch) + 1
        parked = [w for w in members if w not in new]
        for w in parked:
            g.actors.handles[w].submit.remote([("park", epoch)])
        step = max(ray.get([g.actors.handles[w].parked_step.remote(g.ep.collective_timeout_s) for w in parked],
                           timeout=timeout))
        host, port = ray.get(g.actors.handles[members[0]].rendezvous_address.remote(), timeout=timeout)
        version, layout = placement
        refs = [g.actors.handles[w].regroup.remote(rank, len(members), host, port, layout, version, epoch, step)
                for rank, w in enumerate(members)]
        try:
            infos = ray.get(refs, timeout=timeout)
        except GetTimeoutError as e:
            raise TimeoutError(f"regroup of {len(members)} ranks timed out") from e
        g.adopt_members(members, epoch, step, version, layout)
        logger.info("EP group epoch %d: %d ranks x %d slots, regrouped in %.2fs (slots loaded per rank: %s)",
                    epoch, len(members), layout.slots_per_rank, max(i["regroup_s"] for i in infos),
                    [i["loaded"] for i in infos])

    # ---- back to full size (a thread) ----
    def start_growing(self) -> None:
        if self._growing is None or not self._growing.is_alive():
            self._growing = threading.Thread(target=self._grow_until_full, name="ep-grow", daemon=True)
            self._growing.start()

    def _grow_until_full(self) -> None:
        g, delay = self.group, 1.0
        while not g.actors.closed and g.error is None and len(g.members) < g.ep.ep_size:
            try:
                self._grow()
            except Exception as e:                  # noqa: BLE001  (retried: the bundle may not be free yet)
                if g.actors.closed:
                    return
                logger.warning("could not bring the EP group back to %d ranks (%s); retrying in %.0fs",
                               g.ep.ep_size, short(e), delay)
                time.sleep(delay)
                delay = min(2 * delay, 60.0)

    def _grow(self) -> None:
        g = self.group
        epoch, members = g.epoch, list(g.members)
        free = g.actors.free_bundles()
        layout = ray.get(g.router.full_placement.remote())
        new = [g.actors.spawn(bundle, len(members) + i, g.ep.ep_size) for i, bundle in enumerate(free)]
        try:
            started = time.monotonic()
            infos = ray.get([g.actors.handles[w].prepare.remote(layout, g.ep.collective_timeout_s, g.kv_cache_bytes)
                             for w in new], timeout=PREPARE_TIMEOUT_S)
            for w, info in zip(new, infos):
                g.actors.started(w, info)
            with self.lock:
                if g.epoch != epoch or g.actors.closed or g.error is not None:
                    raise RuntimeError("the group changed while the replacement loaded its weights")
                self.busy = True
                g.hold()
                try:
                    placement = ray.get(g.router.adopt.remote(layout))
                    self._join(members + new, placement, tuple(new))
                except Exception:                   # the members are parked: re-form their group without it
                    try:
                        self._continue_lost(self._reform([]))
                    except EPStepError as e:
                        g.error = e
                    raise
                finally:
                    self.busy = False
                    if g.error is None:
                        g.release_held()
        except BaseException:
            for w in new:
                g.actors.kill(w)
                g.actors.forget(w)
            raise
        for w in new:
            g.actors.read(w)
            if g.metrics is not None:
                g.metrics.on_rank_replaced(g.actors.rank_of(w))
        logger.warning("EP group back at %d ranks (%.1fs after the replacement started)", len(g.members),
                       time.monotonic() - started)


def short(e) -> str:
    """The last line of an error (a Ray task error carries the remote traceback before it), bounded."""
    lines = str(e).strip().splitlines()
    return (lines[-1] if lines else type(e).__name__)[:300]
