"""The load generator's report: exact percentiles and the JSON summary of a run, and its PNG plot (matplotlib, Agg).

Works on bench/load.py's RequestResults only; sends nothing.
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter
from pathlib import Path

QUANTILES = (0.5, 0.9, 0.99)


def percentile(values: list[float], q: float) -> float | None:
    """Exact q-quantile with linear interpolation between order statistics (numpy's default method)."""
    if not values:
        return None
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _stats(values: list[float]) -> dict:
    out = {f"p{round(q * 100)}": percentile(values, q) for q in QUANTILES}
    out["mean"] = sum(values) / len(values) if values else None
    out["count"] = len(values)
    return out


def summarize(results: list, duration_s: float, config) -> dict:
    """The JSON summary: latency percentiles (s), throughput, and outcomes by status code."""
    ok = [r for r in results if r.ok]
    statuses = Counter(r.status for r in results)
    output_tokens = sum(r.output_tokens for r in ok)
    return {
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "api_key"},
        "requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "duration_s": duration_s,
        "request_throughput": len(ok) / duration_s if duration_s > 0 else 0.0,
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / duration_s if duration_s > 0 else 0.0,
        "ttft_s": _stats([r.ttft for r in ok if r.ttft is not None]),
        "itl_s": _stats([x for r in ok for x in r.itls]),
        "e2e_s": _stats([r.e2e for r in ok]),
        "status_codes": dict(sorted(statuses.items())),
        "errors": {s: n for s, n in sorted(statuses.items()) if s != "200"},
    }


def _token_times(ok: list) -> list[float]:
    """When each token chunk arrived, in seconds since the run began (first token, then the ITL gaps)."""
    times = []
    for r in ok:
        t = r.start + r.ttft if r.ttft is not None else None
        for gap in [0.0] + r.itls if t is not None else ():
            t += gap
            times.append(t)
    return times


def write_plot(results: list, path: Path) -> Path:
    """Four panels: TTFT and ITL distributions, e2e latency by arrival time, output tokens/s over the run."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    ok = [r for r in results if r.ok]
    fig, ax = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    ax[0][0].hist([r.ttft * 1e3 for r in ok if r.ttft is not None], bins=30, color="tab:blue")
    ax[0][0].set(title="Time to first token", xlabel="ms", ylabel="requests")
    ax[0][1].hist([x * 1e3 for r in ok for x in r.itls], bins=30, color="tab:orange")
    ax[0][1].set(title="Inter-token latency", xlabel="ms", ylabel="tokens")
    failed = [r for r in results if not r.ok]
    ax[1][0].scatter([r.start for r in ok], [r.e2e for r in ok], s=8, label="ok")
    ax[1][0].scatter([r.start for r in failed], [0.0] * len(failed), s=12, marker="x", color="red", label="failed")
    ax[1][0].set(title="End-to-end latency by arrival", xlabel="arrival (s)", ylabel="e2e (s)")
    ax[1][0].legend(loc="best")
    times = _token_times(ok)
    horizon = max(times, default=1.0)
    width = max(horizon / 40, 0.01)
    bins = [0.0] * (int(horizon / width) + 1)
    for t in times:
        bins[int(t / width)] += 1 / width
    ax[1][1].step([i * width for i in range(len(bins))], bins, where="post", color="tab:green")
    ax[1][1].set(title="Streamed tokens/s", xlabel="time (s)", ylabel="tokens/s")
    fig.suptitle(f"epserve bench load: {len(ok)}/{len(results)} requests ok")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
