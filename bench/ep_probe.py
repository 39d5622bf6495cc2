"""EPProbe: the EP decode step on ranks that are processes (a gloo group over loopback, no Ray), the old and the new
dispatch side by side under the same machine load.

Each of the ep ranks holds two LLMEngines whose MoE layers are EPExperts (dense slots, grouped GEMM) over the ranks'
own group, one per dispatch path: "variable" (the old four all-to-alls with host-side split sizes) and "fixed" (one
dispatch and one combine, its runner attached to the step agreement as a serving rank's is); one more process holds
a plain ep 1 engine using every core. Per batch size B (requests split over the ranks as EPGroup does; a rank without
any joins each step with empty forwards), after prefill:
- timing: N rounds of one ep 1 step (the others wait) then one step of each path on every rank; a step's time is
  its slowest rank's; medians.
- counting (2 steps per path): collective calls inside MoE layers (counted by EPExperts), host read-backs in the
  forward (bench/host_syncs.py's HostSyncCounter: the sync guard, counting), step agreements.
- communication (N steps per path): dispatch and combine seconds with a barrier before each collective, so it is
  the transfer, not the wait for a slower peer; the expert MLP between them is excluded.
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import tempfile
import time

PATHS = ("variable", "fixed")                  # old, new
WARM_STEPS = 3                                 # prefill (B/ep x 16 tokens fit one step), then first decodes
COUNTED_STEPS = 2


def measure(model_dir: str, ep_size: int, batches: tuple[int, ...], steps: int) -> dict[int, dict]:
    """{batch: {"ep1_step_ms": ms, path: {"ep2_step_ms", "collectives_per_moe_layer", "host_syncs_per_step",
    "step_agreements_per_step", "comm_ms_per_step"}}}."""
    from bench.ep_ranks import run_ranks
    with tempfile.TemporaryDirectory() as out:
        run_ranks(_rank, ep_size + 1, model_dir, batches, steps, out, timeout_s=300)
        with open(os.path.join(out, "probe.json")) as f:
            return {int(b): row for b, row in json.load(f).items()}


def _rank(rank: int, world_size: int, model_dir: str, batches, steps: int, out: str) -> None:
    """Ranks [0, ep) are the EP group; the last process is ep 1."""
    import torch
    import torch.distributed as dist

    from model.loader import load_model
    ep_size = world_size - 1
    group = dist.new_group(list(range(ep_size)))
    cpus = os.cpu_count() or 1
    if rank == ep_size:
        torch.set_num_threads(cpus)
        local = load_model(model_dir, torch.float32, experts="dense")
        for b in batches:
            dist.all_gather_object([None] * world_size, _ep1(local, b, steps))
        return
    torch.set_num_threads(max(1, cpus // ep_size))
    models = {d: _ep_model(model_dir, rank, ep_size, d, group) for d in PATHS}
    found = {}
    for b in batches:
        row = _batch(rank, ep_size, group, models, b, steps)
        rows = [None] * world_size
        dist.all_gather_object(rows, row)
        found[b] = {**rows[0], "ep1_step_ms": rows[ep_size]}
    if rank == 0:
        with open(os.path.join(out, "probe.json"), "w") as f:
            json.dump(found, f)


def _ep_model(model_dir: str, rank: int, ep_size: int, dispatch: str, group):
    import torch

    from cluster.ep_experts import EPExperts, EPStats
    from cluster.expert_placement import ExpertPlacement
    from model.config import ModelConfig
    from model.loader import load_model
    cfg = ModelConfig.from_dir(model_dir)
    L, E = cfg.num_hidden_layers, cfg.num_local_experts
    stats = EPStats(L, E, "cpu")
    placement = ExpertPlacement.initial(L, E, ep_size, 0)
    model = load_model(model_dir, torch.float32, experts=lambda i: EPExperts(
        cfg, i, rank, ep_size, placement, stats, torch.float32, group=group, dispatch=dispatch))
    return model, stats, group


class _Path:
    """One dispatch path's engine on this rank, stepping as a serving rank does."""

    def __init__(self, model, stats, group, fixed: bool, engine):
        self.model, self.stats, self.fixed, self.engine = model, stats, fixed, engine
        self.counter = None
        if fixed:                                # as a serving rank's runner: agree before each forward
            stats.step.attach(engine.runner, group)
        self.layers = [layer.mlp.experts for layer in model.model.layers]
        self._forward = model.forward
        model.forward = self._counted

    def _counted(self, *args, **kwargs):
        with self.counter if self.counter is not None else contextlib.nullcontext():
            return self._forward(*args, **kwargs)

    def step(self) -> None:
        import torch
        if self.engine.has_unfinished():
            self.engine.step()
            return
        if self.fixed:                           # an idle rank joins the step with an empty forward
            self.stats.step.agree(0)
        H, K = self.model.config.hidden_size, self.model.config.num_experts_per_tok
        with self.counter if self.counter is not None else contextlib.nullcontext():
            for experts in self.layers:
                experts(torch.empty(0, H), torch.empty(0, K, dtype=torch.long), torch.empty(0, K))

    def counts(self) -> dict:
        from bench.host_syncs import HostSyncCounter
        calls, agreements = self.stats.collectives, self.stats.step.agreements
        self.counter = HostSyncCounter()
        for _ in range(COUNTED_STEPS):
            self.step()
        syncs, self.counter = self.counter.syncs, None
        return {"collectives_per_moe_layer": (self.stats.collectives - calls) / COUNTED_STEPS / len(self.layers),
                "host_syncs_per_step": syncs / COUNTED_STEPS,
                "step_agreements_per_step": (self.stats.step.agreements - agreements) / COUNTED_STEPS}

    def comm_ms(self, steps: int) -> float:
        self.stats.take()
        self.stats.barrier_timing, seconds = True, []
        for _ in range(steps):
            self.step()
            seconds.append(self.stats.take()[1])
        self.stats.barrier_timing = False
        return statistics.median(seconds) * 1e3

    def close(self) -> None:
        self.model.forward = self._forward
        if self.fixed:
            self.stats.step.attached = False


def _engine(model, prompts, steps: int):
    from engine.engine import EngineConfig, LLMEngine
    from engine.sampling_params import SamplingParams
    engine = LLMEngine(model, EngineConfig(max_num_seqs=64, max_num_batched_tokens=1024, max_model_len=512,
                                           block_size=16, kv_cache_memory=256 << 20))
    params = SamplingParams(temperature=0.0, max_tokens=WARM_STEPS + 2 * steps + 2 * COUNTED_STEPS + 4,
                            ignore_eos=True)
    for i, prompt in prompts:
        engine.add_request(f"r{i}", prompt, params)
    return engine


def _prompts(batch: int) -> list[tuple[int, list[int]]]:
    return [(i, [(7 * i + j) % 1000 + 1 for j in range(16)]) for i in range(batch)]


def _ep1(model, batch: int, steps: int) -> float:
    """Median ep 1 step ms: in each round the EP ranks wait at the barrier while it steps alone."""
    import torch.distributed as dist
    engine, times = _engine(model, _prompts(batch), steps), []
    for _ in range(WARM_STEPS + steps):
        dist.barrier()
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
        dist.barrier()
    return statistics.median(times[WARM_STEPS:]) * 1e3


def _batch(rank: int, ep_size: int, group, models: dict, batch: int, steps: int) -> dict:
    """This rank's path rows: step times (slowest rank's), counts, communication."""
    import torch
    import torch.distributed as dist
    mine = _prompts(batch)[rank::ep_size]
    paths = {d: _Path(*models[d], d == "fixed", _engine(models[d][0], mine, steps)) for d in PATHS}
    times: dict[str, list[float]] = {d: [] for d in PATHS}
    for _ in range(WARM_STEPS + steps):
        dist.barrier()                           # ep 1 steps alone between these two
        dist.barrier()
        for d, path in paths.items():
            start = time.perf_counter()
            path.step()
            times[d].append(time.perf_counter() - start)
    row = {}
    for d, path in paths.items():
        slowest = torch.tensor(times[d][WARM_STEPS:], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
        row[d] = {"ep2_step_ms": statistics.median(slowest.tolist()) * 1e3, **path.counts(),
                  "comm_ms_per_step": path.comm_ms(steps)}
        path.close()
    syncs = [None] * ep_size                     # host syncs: the most any rank made
    dist.all_gather_object(syncs, {d: row[d]["host_syncs_per_step"] for d in PATHS}, group=group)
    for d in PATHS:
        row[d]["host_syncs_per_step"] = max(f[d] for f in syncs)
    return row
