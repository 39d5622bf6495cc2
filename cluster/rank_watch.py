"""RankWatch: finds an EP group's stuck ranks (a process that is alive but does not step: SIGSTOP, a hung driver).

A thread pings every member once per interval (EPWorker.ping answers on its own actor thread, whatever the step
loop does). A rank that has reported nothing and answered no ping for probe_timeout_s is stuck: it is killed, and
its death is then handled like any lost rank. Without this, its peers would wait in their collectives until the
collective timeout. A slow but live rank still answers pings, so a long step is never mistaken for a stuck rank; and
on this node a silent rank whose process is not stopped (a starved machine: its ping is just late) gets until the
collective timeout.
"""
from __future__ import annotations

import logging
import threading
import time

import ray

logger = logging.getLogger(__name__)
INTERVAL_S = 0.5


class RankWatch:
    def __init__(self, group, recovery, interval_s: float = INTERVAL_S):
        self.group, self.recovery, self.interval_s = group, recovery, interval_s
        self._thread = threading.Thread(target=self._run, name="ep-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        g = self.group
        pending: dict[int, object] = {}              # worker -> its ping in flight
        answered: dict[int, float] = {}              # worker -> when it last answered one
        while not g.actors.closed and g.error is None:
            time.sleep(self.interval_s)
            now = time.monotonic()
            for w in list(g.members):
                if w in g.actors.dead:
                    pending.pop(w, None)
                    continue
                answered.setdefault(w, now)
                if w in pending and ray.wait([pending[w]], timeout=0)[0]:
                    del pending[w]                   # answered (or died: its result stream reports that)
                    answered[w] = now
                if w not in pending:
                    pending[w] = g.actors.handles[w].ping.remote()
                elif min(now - answered[w], now - g.actors.last_seen.get(w, now)) > self.recovery.patience(w):
                    del pending[w]
                    self.recovery.kill_stuck(w)
