"""Where a decode step's time goes: torch.profiler over batch-1 (or batch-N) decode steps, kernels summed by name.

Builds random gpt-oss-20b weights as gpu_check does (packed MXFP4 experts, bf16), then profiles the same decode
steps twice: eager (every kernel launched from Python: the per-kernel device time is what each kernel costs) and
graph-replayed (the step users get: wall time per step against the device time its kernels add up to, which shows
how much of the step is launch gaps). One JSON line; --device cpu --tiny runs the same code in seconds.
  python bench/decode_profile.py [--batch 1] [--steps 16] [--top 15] [--tiny] [--device cuda|cpu]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.device_stats import prompts, sync                                     # noqa: E402
from bench.gpu_check import REAL_20B, TINY, FULL_PLAN, TINY_PLAN, make_engine, materialise, meta_model  # noqa: E402
from engine.sampling_params import SamplingParams                                # noqa: E402


def _device_us(event, cuda: bool = True) -> float:
    """Self time of an aggregated profiler event on the device (CUDA) or the host (CPU runs), microseconds."""
    names = ("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",)
    return next((float(getattr(event, n)) for n in names if hasattr(event, n)), 0.0)


def profile_steps(engine, batch: list[list[int]], steps: int, device: torch.device, top: int) -> dict:
    """Prefill `batch`, then profile `steps` decode steps: wall ms per step, device ms per step summed over
    kernels, and the `top` kernels by device time."""
    from torch.profiler import ProfilerActivity, profile
    params = SamplingParams(temperature=0.0, max_tokens=engine.config.max_model_len, ignore_eos=True)
    ids = [f"profile-{i}-{time.monotonic_ns()}" for i in range(len(batch))]
    for rid, p in zip(ids, batch):
        engine.add_request(rid, p, params)
    started: set[str] = set()
    while len(started) < len(ids):
        started.update(o.request_id for o in engine.step())
    for _ in range(3):                                                         # warm-up decode steps
        engine.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        sync(device)
        wall = time.perf_counter() - start
    for rid in ids:
        engine.abort(rid)
    by_name: dict[str, float] = collections.defaultdict(float)
    kernels = [e for e in prof.key_averages() if device.type != "cuda" or _is_kernel(e)]
    for e in kernels:
        by_name[e.key] += _device_us(e, device.type == "cuda")
    total = sum(by_name.values())
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
    return {"wall_ms_per_step": round(wall * 1e3 / steps, 3), "device_ms_per_step": round(total / 1e3 / steps, 3),
            "top": [{"name": n[:120], "ms_per_step": round(us / 1e3 / steps, 4),
                     "share": round(us / total, 3) if total else 0.0} for n, us in ranked]}


def _is_kernel(event) -> bool:
    """A device-side activity (a kernel or a memcpy/memset), not a CPU op whose children hold the device time."""
    device_type = getattr(event, "device_type", None)
    return device_type is not None and "CUDA" in str(device_type) and _device_us(event) > 0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    spec, plan = (TINY, TINY_PLAN) if args.tiny else (REAL_20B, FULL_PLAN)
    model = materialise(meta_model(spec, dtype), device)
    batch = prompts(args.batch, plan.prompt_tokens, model.config.vocab_size, seed=args.batch)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "model": "tiny" if args.tiny else "gpt-oss-20b", "batch": args.batch, "steps": args.steps}
    for name, graphs in (("eager", False), ("graphs", device.type == "cuda")):
        engine = make_engine(model, plan, cuda_graphs=graphs)
        result[name] = profile_steps(engine, batch, args.steps, device, args.top)
        del engine
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
