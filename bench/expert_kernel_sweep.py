"""Tile sweep of the MXFP4 grouped expert kernel at gpt-oss-20b's shapes: which block_config streams the packed
weights fastest at decode (1 token: 4 rows in 4 experts) and at batch 64 (256 rows over 32 experts).

Each (shape, variant, config) is checked against block_config's output once, then timed with triton's do_bench;
prints one JSON line: per shape and variant the current config's time and GB/s, the best config and its speedup.
  python bench/expert_kernel_sweep.py [--quick]          # CUDA only; --quick: a few configs (tests, CPU-free)
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model.mxfp4_kernel import block_config, mxfp4_grouped_linear                    # noqa: E402

E, H = 32, 2880                                                 # gpt-oss-20b experts and hidden size (spec §1.1)
SHAPES = {"gate_up": (2 * H, H), "down": (H, H)}                # (N, K) of each projection
TOKENS = {"decode_1": 1, "batch_64": 64}
TOP_K = 4


def inputs(tokens: int, n: int, k: int, device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g, device=device)[:TOP_K] for _ in range(tokens)]).flatten()
    counts = torch.bincount(ids, minlength=E)
    ends = torch.cumsum(counts, 0)
    x = torch.randn(ids.numel(), k, generator=g, device=device).to(torch.bfloat16)
    blocks = torch.randint(0, 256, (E, n, k // 32, 16), generator=g, device=device, dtype=torch.uint8)
    scales = torch.randint(124, 128, (E, n, k // 32), generator=g, device=device, dtype=torch.uint8)
    bias = torch.randn(E, n, generator=g, device=device).to(torch.bfloat16)
    hit = int((counts > 0).sum())
    return (x, ends, blocks, scales, bias), hit * n * (k // 2 + k // 32)


def configs(quick: bool):
    if quick:
        return [dict(BLOCK_M=16, BLOCK_N=n, BLOCK_K=128, num_warps=4, num_stages=3) for n in (32, 64)]
    grid = itertools.product((16, 32, 64, 128), (128, 256, 512), (4, 8), (3,))
    return [dict(BLOCK_M=16, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s) for n, k, w, s in grid]


def sweep(quick: bool, device=torch.device("cuda")) -> dict:
    import triton.testing
    out = {}
    for (tname, tokens), (pname, (n, k)) in itertools.product(TOKENS.items(), SHAPES.items()):
        args, nbytes = inputs(tokens, n, k, device)
        R = args[0].shape[0]
        for variant in ("dequant", "dot_scaled"):
            current = block_config(R, E, variant)
            ref = mxfp4_grouped_linear(*args, variant=variant)
            rows = []
            for cfg in [current] + configs(quick):
                try:
                    y = mxfp4_grouped_linear(*args, variant=variant, config=cfg)
                    err = ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-6)).item()
                    if err > 1e-2:
                        rows.append({"config": cfg, "error": f"rel err {err:.3g}"})
                        continue
                    ms = triton.testing.do_bench(lambda: mxfp4_grouped_linear(*args, variant=variant, config=cfg),
                                                 warmup=5, rep=20)
                    rows.append({"config": cfg, "us": round(ms * 1e3, 1), "gb_s": round(nbytes / ms / 1e6, 1)})
                except Exception as e:                                     # a config Triton cannot build
                    rows.append({"config": cfg, "error": f"{type(e).__name__}: {str(e)[:80]}"})
            timed = [r for r in rows if "us" in r]
            best = min(timed, key=lambda r: r["us"]) if timed else None
            base = rows[0]
            out[f"{tname}/{pname}/{variant}"] = {
                "rows": R, "weight_mb": round(nbytes / 1e6, 1), "current": base,
                "best": best, "speedup": round(base["us"] / best["us"], 2) if best and "us" in base else None,
                "failed": sum("error" in r for r in rows)}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("expert_kernel_sweep: needs CUDA")
    start = time.perf_counter()
    result = {"device": torch.cuda.get_device_name(), "sweep": sweep(args.quick),
              "wall_s": round(time.perf_counter() - start, 1)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
