"""The `epserve` command line: one sub-command per verb; heavy imports happen inside each command.

User errors (a bad file, flag or value) print one line on stderr and exit with code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from model.errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line (and exits 2, as argparse does)."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def num_bytes(text: str) -> int:
    """A byte count with an optional unit, as AppArgs parses it (pydantic's ByteSize): 2GiB, 512MiB, 2GB, 1073741824."""
    from pydantic import TypeAdapter, ByteSize, ValidationError
    try:
        value = int(TypeAdapter(ByteSize).validate_python(text))
    except ValidationError:
        raise argparse.ArgumentTypeError(
            f"expected a byte count such as 2GiB, 512MiB or 1073741824, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive byte count, got {text!r}")
    return value


def add_kv_arguments(p: argparse.ArgumentParser) -> None:
    """The KV-cache and length flags of `epserve generate` (`epserve serve` derives the same ones from AppArgs)."""
    from engine.config import DEFAULT_GPU_MEMORY_UTILIZATION, DEFAULT_KV_CACHE_MEMORY
    p.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + output tokens (default: what the KV cache holds, capped by the model)")
    p.add_argument("--kv-cache-memory", type=num_bytes, default=DEFAULT_KV_CACHE_MEMORY,
                   help="CPU: KV cache bytes per engine, e.g. 2GiB (default: 1GiB)")
    p.add_argument("--gpu-memory-utilization", type=float, default=DEFAULT_GPU_MEMORY_UTILIZATION,
                   help="CUDA: fraction of the GPU's memory for weights, activations and KV cache (default: 0.9)")
    p.add_argument("--kv-cache-bytes", type=num_bytes, default=None,
                   help="exact KV cache bytes for both pools; overrides --kv-cache-memory and profiling")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens per engine step")


def cmd_make_tiny(args) -> None:
    from model.tiny import TinySpec, tiny_spec, write_tiny
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TinySpec) if getattr(args, f.name) is not None}
    print(write_tiny(args.out, tiny_spec(args.preset, **given)))


def cmd_logits(args) -> None:
    import numpy as np
    import torch
    from model.loader import dtype_name, load_model
    from model.packed_experts import PackedMXFP4Experts
    try:
        ids = [int(x) for x in args.ids.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--ids must be comma-separated integers, got {args.ids!r}") from None
    if not ids:
        raise UserError("--ids is empty")
    dtype = getattr(torch, dtype_name(args.dtype, args.device))
    model = load_model(args.model_dir, dtype=dtype, device=args.device, experts=args.experts)
    vocab = model.config.vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise UserError(f"token id {bad[0]} is out of range: the model's vocab_size is {vocab}")
    logits = model.prefix_logits(torch.tensor(ids, device=args.device))
    np.save(args.out, logits.cpu().numpy())
    packed = isinstance(model.model.layers[0].mlp.experts, PackedMXFP4Experts)
    print(f"{args.out}: float32 logits {list(logits.shape)} ({str(dtype).removeprefix('torch.')} weights, "
          f"{'packed' if packed else 'dense'} experts)")


def cmd_generate(args) -> None:
    from deploy import batch_generate
    batch_generate.run(args)


def cmd_serve(args) -> None:
    from deploy import server
    server.run(args)


def cmd_train_demo(args) -> None:
    from deploy.demo_trainer import TrainConfig, train
    report = train(args.out, TrainConfig(seed=args.seed, steps=args.steps))
    log = logging.getLogger("epserve.train_demo")
    for name in ("fp32", "fp32_mxfp4_experts", "checkpoint"):
        log.info("greedy accuracy (%s): %.1f%% %s", name, 100 * report[name][0], report[name][1])
    print(args.out)


def cmd_bench_ep(args) -> None:
    from bench import ep_bench
    ep_bench.main(quick=args.quick)


def cmd_bench_engine(args) -> None:
    from bench import engine_bench
    engine_bench.main(quick=args.quick)


def cmd_bench_load(args) -> None:
    from bench import load
    try:
        load.run(args)
    except ValueError as e:                    # a bad flag value or an unreachable server
        raise UserError(str(e)) from None


def cmd_bench_serve(args) -> None:
    from bench import serve_bench
    try:
        serve_bench.run(args)
    except ValueError as e:                    # a bad flag value
        raise UserError(str(e)) from None


def cmd_bench_chaos(args) -> None:
    from bench import chaos
    try:
        chaos.run(args)
    except ValueError as e:                    # a bad flag value
        raise UserError(str(e)) from None


EXPERTS_HELP = ("auto: MXFP4 experts stay packed (17/32 byte per weight; fused kernel on CUDA, a dequantising loop "
                "on CPU), bf16 checkpoints dense; dense: expanded to the activation dtype; packed: as stored")


def build_parser() -> argparse.ArgumentParser:
    from model.loader import DTYPE_CHOICES, EXPERT_CHOICES
    p = _Parser(prog="epserve", description="Expert-parallel serving of gpt-oss")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("make-tiny", help="write a tiny random gpt-oss checkpoint in the exact HF + original layout")
    t.add_argument("out")
    from model.tiny import EXPERTS_FORMATS, PRESETS, TinySpec
    t.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="start from a preset (120b-attention: gpt-oss-120b's attention geometry and vocab, small "
                        "hidden and experts); the flags below override it")
    for field in dataclasses.fields(TinySpec):               # flags map one to one onto TinySpec
        flag, default = "--" + field.name.replace("_", "-"), f"default: {field.default}"
        if field.name == "experts_format":
            t.add_argument(flag, choices=EXPERTS_FORMATS, default=None, help=default)
        else:
            t.add_argument(flag, type=int, default=None, help=default)
    t.set_defaults(func=cmd_make_tiny)

    g = sub.add_parser("logits", help="full-prefix forward; writes float32 logits [T, vocab] as .npy")
    g.add_argument("model_dir")
    g.add_argument("--ids", required=True, help="comma-separated token ids, e.g. 1,2,3")
    g.add_argument("--out", required=True)
    g.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="auto: bfloat16 on cuda, float32 on cpu")
    g.add_argument("--device", default="cpu")
    g.add_argument("--experts", choices=EXPERT_CHOICES, default="auto", help=EXPERTS_HELP)
    g.set_defaults(func=cmd_logits)

    r = sub.add_parser("generate", help="run JSONL prompts concurrently through the engine")
    r.add_argument("model_dir")
    r.add_argument("--prompts", required=True, help='JSONL: {"prompt_ids": [...]} or {"prompt": "text"} per line')
    r.add_argument("--max-tokens", type=int, default=16)
    r.add_argument("--temperature", type=float, default=1.0)
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="auto: bfloat16 on cuda, float32 on cpu")
    r.add_argument("--device", default="cpu")
    r.add_argument("--max-num-seqs", type=int, default=64)
    add_kv_arguments(r)
    r.add_argument("--experts", choices=EXPERT_CHOICES, default="auto", help=EXPERTS_HELP + " (EP ranks' slots too)")
    r.add_argument("--out", default=None, help="output JSONL (default: stdout), lines in input order")
    r.add_argument("--ep-size", type=int, default=0, help="expert-parallel ranks on a local Ray cluster (0: none)")
    r.add_argument("--redundant-experts", type=int, default=0, help="extra expert slots per layer (with --ep-size)")
    r.add_argument("--placement-strategy", choices=("PACK", "SPREAD"), default="PACK",
                   help="with --ep-size: PACK keeps the ranks on one node when they fit, SPREAD puts them on different "
                        "nodes")
    r.add_argument("--ray-address", default=None, help="with --ep-size: join this Ray cluster (host:port; default: "
                   "$RAY_ADDRESS, else a local one)")
    r.set_defaults(func=cmd_generate)

    d = sub.add_parser("train-demo", help="train the demo checkpoint on CPU (minutes) and write it in the HF layout")
    d.add_argument("--out", default="deploy/demo_model", help="new or empty directory (default: deploy/demo_model)")
    d.add_argument("--steps", type=int, default=1500)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_train_demo)

    from deploy import server
    v = sub.add_parser("serve", help="serve the OpenAI API with expert-parallel replicas on a local Ray cluster")
    server.add_arguments(v)
    v.set_defaults(func=cmd_serve)

    b = sub.add_parser("bench", help="benchmarks")
    bench = b.add_subparsers(dest="bench_command", required=True, parser_class=_Parser)
    ld = bench.add_parser("load", help="OpenAI-API load: Poisson arrivals, client-side TTFT/ITL/e2e percentiles")
    ld.add_argument("--url", default=None, help="server root, e.g. http://127.0.0.1:8000 (poisson workload)")
    ld.add_argument("--workload", choices=("poisson", "multiturn"), default="poisson",
                    help="multiturn: starts `epserve serve` itself, cache-aware vs power-of-two routing side by side")
    ld.add_argument("--serve-args", default=None, help="multiturn: `epserve serve` flags (default: --replicas 2 "
                    "--ep-size 2 --enable-prefix-caching)")
    ld.add_argument("--system-words", type=int, default=300, help="multiturn: words of each system prompt")
    ld.add_argument("--repeats", type=int, default=2, help="multiturn: servers per router, in A B B A order; "
                    "their turns are pooled")
    ld.add_argument("--rate", type=float, default=4.0, help="mean request arrivals per second (Poisson)")
    ld.add_argument("--requests", type=int, default=32)
    ld.add_argument("--concurrency", type=int, default=8, help="requests in flight at most")
    ld.add_argument("--model", default=None, help="model id (default: the first of GET /v1/models)")
    ld.add_argument("--api-key", default=None)
    ld.add_argument("--out", default="bench-load", help="directory for summary.json, load.png, metrics.prom")
    ld.add_argument("--seed", type=int, default=0)
    ld.set_defaults(func=cmd_bench_load)
    ep = bench.add_parser("ep", help="decode step latency at ep 2 against ep 1, and the all-to-all share")
    ep.add_argument("--quick", action="store_true", help="a small model and few steps (about a minute)")
    ep.set_defaults(func=cmd_bench_ep)
    en = bench.add_parser("engine", help="decode tokens/s vs transformers, and batch-1 vs the bandwidth roofline")
    en.add_argument("--quick", action="store_true", help="smaller runs (about a minute)")
    en.set_defaults(func=cmd_bench_engine)
    sv = bench.add_parser("serve", help="`epserve serve` over HTTP vs the engine in process: tokens/s, TTFT/ITL, "
                                        "CPU per 1k tokens per server process")
    sv.add_argument("model_dir", nargs="?", default="demo", help="checkpoint directory (default: the demo model)")
    sv.add_argument("--requests", type=int, default=None, help="concurrent greedy requests per path (default 64)")
    sv.add_argument("--max-tokens", type=int, default=None, help="tokens per request, EOS ignored (default 256)")
    sv.add_argument("--quick", action="store_true", help="16 x 64 tokens, one round, unless flags say otherwise")
    sv.add_argument("--repeats", type=int, default=None, help="rounds of all paths; the fastest is kept (default 3)")
    sv.add_argument("--ep-size", type=int, default=1)
    sv.add_argument("--replicas", type=int, default=1)
    sv.add_argument("--gateway-replicas", type=int, default=None, help="passed to `epserve serve` only when given")
    sv.add_argument("--max-num-seqs", type=int, default=None, help="server and in-process engine (default: serve's)")
    sv.add_argument("--serve-arg", action="append", default=[], help="any other `epserve serve` flag, verbatim "
                    "(repeatable), e.g. --serve-arg=--max-num-batched-tokens=1024")
    sv.add_argument("--out", default="bench-serve", help="directory for summary.json, serve_bench.png, serve.log")
    sv.set_defaults(func=cmd_bench_serve)
    ch = bench.add_parser("chaos", help="steady streaming load on `epserve serve`, then a rank SIGKILL, a rank SIGSTOP "
                                        "and a replica SIGKILL: failed and changed requests, token gaps, recovery")
    ch.add_argument("model_dir", nargs="?", default="demo", help="checkpoint directory (default: the demo model)")
    ch.add_argument("--ep-size", type=int, default=2)
    ch.add_argument("--replicas", type=int, default=2, help="ModelServer replicas (a replica kill needs 2)")
    ch.add_argument("--redundant-experts", type=int, default=0)
    ch.add_argument("--streams", type=int, default=None, help="concurrent client streams (default 16)")
    ch.add_argument("--max-tokens", type=int, default=None, help="tokens per request, EOS ignored (default 160)")
    ch.add_argument("--steady-s", type=float, default=None, help="load before the first event (default 15)")
    ch.add_argument("--settle-s", type=float, default=None, help="load after full size, before the next event "
                    "(default 10)")
    ch.add_argument("--recover-timeout-s", type=float, default=120.0, help="wait for full size per event")
    ch.add_argument("--collective-timeout-s", type=float, default=10.0, help="passed to `epserve serve`")
    ch.add_argument("--events", default="rank_kill,rank_stop,replica_kill", help="comma-separated, in order")
    ch.add_argument("--quick", action="store_true", help="8 streams x 96 tokens, shorter phases")
    ch.add_argument("--serve-arg", action="append", default=[], help="any other `epserve serve` flag, verbatim")
    ch.add_argument("--out", default="bench-chaos", help="directory for summary.json, chaos.png, serve.log")
    ch.set_defaults(func=cmd_bench_chaos)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (UserError, FileNotFoundError, PermissionError, IsADirectoryError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        sys.stderr.write(f"epserve {args.command}: error: {message}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
