"""`epserve bench ep`: the EP decode step at ep 2 against ep 1, the old (variable) and the new (fixed) dispatch side by
side in one run.

Method (bench/ep_probe.py): a checkpoint big enough that expert compute is visible (written by model/tiny.py into a
temp dir); two ranks as processes of a gloo group, each with an engine per dispatch path, rank 0 also with an ep 1
engine; per batch size B, B requests with 16-token prompts are prefilled, then rounds of one ep 1 step (alone, on
every core) and one step of each path are timed, so all three see the same machine load. Then, per path, what a
decode step does is counted by instrumentation: collectives per MoE layer, host read-backs in the forward (the sync
guard counting), step agreements, and dispatch/combine milliseconds with a barrier before each collective. Prints a
table, then one JSON line whose "ep_decode" holds the new path's counts at ep 2 (the most over the batch sizes).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile

logger = logging.getLogger(__name__)
PATHS = ("variable", "fixed")                  # old, new
BATCHES = (1, 16, 64)
TARGET_BATCH = 64
COUNTS = ("collectives_per_moe_layer", "host_syncs_per_step")


def _spec(quick: bool):
    from model.tiny import TinySpec
    if quick:
        return TinySpec(seed=0, layers=2, hidden=128, heads=4, kv_heads=2, head_dim=32, intermediate=128, experts=8,
                        top_k=2, vocab=1024, sliding_window=64, shards=1)
    return TinySpec(seed=0, layers=4, hidden=512, heads=8, kv_heads=2, head_dim=64, intermediate=512, experts=16,
                    top_k=4, vocab=4096, sliding_window=128, shards=2)


def run(quick: bool = False) -> dict:
    from bench.ep_probe import measure
    from model.tiny import write_tiny
    spec, steps = _spec(quick), (8 if quick else 30)
    with tempfile.TemporaryDirectory() as tmp:
        found = measure(str(write_tiny(f"{tmp}/model", spec)), 2, BATCHES, steps)
    rows = [{"batch": b, "ep1_step_ms": round(found[b]["ep1_step_ms"], 3),
             **{d: _row(found[b]["ep1_step_ms"], found[b][d]) for d in PATHS}} for b in BATCHES]
    old, new = (rows[BATCHES.index(TARGET_BATCH)][d]["ep2_over_ep1"] for d in PATHS)
    return {"bench": "ep", "quick": quick, "cpus": os.cpu_count(), "decode_steps": steps,
            "model": {"layers": spec.layers, "hidden": spec.hidden, "experts": spec.experts, "top_k": spec.top_k},
            "ep_decode": {k: max(r["fixed"][k] for r in rows) for k in COUNTS},
            "target": {"batch": TARGET_BATCH, "variable_ep2_over_ep1": old, "fixed_ep2_over_ep1": new,
                       "reduction": round(1 - new / old, 3)},
            "results": rows}


def _row(ep1_ms: float, path: dict) -> dict:
    ep2_ms = path["ep2_step_ms"]
    return {"ep2_step_ms": round(ep2_ms, 3), "ep2_over_ep1": round(ep2_ms / ep1_ms, 3),
            **{k: _number(path[k]) for k in (*COUNTS, "step_agreements_per_step")},
            "comm_ms_per_step": round(path["comm_ms_per_step"], 3),
            "comm_share_of_ep2_step": round(path["comm_ms_per_step"] / ep2_ms, 3)}


def _number(v: float) -> float | int:
    return int(v) if float(v).is_integer() else round(v, 3)


def table(report: dict) -> str:
    head = ("batch", "path", "ep1 ms", "ep2 ms", "ep2/ep1", "coll/layer", "syncs/step", "agree/step", "comm ms",
            "comm share")
    lines = [" ".join(f"{h:>10}" for h in head)]
    for row in report["results"]:
        for d in PATHS:
            r = row[d]
            cells = (row["batch"], d, row["ep1_step_ms"], r["ep2_step_ms"], r["ep2_over_ep1"],
                     r["collectives_per_moe_layer"], r["host_syncs_per_step"], r["step_agreements_per_step"],
                     r["comm_ms_per_step"], f"{100 * r['comm_share_of_ep2_step']:.0f}%")
            lines.append(" ".join(f"{c:>10}" for c in cells))
    t = report["target"]
    lines.append(f"batch {t['batch']}: ep2/ep1 {t['variable_ep2_over_ep1']} (variable) -> {t['fixed_ep2_over_ep1']} "
                 f"(fixed), {100 * t['reduction']:.0f}% lower")
    return "\n".join(lines)


def main(quick: bool = False) -> None:
    report = run(quick)
    print(table(report))
    print(json.dumps(report))
