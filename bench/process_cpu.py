"""CPU seconds of one process session (a server started with start_new_session), grouped by role.

Reads /proc (utime + stime of every process whose session id is the server's) into snapshots; the difference of
two snapshots is the CPU a phase cost. Linux only; it reads, never signals.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

GROUPS = ("proxy", "gateway", "replica", "ranks", "ray")
# Ray workers set their process title to `ray::<actor or Serve replica>`; the first rule that matches wins.
_ROLE_RULES = (("ProxyActor", "proxy"), ("Gateway", "gateway"), ("ModelServer", "replica"), ("EPWorker", "ranks"))
_TICKS = os.sysconf("SC_CLK_TCK")


def classify(title: str) -> str:
    """Process title -> group. Only Ray worker titles (`ray::...`) name a role; raylet, gcs_server, dashboard,
    agents, the Serve controller, ExpertRouter and the `epserve serve` driver itself are all "ray"."""
    if title.startswith("ray::"):
        for needle, group in _ROLE_RULES:
            if needle in title:
                return group
    return "ray"


@dataclasses.dataclass(frozen=True)
class ProcessSample:
    pid: int
    start_ticks: int        # the process's start time: tells a reused pid from the same process
    cpu_s: float            # user + system time so far, all threads
    title: str


def parse_stat(text: str) -> tuple[int, int, float]:
    """(session id, start time in ticks, user + system CPU seconds) from the text of /proc/<pid>/stat.

    The command name (field 2) is in parentheses and may itself hold spaces or ')': split at the last ')'."""
    rest = text[text.rindex(")") + 2:].split()      # rest[0] is field 3 (state)
    session, utime, stime, start = int(rest[3]), int(rest[11]), int(rest[12]), int(rest[19])
    return session, start, (utime + stime) / _TICKS


def is_zombie(stat_text: str) -> bool:
    """An exited process not yet reaped: it runs nothing and cannot be killed."""
    return stat_text[stat_text.rindex(")") + 2] == "Z"


def _title(proc_dir: Path) -> str:
    raw = (proc_dir / "cmdline").read_bytes()
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def snapshot(session_id: int, proc: Path = Path("/proc")) -> dict[int, ProcessSample]:
    """Every live process of the session, by pid (processes that vanish while being read are skipped)."""
    samples = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            stat = (entry / "stat").read_text()
            session, start, cpu = parse_stat(stat)
            if session == session_id and not is_zombie(stat):
                samples[pid] = ProcessSample(pid, start, cpu, _title(entry))
        except (OSError, ValueError, IndexError):
            continue
    return samples


@dataclasses.dataclass
class CPUDelta:
    """CPU seconds a phase cost, per process and per group; `vanished` lists pids that exited during the phase
    (their CPU after the first snapshot is lost, so their group is an underestimate)."""
    by_process: list[tuple[int, str, str, float]]   # (pid, title, group, cpu_s), most CPU first
    by_group: dict[str, float]
    vanished: list[int]

    @property
    def total(self) -> float:
        return sum(self.by_group.values())


def cpu_delta(before: dict[int, ProcessSample], after: dict[int, ProcessSample]) -> CPUDelta:
    """after - before per process; a process born during the phase counts from zero. The title is taken from
    `after` (a replica's title names its method while it starts, e.g. `...ModelServer.__init__`)."""
    rows = []
    for pid, a in after.items():
        b = before.get(pid)
        spent = a.cpu_s - b.cpu_s if b is not None and b.start_ticks == a.start_ticks else a.cpu_s
        rows.append((pid, a.title, classify(a.title), max(spent, 0.0)))
    rows.sort(key=lambda r: -r[3])
    by_group = dict.fromkeys(GROUPS, 0.0)
    for _, _, group, spent in rows:
        by_group[group] += spent
    vanished = sorted(pid for pid, b in before.items()
                      if pid not in after or after[pid].start_ticks != b.start_ticks)
    return CPUDelta(rows, by_group, vanished)


def per_1k_tokens(cpu_s: float, tokens: int) -> float | None:
    """CPU seconds per 1,000 generated tokens; None when nothing was generated."""
    return 1000.0 * cpu_s / tokens if tokens > 0 else None
