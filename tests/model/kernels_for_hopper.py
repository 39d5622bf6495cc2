"""`python tests/model/kernels_for_hopper.py`: compiles every Triton kernel of model/ for an H100/H200 (sm_90) on a
machine without a GPU, in the configurations CUDA inputs select (bf16 tensor-core dots, split-K, the MXFP4 block
configs of decode and prefill), and prints one line per kernel variant. The interpreter the other tests use runs the
kernels' semantics but not Triton's compiler; this catches what only the compiler rejects.

Kernel launches are recorded by calling each wrapper with CPU tensors (their launches replaced by a recorder), then
each recorded launch is compiled ahead of time with triton.compile for GPUTarget("cuda", 90, 32), with the
arguments and the specialisation (16-byte aligned pointers, integers divisible by 16) a CUDA launch would have:
with them the loads are software-pipelined (cp.async) as they will be on the GPU. Must run without TRITON_INTERPRET (which makes kernels interpreted functions).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("run without TRITON_INTERPRET=1: the interpreter replaces the kernels the compiler needs")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch                                                    # noqa: E402
import triton                                                   # noqa: E402
import triton.language as tl                                    # noqa: E402
from triton.backends.compiler import GPUTarget                 # noqa: E402
from triton.compiler import ASTSource                          # noqa: E402

from model import decode_attention, mxfp4_kernel, prefill_attention   # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.uint8: "u8",
          torch.int32: "i32", torch.int64: "i64"}


class Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **meta)` records the call instead of launching."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **meta: self.calls.append((args, meta))


def record(module, names: tuple[str, ...], run) -> dict[str, list]:
    """Run `run()` with the module's kernels `names` replaced by recorders; name -> recorded (args, meta)."""
    real = {name: getattr(module, name) for name in names}
    recorders = {name: Recorder() for name in names}
    for name in names:
        setattr(module, name, recorders[name])
    try:
        run()
    finally:
        for name in names:
            setattr(module, name, real[name])
    return {name: r.calls for name, r in recorders.items()}


def compile_for_hopper(fn, args, meta, overrides: dict) -> int:
    """Compile one recorded launch with `overrides` (argument name -> value a CUDA launch would pass); returns the
    cubin's size."""
    values = {**dict(zip(fn.arg_names, args)), **meta, **overrides}
    options = {k: values.pop(k) for k in ("num_warps", "num_stages") if k in values}
    signature, constants, attrs = {}, {}, {}
    for i, (param, name) in enumerate(zip(fn.params, fn.arg_names)):
        v = values[name]
        # What a CUDA launch specialises on: 16-byte aligned pointers, integers divisible by 16.
        if not param.is_constexpr and (isinstance(v, torch.Tensor) or (type(v) is int and v % 16 == 0)):
            attrs[(i,)] = [["tt.divisibility", 16]]
        if param.is_constexpr:
            signature[name], constants[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[name] = "*" + _TYPES[v.dtype]
        elif isinstance(v, bool):
            signature[name] = "i1"
        elif isinstance(v, int):
            signature[name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
        elif isinstance(v, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name}={v!r} has no Triton type here")
    kernel = triton.compile(ASTSource(fn, signature, constants, attrs), target=HOPPER, options=options)
    return len(kernel.asm["cubin"])


def decode_launches():
    bf16 = torch.bfloat16
    N, n, kv, D, B = 3, 64, 8, 64, 16                                  # gpt-oss heads
    q, k = torch.randn(N, n, D, dtype=bf16), torch.randn(kv, 40 * B, D, dtype=bf16)
    tables, start = torch.zeros(N, 8, dtype=torch.long), torch.zeros(N, dtype=torch.long)
    lens, sinks = torch.tensor([5, 100, 0]), torch.zeros(n, dtype=bf16)

    def run():
        for window, splits in ((128, 1), (None, 4)):
            decode_attention.decode_attention_triton(q, k, k, tables, start, lens, sinks, window, 0.125, B,
                                                     num_splits=splits)
    calls = record(decode_attention, ("_decode_kernel", "_combine_kernel"), run)
    first = calls["_decode_kernel"][0]
    return ([(decode_attention._decode_kernel, a, m, {"DOT_FP32": False}) for a, m in calls["_decode_kernel"]]
            + [(decode_attention._decode_kernel, *first, {})]                   # fp32 models: exact fp32 dots
            + [(decode_attention._combine_kernel, a, m, {}) for a, m in calls["_combine_kernel"]])


def prefill_launches():
    bf16 = torch.bfloat16
    n, kv, D, B = 64, 8, 64, 16
    q, k = torch.randn(40, n, D, dtype=bf16), torch.randn(kv, 40 * B, D, dtype=bf16)
    tables = torch.zeros(2, 8, dtype=torch.int32)
    q_start, q_len, ctx = (torch.tensor(x, dtype=torch.int32) for x in ([0, 39], [39, 1], [0, 60]))
    sinks = torch.zeros(n, dtype=bf16)

    def run():
        prefill_attention.prefill_attention_triton(q, k, k, tables, q_start, q_len, ctx, sinks, 128, 0.125, B)
    (args, meta), = record(prefill_attention, ("_prefill_kernel",), run)["_prefill_kernel"]
    return [(prefill_attention._prefill_kernel, args, meta, {"DOT_FP32": False}),
            (prefill_attention._prefill_kernel, args, meta, {})]


def mxfp4_launches():
    bf16, E, N, K = torch.bfloat16, 32, 64, 128

    def run():
        blocks = torch.zeros(E, N, K // 32, 16, dtype=torch.uint8)
        scales = torch.zeros(E, N, K // 32, dtype=torch.uint8)
        for R in (4, 1024, 8192):                                      # decode, medium and prefill block configs
            mxfp4_kernel.mxfp4_grouped_linear(torch.zeros(R, K, dtype=bf16), torch.full((E,), R, dtype=torch.int32),
                                              blocks, scales, torch.zeros(E, N, dtype=bf16))
    def run_scaled():
        blocks = torch.zeros(E, N, K // 32, 16, dtype=torch.uint8)
        scales = torch.zeros(E, N, K // 32, dtype=torch.uint8)
        for R in (4, 256, 8192):                                       # decode (two tiles), prefill
            mxfp4_kernel.mxfp4_grouped_linear(torch.zeros(R, K, dtype=bf16), torch.full((E,), R, dtype=torch.int32),
                                              blocks, scales, torch.zeros(E, N, dtype=bf16), variant="dot_scaled")
    launches, y = [], torch.empty(0, dtype=bf16)                       # CUDA launches write bf16 output
    for args, meta in record(mxfp4_kernel, ("_grouped_kernel",), run)["_grouped_kernel"]:
        launches.append((mxfp4_kernel._grouped_kernel, args, meta,
                         {"y_ptr": y, "DOT_DTYPE": tl.bfloat16, "DOT_PRECISION": None}))
    for args, meta in record(mxfp4_kernel, ("_scaled_kernel",), run_scaled)["_scaled_kernel"]:
        launches.append((mxfp4_kernel._scaled_kernel, args, meta, {"y_ptr": y}))
    return launches


def main() -> None:
    launches = decode_launches() + prefill_launches() + mxfp4_launches()
    for fn, args, meta, overrides in launches:
        size = compile_for_hopper(fn, args, meta, overrides)
        shown = {k: v for k, v in {**meta, **overrides}.items() if k.isupper() or k.startswith("num_")}
        print(f"{fn.__name__} sm_90 cubin {size} B {shown}", flush=True)
    print(f"compiled {len(launches)} kernel variants for sm_90")


if __name__ == "__main__":
    main()
