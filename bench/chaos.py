"""`epserve bench chaos`: a steady streaming load on a live `epserve serve`, then, in turn, a rank SIGKILL, a rank
SIGSTOP and a replica SIGKILL; reports failed requests, requests whose tokens differ from an undisturbed run, the
longest wait for a next token per event, and the time back to full size.

Method: the server starts in its own session (bench/serve_process.py); every body of the pool runs once undisturbed
(the reference); then `streams` client loops send the pool's bodies back to back (bench/chaos_load.py). After
`steady_s`, each event signals one process of the server's session (bench/chaos_events.py), waits until every rank
and replica process is back and running (or `recover_timeout_s`), lets the load settle for `settle_s`, and the next
event follows. One JSON line on stdout, summary.json, chaos.png and serve.log under --out.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from pathlib import Path

from bench.chaos_events import EVENTS, inject, is_full_size, release
from bench.chaos_load import SteadyLoad, pool_bodies, reference_run
from bench.chaos_report import EventRecord, summarize, write_plot

logger = logging.getLogger(__name__)
POLL_S = 0.25


@dataclasses.dataclass(frozen=True)
class ChaosConfig:
    model: str = "demo"
    ep_size: int = 2
    replicas: int = 2                   # a replica kill needs another replica to continue its streams on
    redundant_experts: int = 0
    streams: int = 16                   # client loops, each one request in flight at a time
    max_tokens: int = 160               # per request, end-of-sequence ignored
    collective_timeout_s: float = 10.0  # passed to the server: how fast a dead or stuck rank is noticed
    steady_s: float = 15.0              # load before the first event
    settle_s: float = 10.0              # load after the server is back at full size, before the next event
    recover_timeout_s: float = 120.0    # an event's wait for full size
    events: tuple[str, ...] = ("rank_kill", "rank_stop", "replica_kill")
    extra_serve_args: tuple[str, ...] = ()
    out: str = "bench-chaos"

    def __post_init__(self):
        for name in ("ep_size", "replicas", "streams", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("collective_timeout_s", "steady_s", "settle_s", "recover_timeout_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be non-negative, got {getattr(self, name)}")
        unknown = [e for e in self.events if e not in EVENTS]
        if unknown or not self.events:
            raise ValueError(f"--events takes a comma-separated list of {', '.join(EVENTS)}, got {self.events}")

    def serve_args(self) -> list[str]:
        args = [] if self.model == "demo" else [self.model]
        return args + ["--ep-size", str(self.ep_size), "--replicas", str(self.replicas), "--redundant-experts",
                       str(self.redundant_experts), "--collective-timeout-s", str(self.collective_timeout_s),
                       *self.extra_serve_args]


async def wait_full_size(config: ChaosConfig, session_id: int, fault, origin: float, timeout_s: float) -> float | None:
    """Seconds on the load's clock when the server is back at full size; None after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if is_full_size(session_id, config.replicas, config.ep_size, fault):
            return time.monotonic() - origin
        await asyncio.sleep(POLL_S)
    return None


async def run_events(config: ChaosConfig, server, bodies: list[dict]) -> tuple[list, list[EventRecord], float, float]:
    """The load with the events in turn; returns (request records, events, load start, end) on the load's clock."""
    origin = time.monotonic()
    if await wait_full_size(config, server.session_id, None, origin, config.recover_timeout_s) is None:
        raise RuntimeError("the server never reached full size before the load")
    load = SteadyLoad(server.url, bodies, config.streams, origin)
    load_start = time.monotonic() - origin
    await load.start()
    await asyncio.sleep(config.steady_s)
    events = []
    for kind in config.events:
        fault = inject(kind, server.session_id, time.monotonic() - origin)
        full_at = await wait_full_size(config, server.session_id, fault, origin, config.recover_timeout_s)
        event = EventRecord(kind, fault.pid, fault.at, None if full_at is None else full_at - fault.at)
        logger.info("%s: full size %s", kind, "never" if full_at is None else f"after {event.full_size_s:.1f} s")
        if full_at is None:
            event.bench_killed = release(fault)
            await wait_full_size(config, server.session_id, None, origin, config.recover_timeout_s)
        events.append(event)
        await asyncio.sleep(config.settle_s)
    await load.stop()
    return load.records, events, load_start, time.monotonic() - origin


def run_chaos(config: ChaosConfig) -> dict:
    from bench.serve_process import ServeProcess
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    with ServeProcess(config.serve_args(), out / "serve.log", ready_timeout_s=600) as server:
        bodies = pool_bodies(server.model, config.streams, config.max_tokens)
        reference = asyncio.run(reference_run(server.url, bodies))
        bad = [r.error for r in reference if not r.ok]
        if bad:
            raise RuntimeError(f"the undisturbed reference run failed ({len(bad)} requests): {bad[0]}")
        records, events, load_start, end = asyncio.run(run_events(config, server, bodies))
    summary = summarize(config, reference, records, events, load_start, end)
    summary["migrations_logged"] = (out / "serve.log").read_text(errors="replace").count("continuing it elsewhere")
    summary["plot"] = str(write_plot(records, events, summary, out / "chaos.png"))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def run(args) -> dict:
    """The CLI verb: --quick shortens every phase unless a flag says otherwise."""
    quick = {"streams": 8, "max_tokens": 96, "steady_s": 8.0, "settle_s": 5.0} if args.quick else {}
    given = {name: getattr(args, name) for name in ("streams", "max_tokens", "steady_s", "settle_s")
             if getattr(args, name) is not None}
    config = ChaosConfig(model=args.model_dir, ep_size=args.ep_size, replicas=args.replicas,
                         redundant_experts=args.redundant_experts, collective_timeout_s=args.collective_timeout_s,
                         recover_timeout_s=args.recover_timeout_s,
                         events=tuple(e.strip() for e in args.events.split(",") if e.strip()),
                         extra_serve_args=tuple(args.serve_arg or ()), out=args.out, **{**quick, **given})
    logging.getLogger("httpx").setLevel(logging.WARNING)
    summary = run_chaos(config)
    print(json.dumps(summary))
    return summary
