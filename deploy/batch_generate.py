"""`epserve generate`: JSONL prompts through the engine concurrently (or through an EP group on a local Ray
cluster with --ep-size), outputs in input order. User errors raise UserError (the CLI prints one line, exit 2).
"""
from __future__ import annotations

import json
import logging
import sys
import time

import torch

from model.errors import UserError

def _read_prompts(path: str, tokenizer) -> list[list[int]]:
    """Each JSONL line has "prompt_ids" (ints) or "prompt" (text, needs the model's tokenizer.json)."""
    prompts = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if isinstance(item, dict) and isinstance(item.get("prompt_ids"), list) and item["prompt_ids"] \
                    and all(isinstance(t, int) for t in item["prompt_ids"]):
                prompts.append(item["prompt_ids"])
            elif isinstance(item, dict) and isinstance(item.get("prompt"), str) and item["prompt"]:
                if tokenizer is None:
                    raise UserError(f"{path}:{n}: a text \"prompt\" needs tokenizer.json in the model directory; "
                                    "give \"prompt_ids\" instead")
                prompts.append(tokenizer.encode(item["prompt"]))
            else:
                raise UserError(f"{path}:{n}: expected an object with \"prompt_ids\" (non-empty list of ints) "
                                "or \"prompt\" (non-empty text)")
    if not prompts:
        raise UserError(f"{path}: no prompts")
    return prompts


def run(args) -> None:
    from deploy.tokenizer import Tokenizer, model_stop_ids
    from engine.engine import EngineConfig, LLMEngine
    from engine.sampling_params import SamplingParams
    from model.config import ModelConfig
    from model.loader import dtype_name, load_model
    tokenizer = Tokenizer.from_model_dir(args.model_dir)
    prompts = _read_prompts(args.prompts, tokenizer)
    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                max_tokens=args.max_tokens)
    except ValueError as e:
        raise UserError(str(e)) from None
    vocab = ModelConfig.from_dir(args.model_dir).vocab_size
    for n, p in enumerate(prompts, 1):
        if not all(0 <= t < vocab for t in p):
            raise UserError(f"{args.prompts}: prompt {n} has a token id outside [0, {vocab})")
    engine_config = _engine_config(args, EngineConfig)
    stop_ids = model_stop_ids(args.model_dir, tokenizer)
    args.dtype = dtype_name(args.dtype, args.device)              # "auto" resolved once, for both paths
    if args.ep_size:
        engine = _start_ep_group(args, engine_config, stop_ids)
    else:
        dtype = getattr(torch, args.dtype)
        model = load_model(args.model_dir, dtype=dtype, device=args.device, experts=args.experts)
        try:
            engine = LLMEngine(model, engine_config, eos_token_ids=stop_ids)
        except ValueError as e:                 # the KV cache or max_model_len does not fit: the message says what does
            raise UserError(str(e)) from None
    ids = [f"p{i}" for i in range(len(prompts))]
    try:
        final = (dict(zip(ids, (outs[0] for outs in engine.generate(prompts, params)))) if args.ep_size
                 else _run_local(engine, ids, prompts, params))
    except ValueError as e:
        raise UserError(str(e)) from None
    lines = []
    for i, rid in enumerate(ids):
        out = final[rid]
        line = {"index": i, "output_ids": out.output_token_ids, "finish_reason": out.finish_reason}
        if tokenizer is not None:
            line["text"] = tokenizer.decode(out.output_token_ids)
        lines.append(json.dumps(line) + "\n")
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(lines)
    else:
        sys.stdout.writelines(lines)


def _run_local(engine, ids: list[str], prompts: list[list[int]], params) -> dict:
    """Every prompt through the in-process engine, progress on the log every 5 s; final output per id."""
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, p, params)
    final, tokens = {}, 0
    start = last_report = time.monotonic()
    while engine.has_unfinished():
        for out in engine.step():
            tokens += len(out.new_token_ids)
            if out.finished:
                final[out.request_id] = out
        if time.monotonic() - last_report > 5:
            last_report = time.monotonic()
            logging.getLogger("epserve.generate").info("%d/%d prompts done, %.1f tokens/s", len(final),
                                                       len(prompts), tokens / (last_report - start))
    return final


def _engine_config(args, engine_config_cls):
    """EngineConfig from the flags; a bad value is a UserError."""
    try:
        return engine_config_cls(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                 max_model_len=args.max_model_len, kv_cache_bytes=args.kv_cache_bytes,
                                 kv_cache_memory=args.kv_cache_memory,
                                 gpu_memory_utilization=args.gpu_memory_utilization)
    except ValueError as e:
        raise UserError(str(e)) from None


def _start_ep_group(args, engine_config, stop_ids):
    """One EP group of --ep-size ranks on a local Ray cluster (loopback, no auth), or on the cluster at --ray-address
    / $RAY_ADDRESS, placed PACK or SPREAD; stopped at exit. A rank that cannot start is a one-line error."""
    import atexit
    import os
    import ray
    from cluster.ep_group import EPConfig, EPGroup, EPStepError
    if args.redundant_experts < 0:
        raise UserError(f"--redundant-experts must be >= 0, got {args.redundant_experts}")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = getattr(args, "ray_address", None) or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    else:
        ray.init(num_cpus=max(args.ep_size + 1, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1", configure_logging=False)
    try:
        config = EPConfig(ep_size=args.ep_size, redundant_experts=args.redundant_experts, device=args.device,
                          dtype=args.dtype, experts=args.experts,
                          placement_strategy=getattr(args, "placement_strategy", "PACK"))
        group = EPGroup(args.model_dir, config, engine_config, stop_ids)
    except (ValueError, EPStepError, RuntimeError) as e:
        ray.shutdown()
        raise UserError(str(e)) from None
    atexit.register(lambda: (group.shutdown(), ray.shutdown()))
    return group
