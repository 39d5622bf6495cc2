"""RankActors: the EPWorker actors of one EP group, known by a worker id that survives regroups (a rank number does
not): where each runs (its placement-group bundle; its node and pid, to kill a stuck one), which are members and in
which rank order, which are dead, and the inbox into which a thread per actor moves its stream of results.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import queue
import signal
import threading
import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster.ep_worker import EPWorker
from cluster.placement import group_placement, on_bundle, rank_bundle

_ids = itertools.count()


class StreamEnded(RuntimeError):
    """A rank's result stream ended while the group was open."""


class RankActors:
    def __init__(self, ep, model_dir: str, engine_config, eos_token_ids: tuple[int, ...]):
        self.ep, self.model_dir, self.engine_config, self.eos_token_ids = ep, model_dir, engine_config, eos_token_ids
        self.pg, self.first_bundle = group_placement(ep.ep_size, ep.device, ep.placement_strategy)
        self._own_pg = self.pg if self.first_bundle == 0 else None
        self.inbox: queue.Queue = queue.Queue()     # (worker id, [StepResult | RankBroken] | its stream's error)
        self.handles: dict[int, ray.actor.ActorHandle] = {}     # worker id -> actor (members and joining ones)
        self.bundle_of: dict[int, int] = {}
        self.process_of: dict[int, tuple[str, int]] = {}       # worker id -> (Ray node id, pid)
        self.last_seen: dict[int, float] = {}                   # worker id -> when it last reported anything
        self.dead: set[int] = set()
        self.members: list[int] = []                            # worker ids by rank
        self.closed = False

    @property
    def workers(self) -> list:
        """The member actors in rank order."""
        return [self.handles[w] for w in self.members]

    def rank_of(self, worker: int) -> int:
        return self.members.index(worker)

    def spawn(self, bundle: int, rank: int, ep_size: int) -> int:
        """Start a rank actor in placement-group bundle `bundle`; returns its worker id."""
        wid = next(_ids)
        spec = rank_bundle(self.ep.device)
        self.handles[wid] = ray.remote(EPWorker).options(
            scheduling_strategy=on_bundle(self.pg, bundle), num_cpus=spec["CPU"], num_gpus=spec.get("GPU", 0),
            max_concurrency=8).remote(rank, ep_size, self.model_dir, self.engine_config, self.ep.dtype,
                                      self.ep.device, self.eos_token_ids, self.ep.experts)
        self.bundle_of[wid] = bundle
        return wid

    def started(self, worker: int, info: dict) -> None:
        """`info`: what its setup or prepare returned."""
        self.process_of[worker] = (info["node_id"], info["pid"])

    def free_bundles(self) -> list[int]:
        """Bundles of the group's placement group that no member holds (a lost rank's)."""
        return sorted(set(range(self.first_bundle, self.first_bundle + self.ep.ep_size))
                      - {self.bundle_of[w] for w in self.members})

    def read(self, worker: int) -> None:
        """Start the thread that moves the worker's result stream into the inbox."""
        stream = self.handles[worker].results.options(num_returns="streaming").remote()
        self.last_seen[worker] = time.monotonic()
        threading.Thread(target=self._read, args=(worker, stream), name=f"ep-read-{worker}", daemon=True).start()

    def _read(self, worker: int, stream) -> None:
        try:
            for ref in stream:
                self.inbox.put((worker, ray.get(ref)))
                self.last_seen[worker] = time.monotonic()
            if not self.closed:
                raise StreamEnded(f"worker {worker}'s result stream ended")
        except Exception as e:                    # noqa: BLE001  (handed to the reader of the inbox)
            if not self.closed:
                self.inbox.put((worker, e))

    def local_state(self, worker: int) -> str | None:
        """The /proc state of the worker's process when it runs on this node (R running, S sleeping, T stopped, Z
        zombie, "gone" when it exited); None when elsewhere or unknown."""
        node, pid = self.process_of.get(worker, (None, None))
        if pid is None or node != ray.get_runtime_context().get_node_id():
            return None
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return "gone"

    def kill(self, worker: int) -> None:
        """SIGKILL the worker's process (a stopped process ignores Ray's polite kill for seconds, and the sockets
        its peers wait on close only when it exits), then tell Ray."""
        node, pid = self.process_of.get(worker, (None, None))
        if pid is not None:
            if node == ray.get_runtime_context().get_node_id():
                _sigkill(pid)
            else:
                ray.remote(num_cpus=0)(_sigkill).options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(pid)
        ray.kill(self.handles[worker])

    def forget(self, worker: int) -> None:
        """A replacement that never joined."""
        self.handles.pop(worker, None)
        self.bundle_of.pop(worker, None)
        self.process_of.pop(worker, None)

    def shutdown(self) -> None:
        self.closed = True
        for actor in list(self.handles.values()):
            ray.kill(actor)
        if self._own_pg is not None:
            ray.util.remove_placement_group(self._own_pg)


def _sigkill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)
