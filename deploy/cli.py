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
