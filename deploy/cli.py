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


def _dtype(name: str):
    import torch
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def cmd_make_tiny(args) -> None:
    from model.tiny import TinySpec, write_tiny
    spec = TinySpec(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TinySpec)})
    print(write_tiny(args.out, spec))


def cmd_logits(args) -> None:
    import numpy as np
    import torch
    from model.loader import load_model
    try:
        ids = [int(x) for x in args.ids.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--ids must be comma-separated integers, got {args.ids!r}") from None
    if not ids:
        raise UserError("--ids is empty")
    model = load_model(args.model_dir, dtype=_dtype(args.dtype), device=args.device)
    vocab = model.config.vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise UserError(f"token id {bad[0]} is out of range: the model's vocab_size is {vocab}")
    logits = model.prefix_logits(torch.tensor(ids, device=args.device))
    np.save(args.out, logits.cpu().numpy())
    print(f"{args.out}: float32 logits {list(logits.shape)}")


def _read_prompts(path: str, tokenizer) -> list[list[int]]:
    """Each JSONL line has "prompt_ids" (ints) or "prompt" (text, needs the model's tokenizer.json)."""
    import json
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


def _stop_ids(model_dir, tokenizer) -> set[int]:
    """End-of-sequence ids: generation_config.json's eos list plus harmony's <|return|>/<|call|> by name."""
    import json
    from pathlib import Path
    ids: set[int] = set()
    gen = Path(model_dir) / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer is not None:
        ids.update(tokenizer.harmony_stop_ids())
    return ids


def cmd_generate(args) -> None:
    import json
    import time
    from deploy.tokenizer import Tokenizer
    from engine.engine import EngineConfig, LLMEngine
    from engine.sampling_params import SamplingParams
    from model.loader import load_model
    tokenizer = Tokenizer.from_model_dir(args.model_dir)
    prompts = _read_prompts(args.prompts, tokenizer)
    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                max_tokens=args.max_tokens)
    except ValueError as e:
        raise UserError(str(e)) from None
    model = load_model(args.model_dir, dtype=_dtype(args.dtype), device=args.device)
    vocab = model.config.vocab_size
    for n, p in enumerate(prompts, 1):
        if not all(0 <= t < vocab for t in p):
            raise UserError(f"{args.prompts}: prompt {n} has a token id outside [0, {vocab})")
    engine = LLMEngine(model, EngineConfig(max_num_seqs=args.max_num_seqs),
                       eos_token_ids=_stop_ids(args.model_dir, tokenizer))
    ids = [f"p{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        try:
            engine.add_request(rid, p, params)
        except ValueError as e:
            raise UserError(str(e)) from None
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


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="epserve", description="Expert-parallel serving of gpt-oss")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("make-tiny", help="write a tiny random gpt-oss checkpoint in the exact HF + original layout")
    t.add_argument("out")
    from model.tiny import EXPERTS_FORMATS, TinySpec
    for field in dataclasses.fields(TinySpec):               # flags map one to one onto TinySpec
        flag = "--" + field.name.replace("_", "-")
        if field.name == "experts_format":
            t.add_argument(flag, choices=EXPERTS_FORMATS, default=field.default)
        else:
            t.add_argument(flag, type=int, default=field.default)
    t.set_defaults(func=cmd_make_tiny)

    g = sub.add_parser("logits", help="full-prefix forward; writes float32 logits [T, vocab] as .npy")
    g.add_argument("model_dir")
    g.add_argument("--ids", required=True, help="comma-separated token ids, e.g. 1,2,3")
    g.add_argument("--out", required=True)
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    g.add_argument("--device", default="cpu")
    g.set_defaults(func=cmd_logits)

    r = sub.add_parser("generate", help="run JSONL prompts concurrently through the engine")
    r.add_argument("model_dir")
    r.add_argument("--prompts", required=True, help='JSONL: {"prompt_ids": [...]} or {"prompt": "text"} per line')
    r.add_argument("--max-tokens", type=int, default=16)
    r.add_argument("--temperature", type=float, default=1.0)
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    r.add_argument("--device", default="cpu")
    r.add_argument("--max-num-seqs", type=int, default=64)
    r.add_argument("--out", default=None, help="output JSONL (default: stdout), lines in input order")
    r.set_defaults(func=cmd_generate)
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
