"""The GPU benchmark's correctness checks: each fast path against the path the CPU tests pin down, at the model's
real shapes, on the device being measured (the CPU tests cover the same code on tiny shapes).

- packed MXFP4 experts: the fused kernel (dequantised in registers, grouped over the routed pairs) against the
  per-expert dequantise-then-matmul loop, on one layer with real routing;
- decode attention: the Triton kernel against the torch gather path, sinks and sliding window, ragged lengths;
- CUDA graphs: greedy tokens of graph-replayed decode steps against eager decode steps.
Errors are reported relative to the reference's largest magnitude; nothing here asserts (the JSON shows it).
"""
from __future__ import annotations

import torch

from model.decode_attention import paged_decode_attention
from model.moe import route
from model.prefill_attention import paged_prefill_attention
from model.packed_experts import PackedMXFP4Experts
from model.transformer import GptOssForCausalLM


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


@torch.no_grad()
def check_packed_experts(model: GptOssForCausalLM, tokens: int = 64, seed: int = 0) -> dict:
    """Layer 0's experts on `tokens` random hidden states routed by the layer's own router: kernel vs loop."""
    layer = model.model.layers[0]
    experts: PackedMXFP4Experts = layer.mlp.experts
    device, H = experts.gate_up_proj_blocks.device, model.config.hidden_size
    g = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for T in (1, tokens):
        t = torch.randn(T, H, generator=g, device=device, dtype=model.dtype)
        weights, ids = route(layer.mlp.router(t), layer.mlp.top_k)
        saved = experts.use_kernel
        try:
            experts.use_kernel = True
            fast = experts(t, ids, weights)
            experts.use_kernel = False
            ref = experts(t, ids, weights)
        finally:
            experts.use_kernel = saved
        out[f"tokens_{T}_rel_err"] = _rel_err(fast, ref)
    return out


@torch.no_grad()
def check_decode_attention(model: GptOssForCausalLM, max_len: int, seed: int = 0) -> dict:
    """Random q and a shuffled paged cache at the model's head shapes, ragged lengths up to max_len + 1: Triton
    kernel vs torch gather path."""
    cfg, device, dtype = model.config, next(model.parameters()).device, model.dtype
    n, kv, D, B = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, 16
    g = torch.Generator(device=device).manual_seed(seed)
    lens = torch.tensor(sorted({1, 17, max_len // 3, max_len, max_len + 1}), device=device)
    M = -(-int(lens.max()) // B)
    N = len(lens)
    blocks = N * M
    perm = torch.randperm(blocks, generator=g, device=device).view(N, M)
    k = torch.randn(kv, blocks * B, D, generator=g, device=device, dtype=dtype)
    v = torch.randn(kv, blocks * B, D, generator=g, device=device, dtype=dtype)
    q = torch.randn(N, n, D, generator=g, device=device, dtype=dtype)
    sinks = model.model.layers[0].self_attn.sinks
    out = {}
    for window in (None, cfg.sliding_window):
        start = torch.zeros(N, dtype=torch.long, device=device)
        args = (q, k, v, perm, start, lens, sinks, window, D ** -0.5, B)
        fast = paged_decode_attention(*args, impl="triton")
        ref = paged_decode_attention(*args, impl="torch")
        out[f"window_{window}_rel_err"] = _rel_err(fast, ref)
    return out


@torch.no_grad()
def check_prefill_attention(model: GptOssForCausalLM, max_len: int, seed: int = 0) -> dict:
    """A mixed step at the model's head shapes (a chunk after a cached prefix, a whole prompt, a decode) over a
    shuffled paged cache: the flash-style Triton kernel vs the torch gather path."""
    cfg, device, dtype = model.config, next(model.parameters()).device, model.dtype
    n, kv, D, B = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, 16
    g = torch.Generator(device=device).manual_seed(seed)
    ctx = [max_len // 2, 0, max_len - 1]                           # positions before each sequence's queries
    qlen = [max_len // 2, max_len // 3 + 1, 1]
    M = -(-max(c + q for c, q in zip(ctx, qlen)) // B)
    N = len(ctx)
    tables = torch.randperm(N * M, generator=g, device=device).view(N, M)
    k = torch.randn(kv, N * M * B, D, generator=g, device=device, dtype=dtype)
    v = torch.randn(kv, N * M * B, D, generator=g, device=device, dtype=dtype)
    q = torch.randn(sum(qlen), n, D, generator=g, device=device, dtype=dtype)
    starts = [sum(qlen[:i]) for i in range(N)]
    idx = [torch.tensor(x, device=device) for x in (starts, qlen, ctx)]
    sinks = model.model.layers[0].self_attn.sinks
    out = {}
    for window in (None, cfg.sliding_window):
        args = (q, k, v, tables, *idx, sinks, window, D ** -0.5, B)
        fast = paged_prefill_attention(*args, impl="triton")
        ref = paged_prefill_attention(*args, impl="torch")
        out[f"window_{window}_rel_err"] = _rel_err(fast, ref)
    return out


@torch.no_grad()
def time_expert_variants(model: GptOssForCausalLM, tokens: tuple[int, ...] = (1, 64, 2048),
                         repeats: int = 20) -> dict:
    """CUDA: layer 0's packed experts (both grouped linears, routing by the layer's router) per kernel variant,
    microseconds per call (median of `repeats`, CUDA events) and, for 1 token, the packed bytes its top-k experts
    hold per microsecond (GB/s). Which variant the engine should default to on this GPU is read from here."""
    layer = model.model.layers[0]
    experts: PackedMXFP4Experts = layer.mlp.experts
    device, H = experts.gate_up_proj_blocks.device, model.config.hidden_size
    per_expert = experts.packed_bytes() / experts.num_experts
    g = torch.Generator(device=device).manual_seed(0)
    out, saved = {}, experts.kernel_variant
    try:
        for variant in ("dequant", "dot_scaled"):
            experts.kernel_variant = variant
            row = {}
            for T in tokens:
                t = torch.randn(T, H, generator=g, device=device, dtype=model.dtype)
                weights, ids = route(layer.mlp.router(t), layer.mlp.top_k)
                experts(t, ids, weights)                                               # compile, warm up
                times = []
                for _ in range(repeats):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    experts(t, ids, weights)
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end) * 1e3)                        # microseconds
                us = sorted(times)[len(times) // 2]
                row[f"tokens_{T}_us"] = round(us, 1)
                if T == 1:
                    row["tokens_1_gb_s"] = round(layer.mlp.top_k * per_expert / us / 1e3, 1)
            out[variant] = row
    finally:
        experts.kernel_variant = saved
    return out


def token_agreement(tokens: list[list[int]], reference: list[list[int]]) -> dict:
    """How far two sets of greedy sequences agree. Whole-sequence identity alone says little in bf16 on random
    weights (near-tied logits flip and the sequences part), so also the first token and the common prefix."""
    def prefix(a: list[int], b: list[int]) -> int:
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    n = len(tokens)
    return {"sequences": n, "identical_greedy_sequences": sum(a == b for a, b in zip(tokens, reference)),
            "first_token_match": round(sum(a[:1] == b[:1] for a, b in zip(tokens, reference)) / n, 3),
            "mean_common_prefix": round(sum(prefix(a, b) for a, b in zip(tokens, reference)) / n, 2),
            "length": len(tokens[0]) if tokens else 0}
