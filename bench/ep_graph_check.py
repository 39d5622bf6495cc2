"""`python bench/ep_graph_check.py [--device cuda|cpu] [--experts auto|packed|dense] [--out FILE]`: the EP decode path
captured as CUDA graphs on one device.

One process, a torch.distributed group of one rank (NCCL on CUDA, gloo on CPU; no Ray, no DeepSpeed): a tiny
checkpoint whose MoE layers are EPExperts (the fixed-capacity dispatch: ep 1 through the EP code path, two
all-to-alls a layer), each engine's runner attached to the step agreement as a serving rank's is. Two engines on
the same weights: decode captured as CUDA graphs, and eager. Checks that the graphs were captured and replayed, that
greedy tokens are equal and every decode step's logits close, then times decode steps at batch 1, 8, 32 for both.
Prints one JSON line (also written to --out); exits 1 when a check fails. On CPU the graph engine runs the same
static padded path eagerly (DecodeGraphs capture=False): everything but the capture.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))           # run as a script from anywhere

from cluster.ep_experts import EPExperts, EPStats                      # noqa: E402
from cluster.expert_placement import ExpertPlacement                    # noqa: E402
from cluster.process_group import free_port                             # noqa: E402
from engine.decode_graphs import DecodeGraphs                           # noqa: E402
from engine.engine import EngineConfig, LLMEngine                       # noqa: E402
from engine.sampling_params import SamplingParams                       # noqa: E402
from model.config import ModelConfig                                    # noqa: E402
from model.loader import load_model                                     # noqa: E402
from model.tiny import TinySpec, write_tiny                             # noqa: E402

SPECS = {"cuda": TinySpec(seed=0, layers=4, hidden=512, heads=8, kv_heads=2, head_dim=64, intermediate=512,
                          experts=16, top_k=4, vocab=4096, sliding_window=128, shards=1),
         "cpu": TinySpec(seed=0, layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=64, experts=8,
                         top_k=4, vocab=1024, sliding_window=16, shards=1)}
ENGINE = EngineConfig(max_num_seqs=32, max_num_batched_tokens=512, max_model_len=256, block_size=16,
                      kv_cache_bytes=64 << 20)
BATCHES = (1, 8, 32)
TIMED_STEPS = 20


def ep_engine(model_dir: str, device: torch.device, dtype: torch.dtype, packed: bool, graphs: bool):
    """An engine whose MoE layers are EPExperts of rank 0 of the group of one; graphs: captured on CUDA, the static
    path run eagerly on CPU."""
    cfg = ModelConfig.from_dir(model_dir)
    stats = EPStats(cfg.num_hidden_layers, cfg.num_local_experts, device)
    placement = ExpertPlacement.initial(cfg.num_hidden_layers, cfg.num_local_experts, 1, 0).to(device)
    model = load_model(model_dir, dtype, device, experts=lambda i: EPExperts(cfg, i, 0, 1, placement, stats, dtype,
                                                                           packed=packed))
    engine = LLMEngine(model, dataclasses.replace(ENGINE, cuda_graphs=graphs))
    runner = engine.runner
    if graphs and device.type == "cpu":
        runner.graphs = DecodeGraphs(model, runner.kv_cache, ENGINE.max_num_seqs, ENGINE.max_model_len, device,
                                     capture=False)
        runner.graph_sizes = runner.graphs.sizes
    stats.step.attach(runner)
    return engine, stats


def logged_steps(engine) -> list:
    """Wrap the runner: keep (graphed, real rows, logits) of every decode-only forward."""
    log, run = [], engine.runner.run

    def wrapped(batch):
        logits = run(batch)
        if all(s.num_tokens == 1 for s in batch.seqs):
            log.append((engine.runner.last_rows[2], batch.num_seqs, logits.float().cpu()))
        return logits
    engine.runner.run = wrapped
    return log


def decode_ms(engine, batch: int, vocab: int, device: torch.device) -> float:
    """Median wall time of a decode step (its sampled tokens read back: the step is done) at `batch` sequences."""
    params = SamplingParams(temperature=0.0, max_tokens=TIMED_STEPS + 8, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"t{batch}-{i}", [(13 * i + j) % (vocab - 1) + 1 for j in range(32)], params)
    for _ in range(4):                                    # prefill (one step), then the first decodes
        engine.step()
    times = []
    for _ in range(TIMED_STEPS):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    while engine.has_unfinished():
        engine.step()
    return statistics.median(times) * 1e3


def run(device: torch.device, experts: str) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    packed = experts == "packed" or (experts == "auto" and device.type == "cuda")
    spec = SPECS[device.type]
    captured_warnings = _WarningLog("engine.model_runner")
    with tempfile.TemporaryDirectory() as tmp:
        path = str(write_tiny(f"{tmp}/model", spec))
        graph_engine, _ = ep_engine(path, device, dtype, packed, graphs=True)
        eager_engine, eager_stats = ep_engine(path, device, dtype, packed, graphs=False)
    captured = graph_engine.runner.graphs is not None and graph_engine.runner.graphs.capture
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, spec.vocab, (n,), generator=g).tolist() for n in (3, 17, 40, 5, 64, 9, 120, 33)]
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    logs = [logged_steps(graph_engine), logged_steps(eager_engine)]
    calls, forwards = eager_stats.collectives, eager_engine.runner.forwards
    tokens = [[o[0].output_token_ids for o in e.generate(prompts, greedy)] for e in (graph_engine, eager_engine)]
    per_layer = (eager_stats.collectives - calls) / spec.layers / (eager_engine.runner.forwards - forwards)
    diffs = [float((a[2] - b[2]).abs().max()) for a, b in zip(*logs)]
    result = {
        "check": "ep_graph", "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda"
        else None, "torch": torch.__version__, "backend": dist.get_backend(), "dtype": str(dtype).split(".")[1],
        "experts": "packed" if packed else "dense", "dispatch": graph_engine.model.model.layers[0].mlp.experts.dispatch,
        "captured": bool(captured), "capture_warnings": captured_warnings.messages,
        "graph_sizes": graph_engine.runner.graph_sizes,
        "replayed_decode_steps": sum(1 for graphed, _, _ in logs[0] if graphed), "decode_steps": len(logs[0]),
        "tokens_equal": tokens[0] == tokens[1], "max_abs_logit_diff": max(diffs, default=None),
        "collectives_per_moe_layer": per_layer,              # counted on the eager engine's forwards
    }
    engine_ms = {}
    for b in BATCHES:
        engine_ms[str(b)] = {name: round(decode_ms(e, b, spec.vocab, device), 3)
                             for name, e in (("graphs", graph_engine), ("eager", eager_engine))}
        engine_ms[str(b)]["eager_over_graphs"] = round(engine_ms[str(b)]["eager"] / engine_ms[str(b)]["graphs"], 2)
    result["decode_ms"] = engine_ms
    return result


class _WarningLog(logging.Handler):
    """Warnings of one logger (the runner's 'capture failed' line), kept for the summary."""

    def __init__(self, name: str):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        logging.getLogger(name).addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--experts", choices=("auto", "packed", "dense"), default="auto",
                        help="auto: packed MXFP4 (the fused kernel) on CUDA, dense on CPU")
    parser.add_argument("--out", default="ep_graph_check.json")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    start = time.perf_counter()
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1,
                            init_method=f"tcp://127.0.0.1:{free_port('127.0.0.1')}",
                            timeout=datetime.timedelta(seconds=60))
    try:
        result = run(device, args.experts)
    finally:
        dist.destroy_process_group()
    result["wall_s"] = round(time.perf_counter() - start, 1)
    ok = result["tokens_equal"] and result["replayed_decode_steps"] > 0 and (device.type == "cpu"
                                                                             or result["captured"])
    result["ok"] = bool(ok)
    Path(args.out).write_text(json.dumps(result))
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    sys.exit(main())
