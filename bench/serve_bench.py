"""`epserve bench serve`: the same greedy workload in process (LLMEngine) and through `epserve serve` over HTTP
(streaming /v1/completions and /v1/chat/completions), side by side in one run; CPU per token of each server process.

Method: the in-process engine loads first; then `epserve serve` starts in its own session (bench/serve_process.py)
and --repeats rounds run, each: generate() in process (timed alone; the server idles), then each HTTP path with
every request sent at once. The fastest run of each path is reported (noise from other processes only slows a run
down), with its CPU: /proc snapshots of the server's session around the path, by role (bench/process_cpu.py).
Completions send the in-process prompt ids and their streamed text must equal the decoded in-process tokens in
every round (`outputs_match`); chat sends the same questions as user messages. One JSON line on stdout, progress
on stderr, summary.json, serve_bench.png and serve.log under --out.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time
from pathlib import Path

logger = logging.getLogger(__name__)
QUICK_REQUESTS, QUICK_MAX_TOKENS = 16, 64


@dataclasses.dataclass(frozen=True)
class ServeBenchConfig:
    requests: int = 64                      # concurrent greedy requests per path, all sent at once (the run)
    max_tokens: int = 256                   # generated per request, end-of-sequence ignored
    ep_size: int = 1
    replicas: int = 1
    gateway_replicas: int | None = None     # passed to `epserve serve` only when given
    max_num_seqs: int | None = None         # None: the server's default; the in-process engine uses the same
    model: str = "demo"
    extra_serve_args: tuple[str, ...] = ()  # any other `epserve serve` flags, verbatim
    repeats: int = 3                        # rounds of (in process, completions, chat); the fastest of each is kept
    seed: int = 0                           # picks the questions
    out: str = "bench-serve"

    def __post_init__(self):
        for name in ("requests", "max_tokens", "ep_size", "replicas", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("gateway_replicas", "max_num_seqs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")

    def serve_args(self) -> list[str]:
        args = [] if self.model == "demo" else [self.model]
        args += ["--ep-size", str(self.ep_size), "--replicas", str(self.replicas)]
        if self.gateway_replicas is not None:
            args += ["--gateway-replicas", str(self.gateway_replicas)]
        if self.max_num_seqs is not None:
            args += ["--max-num-seqs", str(self.max_num_seqs)]
        return args + list(self.extra_serve_args)


def make_questions(n: int, seed: int) -> list[str]:
    """n demo-task questions (the kind the demo model was trained on), reproducible from the seed."""
    from deploy.demo_tasks import sample
    rng = random.Random(seed)
    return [sample(rng).question for _ in range(n)]


def completion_prompt(question: str) -> str:
    """The harmony-rendered user turn, ending where the assistant writes: what /v1/completions and the in-process
    engine both receive (as token ids)."""
    from deploy.demo_tasks import Example, prompt_text
    return prompt_text(Example(task="", question=question, analysis="", answer=""))


def engine_config(config: ServeBenchConfig):
    """The ModelServer's engine settings: every AppArgs default (and --max-num-seqs) that EngineConfig also has."""
    from deploy.app_config import AppArgs
    from engine.engine import EngineConfig
    app = (AppArgs() if config.max_num_seqs is None else AppArgs(max_num_seqs=config.max_num_seqs)).model_dump()
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    return EngineConfig(**{k: v for k, v in app.items() if k in names and v is not None})


def build_engine(model_dir: Path, config):
    """LLMEngine in this process on the same checkpoint, loaded as the server's ranks load it on CPU (fp32)."""
    import torch

    from deploy.tokenizer import Tokenizer, model_stop_ids
    from engine.engine import LLMEngine
    from model.loader import expert_factory, load_model
    experts = expert_factory(str(model_dir), torch.float32, "cpu", "auto")
    model = load_model(str(model_dir), dtype=torch.float32, device="cpu", experts=experts)
    return LLMEngine(model, config, eos_token_ids=model_stop_ids(model_dir, Tokenizer.from_model_dir(model_dir)))


def greedy_params(max_tokens: int):
    from engine.sampling_params import SamplingParams
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def run_in_process(engine, prompts: list[list[int]], max_tokens: int) -> dict:
    """generate() alone, timed: tokens, wall_s, cpu_s (this process, all threads) and the output ids."""
    cpu0, t0 = time.process_time(), time.monotonic()
    outputs = [seqs[0].output_token_ids for seqs in engine.generate(prompts, greedy_params(max_tokens))]
    wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
    return {"tokens": sum(len(o) for o in outputs), "wall_s": wall, "cpu_s": cpu, "outputs": outputs}


def request_bodies(model: str, questions: list[str], prompts: list[list[int]], max_tokens: int
                   ) -> dict[str, tuple[str, list[dict]]]:
    """Path name -> (URL path, bodies): greedy, ignore_eos, streamed with usage."""
    common = {"model": model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
              "stream_options": {"include_usage": True}}
    return {"completions": ("/v1/completions", [dict(common, prompt=p) for p in prompts]),
            "chat": ("/v1/chat/completions",
                     [dict(common, messages=[{"role": "user", "content": q}]) for q in questions])}


def run_http_phase(server, path: str, bodies: list[dict]) -> dict:
    """Every body at once; the server's session CPU and this process's (the client's) around it."""
    from bench.process_cpu import cpu_delta, snapshot
    from bench.stream_client import run_streams_sync
    before, client0 = snapshot(server.session_id), time.process_time()
    results, wall = run_streams_sync(server.url + path, bodies)
    client_cpu = time.process_time() - client0
    return {"results": results, "wall_s": wall, "cpu": cpu_delta(before, snapshot(server.session_id)),
            "client_cpu_s": client_cpu}


def tok_s(run: dict) -> float:
    """Tokens/s of one in-process or HTTP run (HTTP: tokens of completed streams over the wall time of all)."""
    tokens = run["tokens"] if "tokens" in run else sum(r.num_tokens for r in run["results"] if r.ok)
    return tokens / run["wall_s"] if run["wall_s"] > 0 else 0.0


def run_bench(config: ServeBenchConfig) -> dict:
    """The whole run; returns the summary (bench/serve_report.py's summarize) of the fastest repeat of each path."""
    import torch

    from bench.serve_process import ServeProcess
    from bench.serve_report import outputs_match, rounded, summarize, write_plot
    from deploy.model_paths import resolve_model_dir
    from deploy.tokenizer import Tokenizer
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model_dir(config.model)
    tokenizer = Tokenizer.from_model_dir(model_dir)
    if tokenizer is None:
        raise ValueError(f"{model_dir}: needs tokenizer.json (the HTTP text is compared with decoded tokens)")
    questions = make_questions(config.requests, config.seed)
    prompts = [tokenizer.encode(completion_prompt(q)) for q in questions]
    engine = build_engine(model_dir, engine_config(config))        # loaded before the server takes the CPUs
    engine.generate(prompts[:2], greedy_params(4))                  # warm-up
    runs = {"in_process": [], "completions": [], "chat": []}
    with ServeProcess(config.serve_args(), out / "serve.log") as server:
        bodies = request_bodies(server.model, questions, prompts, config.max_tokens)
        for repeat in range(config.repeats):
            runs["in_process"].append(run_in_process(engine, prompts, config.max_tokens))
            for name, (path, b) in bodies.items():
                runs[name].append(run_http_phase(server, path, b))
            logger.info("repeat %d/%d: %s tokens/s", repeat + 1, config.repeats,
                        ", ".join(f"{n} {tok_s(r[-1]):.0f}" for n, r in runs.items()))
    expected = [tokenizer.decode(ids) for ids in runs["in_process"][0]["outputs"]]
    match = all(r["outputs"] == runs["in_process"][0]["outputs"] for r in runs["in_process"]) and all(
        outputs_match(expected, r["results"]) for r in runs["completions"])
    best = {name: max(rs, key=tok_s) for name, rs in runs.items()}
    summary = summarize(config, best["in_process"], {n: best[n] for n in ("completions", "chat")}, match)
    summary["runs_tok_s"] = rounded({name: [tok_s(r) for r in rs] for name, rs in runs.items()})
    summary["server"] = {"pid": server.session_id, "stop_s": server.stop_s, "num_killed": server.num_killed}
    summary["host"] = {"cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_plot(summary, out / "serve_bench.png")
    return summary


def run(args) -> dict:
    """The CLI verb: --quick shrinks the run unless --requests/--max-tokens/--repeats say otherwise."""
    defaults = ServeBenchConfig()
    config = ServeBenchConfig(
        requests=_pick(args.requests, QUICK_REQUESTS if args.quick else defaults.requests),
        max_tokens=_pick(args.max_tokens, QUICK_MAX_TOKENS if args.quick else defaults.max_tokens),
        ep_size=args.ep_size, replicas=args.replicas, gateway_replicas=args.gateway_replicas,
        repeats=_pick(args.repeats, 1 if args.quick else defaults.repeats),
        max_num_seqs=args.max_num_seqs, model=args.model_dir, extra_serve_args=tuple(args.serve_arg or ()),
        out=args.out)
    logging.getLogger("httpx").setLevel(logging.WARNING)        # one INFO line per request otherwise
    summary = run_bench(config)
    print(json.dumps(summary))
    return summary


def _pick(given: int | None, default: int) -> int:
    return default if given is None else given
