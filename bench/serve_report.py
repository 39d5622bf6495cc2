"""The serving benchmark's report: throughput and its served / in-process ratios, latency percentiles, CPU per
1,000 tokens per server process group, and the PNG (matplotlib, Agg).

Pure functions of bench/serve_bench.py's phase results; runs nothing.
"""
from __future__ import annotations

import dataclasses

from bench.load_report import percentile
from bench.process_cpu import GROUPS, per_1k_tokens

PATHS = ("in_process", "completions", "chat")


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def latency_stats(values: list[float]) -> dict:
    return {"p50": percentile(values, 0.5), "p95": percentile(values, 0.95)}


def outputs_match(expected_texts: list[str], results: list) -> bool:
    """Every stream completed and its text equals the decoded in-process tokens of the same prompt, in order."""
    return len(expected_texts) == len(results) and all(
        r.ok and r.text == text for r, text in zip(results, expected_texts))


def phase_summary(phase: dict) -> dict:
    """One HTTP path: tokens/s over the wall time of all streams, latencies, and the server's CPU by group."""
    ok = [r for r in phase["results"] if r.ok]
    tokens = sum(r.num_tokens for r in ok)
    cpu = phase["cpu"]
    per_group = {g: per_1k_tokens(cpu.by_group[g], tokens) for g in GROUPS}
    per_group["server_total"] = per_1k_tokens(cpu.total, tokens)
    return {
        "tokens": tokens, "wall_s": phase["wall_s"], "completed": len(ok), "failed": len(phase["results"]) - len(ok),
        "errors": sorted({r.error for r in phase["results"] if r.error})[:3],
        "tok_s": tokens / phase["wall_s"] if phase["wall_s"] > 0 else 0.0,
        "ttft_s": latency_stats([r.ttft for r in ok if r.ttft is not None]),
        "itl_s": latency_stats([x for r in ok for x in r.itls]),
        "tpot_s": latency_stats([r.tpot for r in ok if r.tpot is not None]),
        "chunks_per_token": sum(r.num_chunks for r in ok) / tokens if tokens else None,
        "cpu_s": {g: round(cpu.by_group[g], 2) for g in GROUPS},
        "cpu_s_per_1k_tokens": per_group,
        "client_cpu_s_per_1k_tokens": per_1k_tokens(phase["client_cpu_s"], tokens),
        "top_processes": [{"pid": pid, "title": title[:70], "group": group, "cpu_s": round(spent, 2)}
                          for pid, title, group, spent in cpu.by_process[:8] if spent > 0],
        "vanished_pids": cpu.vanished,
    }


def summarize(config, in_proc: dict, phases: dict[str, dict], match: bool) -> dict:
    """The JSON line: config, throughput per path and ratios, latencies and CPU per HTTP path, outputs_match."""
    per_path = {name: phase_summary(phase) for name, phase in phases.items()}
    shown = ("tok_s", "ttft_s", "itl_s", "tpot_s", "cpu_s_per_1k_tokens")        # at the top level, by path
    in_tok_s = in_proc["tokens"] / in_proc["wall_s"] if in_proc["wall_s"] > 0 else 0.0
    in_cpu_1k = per_1k_tokens(in_proc["cpu_s"], in_proc["tokens"])
    throughput = {"in_process": in_tok_s, **{n: p["tok_s"] for n, p in per_path.items()}}
    return rounded({
        "config": dataclasses.asdict(config),
        "throughput_tok_s": throughput,
        "served_over_in_process": {n: ratio(p["tok_s"], in_tok_s) for n, p in per_path.items()},
        "ttft_s": {n: p["ttft_s"] for n, p in per_path.items()},
        "itl_s": {n: p["itl_s"] for n, p in per_path.items()},
        "tpot_s": {n: p["tpot_s"] for n, p in per_path.items()},
        "cpu_s_per_1k_tokens": {"in_process": in_cpu_1k, **{n: p["cpu_s_per_1k_tokens"] for n, p in per_path.items()}},
        "server_cpu_over_in_process": {n: ratio(p["cpu_s_per_1k_tokens"]["server_total"], in_cpu_1k)
                                       for n, p in per_path.items()},
        "outputs_match": match,
        "tokens": {"in_process": in_proc["tokens"], **{n: p["tokens"] for n, p in per_path.items()}},
        "paths": {n: {k: v for k, v in p.items() if k not in shown} for n, p in per_path.items()},
    })


def rounded(value, digits: int = 4):
    """Floats to `digits` significant digits, through dicts and lists: a JSON line a person can read."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


def write_plot(summary: dict, path):
    """Two panels: tokens/s per path; CPU seconds per 1,000 tokens, stacked by server process group, per path."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
    names = [n for n in PATHS if n in summary["throughput_tok_s"]]
    values = [summary["throughput_tok_s"][n] for n in names]
    bars = ax[0].bar(names, values, color=["tab:gray", "tab:blue", "tab:orange"][:len(names)])
    ax[0].bar_label(bars, fmt="%.0f")
    ax[0].set(title="Throughput (all requests at once)", ylabel="generated tokens/s")
    cpu = summary["cpu_s_per_1k_tokens"]
    ax[1].bar(["in_process"], [cpu["in_process"] or 0.0], color="tab:gray", label="engine (in process)")
    http = [n for n in names if n != "in_process"]
    bottom = [0.0] * len(http)
    for group, color in zip(GROUPS, ("tab:purple", "tab:blue", "tab:green", "tab:red", "tab:olive")):
        heights = [cpu[n][group] or 0.0 for n in http]
        ax[1].bar(http, heights, bottom=bottom, color=color, label=group)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax[1].set(title="CPU seconds per 1,000 tokens", ylabel="CPU s / 1k tokens")
    ax[1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    c = summary["config"]
    fig.suptitle(f"epserve bench serve: {c['requests']} x {c['max_tokens']} tokens, ep {c['ep_size']}, "
                 f"outputs_match={summary['outputs_match']}")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
