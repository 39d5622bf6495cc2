"""`epserve bench ep`: decode step latency of an EP group at ep 2 against ep 1, same checkpoint, same run.

Method: a checkpoint big enough that expert compute is visible (written by model/tiny.py into a temp dir), a local
Ray cluster, and for each ep size and batch size B: B requests with 16-token prompts are admitted and prefilled,
then N decode steps are timed by the ranks, which step on their own (no Ray call on the step path, as in serving).
Reported per B: median step ms at ep 1 and ep 2, their ratio, and the share of ep 2's step time spent inside the
dispatch/combine all-to-alls (measured on the ranks). Prints one JSON line.
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile

logger = logging.getLogger(__name__)


def _spec(quick: bool):
    from model.tiny import TinySpec
    if quick:
        return TinySpec(seed=0, layers=2, hidden=128, heads=4, kv_heads=2, head_dim=32, intermediate=128, experts=8,
                        top_k=2, vocab=1024, sliding_window=64, shards=1)
    return TinySpec(seed=0, layers=4, hidden=512, heads=8, kv_heads=2, head_dim=64, intermediate=512, experts=16,
                    top_k=4, vocab=4096, sliding_window=128, shards=2)


def _measure(group, batch: int, steps: int) -> tuple[float, float]:
    """(median step seconds, mean all-to-all share of rank step time) over `steps` decode steps, as the ranks time
    them (they step on their own: no Ray call on the step path). A step's time is its slowest rank's."""
    from engine.sampling_params import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=steps + 4, ignore_eos=True)
    prompts = [[(7 * i + j) % 1000 + 1 for j in range(16)] for i in range(batch)]
    by_step: dict[int, list] = {}

    def record(_, results) -> None:
        for r in results:
            if r.expert_counts is not None:
                by_step.setdefault(r.step, []).append(r)
    group.generate(prompts, params, on_results=record)
    decode = sorted(by_step)[4:4 + steps]          # after prefill (16 tokens each fits one step budget) settles
    times = [max(r.step_s for r in by_step[s]) for s in decode]
    shares = [statistics.mean(r.all_to_all_s / r.step_s for r in by_step[s] if r.step_s > 0) for s in decode]
    return statistics.median(times), statistics.mean(shares)


def run(quick: bool = False) -> dict:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from cluster.ep_group import EPConfig, EPGroup
    from engine.engine import EngineConfig
    from model.tiny import write_tiny
    spec, steps = _spec(quick), (5 if quick else 20)
    batches = (1, 16, 64)
    engine = EngineConfig(max_num_seqs=64, max_num_batched_tokens=1024, max_model_len=512, block_size=16)
    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
                 configure_logging=False)
    results = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = write_tiny(f"{tmp}/model", spec)
            for ep in (1, 2):
                group = EPGroup(str(path), EPConfig(ep_size=ep, collective_timeout_s=120), engine)
                try:
                    for b in batches:
                        results[(ep, b)] = _measure(group, b, steps)
                        logger.info("ep %d batch %d: %.2f ms/step", ep, b, results[(ep, b)][0] * 1e3)
                finally:
                    group.shutdown()
    finally:
        if own_ray:
            ray.shutdown()
    rows = [{"batch": b, "ep1_step_ms": round(results[(1, b)][0] * 1e3, 3),
             "ep2_step_ms": round(results[(2, b)][0] * 1e3, 3),
             "ep2_over_ep1": round(results[(2, b)][0] / results[(1, b)][0], 3),
             "ep2_all_to_all_share": round(results[(2, b)][1], 3)} for b in batches]
    return {"bench": "ep", "quick": quick, "cpus": os.cpu_count(), "decode_steps": steps,
            "model": {"layers": spec.layers, "hidden": spec.hidden, "experts": spec.experts, "top_k": spec.top_k},
            "results": rows}


def main(quick: bool = False) -> None:
    print(json.dumps(run(quick)))
