"""The chaos benchmark's faults and its size probe, on a server's process session (bench/process_cpu.py snapshots):
SIGKILL or SIGSTOP one EP rank process, SIGKILL one ModelServer replica process; "full size" is every rank and
replica process of the configuration alive, running (not stopped) and past its start-up, read from /proc.

Signals only the pid it picked from the server's own session; never a process group.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
from pathlib import Path

from bench.process_cpu import snapshot

logger = logging.getLogger(__name__)
RANK_TITLE = "ray::EPWorker"
REPLICA_TITLE = "ServeReplica:epserve:ModelServer"
# Process titles (Ray names the running method) of a replica or rank that is not serving yet: constructing,
# loading weights, joining or re-forming its EP group.
STARTING = ("__init__", "initialize", ".setup", ".prepare", ".regroup")
EVENTS = {"rank_kill": (RANK_TITLE, signal.SIGKILL), "rank_stop": (RANK_TITLE, signal.SIGSTOP),
          "replica_kill": (REPLICA_TITLE, signal.SIGKILL)}


def process_state(pid: int) -> str | None:
    """The /proc state letter (R, S, T = stopped, Z = zombie ...), None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2]


def running_pids(titles: dict[int, str], states: dict[int, str | None], title: str) -> list[int]:
    """Pids whose title contains `title` and that can run (not stopped, not a zombie, not gone), sorted."""
    return sorted(pid for pid, t in titles.items() if title in t and states.get(pid) not in (None, "T", "t", "Z"))


def session_view(session_id: int) -> tuple[dict[int, str], dict[int, str | None]]:
    """(pid -> title, pid -> /proc state) of the session's processes now."""
    titles = {pid: sample.title for pid, sample in snapshot(session_id).items()}
    return titles, {pid: process_state(pid) for pid in titles}


@dataclasses.dataclass
class Fault:
    kind: str           # a key of EVENTS
    pid: int
    at: float           # on the load's clock


def inject(kind: str, session_id: int, at: float) -> Fault:
    """Signal one process of the kind's role: the rank with the highest pid (the newest: after an earlier event, its
    replacement) or the replica with the lowest."""
    title, sig = EVENTS[kind]
    titles, states = session_view(session_id)
    pids = running_pids(titles, states, title)
    if not pids:
        raise RuntimeError(f"{kind}: no running process titled {title!r} in session {session_id}")
    pid = pids[-1] if title == RANK_TITLE else pids[0]
    logger.info("%s: %s to pid %d (%s)", kind, signal.Signals(sig).name, pid, titles[pid][:60])
    os.kill(pid, sig)
    return Fault(kind, pid, at)


def is_full_size(session_id: int, replicas: int, ep_size: int, fault: Fault | None = None) -> bool:
    """full_size() of the session now; never while the faulted process is still stopped (a replacement beside a
    stuck rank is not a recovery)."""
    if fault is not None and process_state(fault.pid) in ("T", "t"):
        return False                          # the stopped rank is still there: nothing replaced it yet
    return full_size(*session_view(session_id), replicas, ep_size)


def full_size(titles: dict[int, str], states: dict[int, str | None], replicas: int, ep_size: int) -> bool:
    """`replicas` ModelServer processes and replicas x ep_size rank processes, all running and none still starting
    (STARTING); a stopped or dead one does not count."""
    servers, ranks = running_pids(titles, states, REPLICA_TITLE), running_pids(titles, states, RANK_TITLE)
    starting = [p for p in servers + ranks if any(marker in titles[p] for marker in STARTING)]
    return len(ranks) == replicas * ep_size and len(servers) == replicas and not starting


def release(fault: Fault) -> bool:
    """After the event's window: SIGKILL a rank the server left stopped (so the next event starts from a server
    that can recover); returns whether it had to."""
    if fault.kind == "rank_stop" and process_state(fault.pid) in ("T", "t"):
        logger.warning("rank_stop: pid %d is still stopped; the bench kills it", fault.pid)
        os.kill(fault.pid, signal.SIGKILL)
        return True
    return False
