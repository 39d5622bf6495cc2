"""The chaos benchmark's report: per fault event, the requests that failed or whose tokens differ from the
undisturbed run, the longest wait for a next token, the time back to full size; the JSON summary and the PNG timeline
(streamed tokens/s with the events marked; matplotlib, Agg).

Pure functions of bench/chaos.py's records; runs nothing.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from bench.chaos_load import RequestRecord

BIN_S = 1.0        # the timeline's tokens/s bins


@dataclasses.dataclass
class EventRecord:
    kind: str
    pid: int
    at: float                      # seconds on the load's clock
    full_size_s: float | None      # fault -> every rank and replica process back; None: not within the timeout
    bench_killed: bool = False     # a stopped rank the server never handled, killed by the bench after the window


def changed(record: RequestRecord, reference: RequestRecord) -> bool:
    """A completed request whose text or token count differs from the undisturbed run of the same body."""
    return record.ok and (record.text != reference.text or record.num_tokens != reference.num_tokens)


def window_stats(records: list[RequestRecord], reference: list[RequestRecord], start: float, end: float) -> dict:
    """Requests that ended in [start, end), and the longest wait for a next token that ended in it."""
    ended = [r for r in records if r.end is not None and start <= r.end < end]
    failed = [r for r in ended if not r.ok]
    gaps = [(length, r) for r in records for t, length in r.gaps() if start <= t < end]
    in_flight = sum(1 for r in records if r.start < start and (r.end is None or r.end >= start))
    return {"in_flight_at_start": in_flight, "requests_ended": len(ended), "failed": len(failed),
            "changed": sum(1 for r in ended if changed(r, reference[r.body])),
            "errors": sorted({r.error for r in failed if r.error})[:3],
            "longest_gap_s": round(max((g for g, _ in gaps), default=0.0), 3)}


def tokens_per_s(records: list[RequestRecord], horizon: float) -> list[float]:
    """Streamed tokens per second in BIN_S bins from 0 to `horizon`."""
    bins = [0.0] * (int(horizon / BIN_S) + 1)
    for r in records:
        last = 0
        for t, total in r.chunks:
            bins[min(int(t / BIN_S), len(bins) - 1)] += (total - last) / BIN_S
            last = total
    return bins


def tokens_between(records: list[RequestRecord], start: float, end: float) -> int:
    """Tokens streamed in [start, end)."""
    total = 0
    for r in records:
        last = 0
        for t, count in r.chunks:
            total += count - last if start <= t < end else 0
            last = count
    return total


def summarize(config, reference: list[RequestRecord], records: list[RequestRecord], events: list[EventRecord],
              load_start: float, end: float) -> dict:
    """The JSON line: the configuration, the steady window before the first event, one entry per event (its window
    runs to the next event), and totals."""
    first = events[0].at if events else end
    steady = window_stats(records, reference, load_start, first)
    steady["tok_s"] = round(tokens_between(records, load_start, first) / max(first - load_start, 1e-9), 1)
    per_event = []
    for i, event in enumerate(events):
        stop = events[i + 1].at if i + 1 < len(events) else end
        per_event.append({"event": event.kind, "pid": event.pid, "at_s": round(event.at, 2),
                          "full_size_s": None if event.full_size_s is None else round(event.full_size_s, 2),
                          "bench_killed_stopped_rank": event.bench_killed,
                          **window_stats(records, reference, event.at, stop)})
    done = [r for r in records if r.end is not None]
    return {
        "config": dataclasses.asdict(config),
        "requests": len(done), "failed": sum(1 for r in done if not r.ok),
        "changed": sum(1 for r in done if changed(r, reference[r.body])),
        "tokens": sum(r.num_tokens for r in done if r.ok), "duration_s": round(end, 1),
        "steady": steady, "events": per_event,
    }


def write_plot(records: list[RequestRecord], events: list[EventRecord], summary: dict, path: Path) -> Path:
    """Streamed tokens/s over time; each event a vertical line with its recovery span shaded, failed requests
    as red crosses at the time they ended."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    end = max([r.end for r in records if r.end is not None], default=1.0)
    bins = tokens_per_s(records, end)
    fig, ax = plt.subplots(figsize=(11, 4.5), constrained_layout=True)
    ax.step([i * BIN_S for i in range(len(bins))], bins, where="post", color="tab:green", label="tokens/s")
    top = max(bins, default=1.0) or 1.0
    colors = {"rank_kill": "tab:red", "rank_stop": "tab:purple", "replica_kill": "tab:orange"}
    for event, stats in zip(events, summary["events"]):
        color = colors.get(event.kind, "black")
        ax.axvline(event.at, color=color, linestyle="--")
        if event.full_size_s is not None:
            ax.axvspan(event.at, event.at + event.full_size_s, color=color, alpha=0.12)
        label = (f"{event.kind}\nfailed {stats['failed']}, changed {stats['changed']}\n"
                 f"gap {stats['longest_gap_s']:.1f}s, full size "
                 + ("never" if event.full_size_s is None else f"{event.full_size_s:.0f}s"))
        ax.text(event.at, top * 1.02, label, color=color, fontsize=8, va="bottom")
    failed = [r.end for r in records if r.end is not None and not r.ok]
    ax.scatter(failed, [0.0] * len(failed), marker="x", color="red", label=f"failed requests ({len(failed)})",
               zorder=3)
    ax.set(xlabel="time (s)", ylabel="streamed tokens/s", ylim=(0, top * 1.35))
    ax.legend(loc="lower right")
    c = summary["config"]
    fig.suptitle(f"epserve bench chaos: {c['replicas']} x ep {c['ep_size']} (redundant {c['redundant_experts']}), "
                 f"{c['streams']} streams; {summary['failed']} failed, {summary['changed']} changed of "
                 f"{summary['requests']} requests")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
