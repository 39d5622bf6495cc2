"""`epserve bench engine [--quick]`: decode throughput of our engine against transformers, and batch-1 decode
against this machine's memory-bandwidth roofline, in one run. Prints one JSON line on stdout; progress on stderr.

Method (bench/decode_timing.py has the timing details):
- Throughput: a small gpt-oss-shaped checkpoint (8 query heads per KV head, head_dim 64, sliding window 128 on
  alternate layers, top-4 of 16 experts) is written by model/tiny.py into a temp dir and loaded twice: by our
  loader and by transformers' GptOssForCausalLM (Mxfp4Config(dequantize=True), eager attention, its default
  experts implementation), both fp32 on the CPU, torch threads = the core count. For each concurrency c, c seeded
  random prompts of equal length (no padding needed) decode greedily with EOS ignored; only decode steps are
  timed (start-up and prefill excluded for both). Repeats are interleaved (ours, transformers, ours, ...) and the
  best of each is kept, as noise from other processes only ever slows a run down. Both must produce the same
  greedy tokens: `outputs_match` is the fraction of sequences that do. A second comparison with short prompts
  shows how much of the gap is context length (KV reads) rather than per-step overhead.
- Roofline: a checkpoint whose weights do not fit in the caches (hundreds of MB read per token) decodes one
  sequence; bandwidth is a large tensor copy (bytes read + written / time, best of 5) measured in the same run,
  bytes per token come from the config (bench/roofline.py states the formula).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile

import torch

from model.tiny import TinySpec, write_tiny

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What one run measures; FULL and QUICK are the CLI's presets, tests use tiny ones."""
    model: TinySpec                         # the throughput comparison's checkpoint
    prompt_tokens: int                      # per sequence; equal for all
    decode_steps: int                       # timed decode steps per run
    repeats: int                            # interleaved runs per implementation; the best is reported
    roofline_model: TinySpec                # batch-1 roofline checkpoint: weights must stream from DRAM
    roofline_steps: int
    concurrency: tuple[int, ...] = (1, 8, 32)
    short_prompt_tokens: int | None = 64    # second comparison at the largest concurrency; None: skip
    roofline_prompt_tokens: int = 64
    bandwidth_bytes: int = 1 << 30          # copied tensor: far larger than the last-level cache


THROUGHPUT_MODEL = TinySpec(seed=0, layers=4, hidden=256, heads=16, kv_heads=2, head_dim=64, intermediate=256,
                            experts=16, top_k=4, vocab=8192, sliding_window=128, shards=1)
FULL = BenchConfig(
    model=THROUGHPUT_MODEL, prompt_tokens=512, decode_steps=32, repeats=5, roofline_steps=32,
    roofline_model=TinySpec(seed=0, layers=6, hidden=1024, heads=16, kv_heads=2, head_dim=64, intermediate=1024,
                            experts=32, top_k=4, vocab=32768, sliding_window=128, shards=1))
QUICK = BenchConfig(
    model=THROUGHPUT_MODEL, prompt_tokens=512, decode_steps=16, repeats=1, roofline_steps=12,
    short_prompt_tokens=None, bandwidth_bytes=512 << 20,
    roofline_model=TinySpec(seed=0, layers=2, hidden=1024, heads=16, kv_heads=2, head_dim=64, intermediate=1024,
                            experts=32, top_k=4, vocab=16384, sliding_window=128, shards=1))


def _model_fields(spec: TinySpec) -> dict:
    return {k: v for k, v in dataclasses.asdict(spec).items() if k not in ("seed", "shards", "experts_format")}


def _prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (count, length), generator=g).tolist()


def _engine(model, max_seqs: int, max_len: int):
    """An engine whose full-attention KV pool holds max_seqs sequences of max_len tokens (fp32, blocks of 16)."""
    from engine.engine import EngineConfig, LLMEngine
    from engine.kv_budget import kv_bytes_for
    cfg, budget, block = model.config, max(2048, max_seqs), 16
    kv_bytes = kv_bytes_for(cfg, torch.float32, block, max_seqs, budget, max_seqs * -(-max_len // block))
    return LLMEngine(model, EngineConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, block_size=block,
                                         max_model_len=max_len, kv_cache_bytes=kv_bytes))


def _load_transformers(path):
    from transformers import GptOssForCausalLM, Mxfp4Config
    hf = GptOssForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                           quantization_config=Mxfp4Config(dequantize=True)).eval()
    if {p.dtype for p in hf.parameters()} != {torch.float32}:
        raise RuntimeError("transformers did not load the checkpoint in float32")
    return hf


def _compare(ours, hf, prompts: list[list[int]], steps: int, repeats: int) -> dict:
    """Interleaved repeats of both implementations on the same prompts; best tokens/s of each, their ratio."""
    from bench.decode_timing import time_ours, time_transformers
    ours_runs, hf_runs = [], []
    for _ in range(repeats):
        ours_runs.append(time_ours(ours, prompts, steps))
        hf_runs.append(time_transformers(hf, prompts, steps))
    best_ours, best_hf = max(r[0] for r in ours_runs), max(r[0] for r in hf_runs)
    same = sum(a == b for a, b in zip(ours_runs[0][1], hf_runs[0][1])) / len(prompts)
    return {"ours_tok_s": round(best_ours, 2), "transformers_tok_s": round(best_hf, 2),
            "ratio": round(best_ours / best_hf, 2), "outputs_match": round(same, 3),
            "ours_runs_tok_s": [round(r[0], 1) for r in ours_runs],
            "transformers_runs_tok_s": [round(r[0], 1) for r in hf_runs]}


def _throughput(config: BenchConfig, tmp: str) -> dict:
    from model.loader import load_model
    spec = config.model
    path = write_tiny(os.path.join(tmp, "throughput"), spec)
    prompt_lens = [config.prompt_tokens] + ([config.short_prompt_tokens] if config.short_prompt_tokens else [])
    ours = _engine(load_model(path, torch.float32), max(config.concurrency),
                   max(prompt_lens) + config.decode_steps + 2 * max(config.concurrency) + 16)
    hf = _load_transformers(path)
    warm = _prompts(1, config.prompt_tokens, spec.vocab, seed=99)
    _compare(ours, hf, warm, 2, 1)                                                       # warm-up, not reported
    out = {"model": _model_fields(spec), "prompt_tokens": config.prompt_tokens,
           "decode_steps": config.decode_steps, "repeats": config.repeats,
           "transformers_experts_implementation": getattr(hf.config, "_experts_implementation", None),
           "concurrency": {}}
    for c in config.concurrency:
        logger.info("throughput: %d concurrent, %d-token prompts", c, config.prompt_tokens)
        prompts = _prompts(c, config.prompt_tokens, spec.vocab, seed=c)
        out["concurrency"][str(c)] = _compare(ours, hf, prompts, config.decode_steps, config.repeats)
    if config.short_prompt_tokens:
        c = max(config.concurrency)
        logger.info("throughput: %d concurrent, %d-token prompts", c, config.short_prompt_tokens)
        prompts = _prompts(c, config.short_prompt_tokens, spec.vocab, seed=1000 + c)
        out["short_prompt"] = {"prompt_tokens": config.short_prompt_tokens, "concurrency": c,
                               **_compare(ours, hf, prompts, config.decode_steps, config.repeats)}
    return out


def _roofline(config: BenchConfig, tmp: str) -> dict:
    from bench.decode_timing import time_ours
    from bench.roofline import measure_bandwidth, roofline
    from model.loader import load_model
    spec, P, steps = config.roofline_model, config.roofline_prompt_tokens, config.roofline_steps
    logger.info("roofline: writing and loading the checkpoint")
    model = load_model(write_tiny(os.path.join(tmp, "roofline"), spec), torch.float32)
    engine = _engine(model, 1, P + steps + 8)
    prompt = _prompts(1, P, spec.vocab, seed=7)
    time_ours(engine, prompt, 2)                                                          # warm-up
    logger.info("roofline: batch-1 decode and memory bandwidth")
    tok_s = max(time_ours(engine, prompt, steps)[0] for _ in range(config.repeats))
    bandwidth = measure_bandwidth(config.bandwidth_bytes)
    return {"model": _model_fields(spec), "prompt_tokens": P, "decode_steps": steps,
            **roofline(model.config, torch.float32, range(P, P + steps), tok_s, bandwidth)}


def run(config: BenchConfig, threads: int | None = None) -> dict:
    """The whole benchmark as one JSON-able dict. `threads`: torch intra-op threads (default: the usable cores)."""
    import transformers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or cores)
    result = {"benchmark": "engine", "torch_threads": torch.get_num_threads(), "cpu_cores": cores,
              "machine": platform.machine(), "torch": torch.__version__,
              "transformers": transformers.__version__, "dtype": "float32",
              "load_average_before": round(os.getloadavg()[0], 2)}
    try:
        with tempfile.TemporaryDirectory(prefix="epserve-bench-") as tmp:
            result["throughput"] = _throughput(config, tmp)
            gc.collect()
            result["roofline"] = _roofline(config, tmp)
    finally:
        torch.set_num_threads(previous)
    result["load_average_after"] = round(os.getloadavg()[0], 2)
    return result


def main(quick: bool = False) -> None:
    """Run FULL (or QUICK) and print the JSON line; everything else goes to stderr.

    OpenMP threads that spin while waiting stall every parallel op when another process holds a core (on a shared
    2-core machine batch-1 decode ran 10x slower, measured), so the run uses OMP_WAIT_POLICY=PASSIVE unless the
    caller chose a policy. OpenMP reads it when torch loads, hence the child process.
    """
    if "OMP_WAIT_POLICY" not in os.environ:
        argv = [sys.executable, "-m", "bench.engine_bench"] + (["--quick"] if quick else [])
        code = subprocess.run(argv, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}).returncode
        if code:
            raise SystemExit(code)
        return
    with contextlib.redirect_stdout(sys.stderr):
        result = run(QUICK if quick else FULL)
    result.update(quick=quick, omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"))
    print(json.dumps(result))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    main(quick="--quick" in sys.argv[1:])
