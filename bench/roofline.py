"""The memory-bandwidth roofline of batch-1 decode: this machine's measured bandwidth and the bytes one token reads.

Decode at batch 1 is memory-bound (DESIGN.md, performance model): every decoded token streams the dense weights,
its top-k experts of every layer, the unembedding and its KV cache once. Roofline tokens/s = bandwidth / bytes.
"""
from __future__ import annotations

import time

import torch

from model.config import ModelConfig

BYTES_PER_TOKEN_FORMULA = (
    "sum over layers of [q,k,v,o weights+biases, sinks, router weight+bias, 2 RMSNorm (fp32), "
    "top_k x (gate_up W+b, down W+b), KV read 2*kv_heads*head_dim*keys_seen + KV write 2*kv_heads*head_dim] "
    "+ one embedding row + final norm (fp32) + lm_head; keys_seen = position+1 (full) or min(position+1, window)"
)


def measure_bandwidth(num_bytes: int, repeats: int = 5, device: str | torch.device = "cpu") -> float:
    """Bytes/s of a large tensor copy, counting bytes read + written, best of `repeats` (after one warm-up)."""
    src = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)                   # [n]
    dst = torch.zeros_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best


def keys_seen(config: ModelConfig, layer: int, position: int) -> int:
    """Cached keys the query at `position` reads on `layer` (itself included)."""
    window = config.window(layer)
    return position + 1 if window is None else min(position + 1, window)


def bytes_per_token(config: ModelConfig, dtype: torch.dtype, positions: range) -> float:
    """Bytes read and written to decode one token at batch 1, averaged over the decoded `positions`."""
    elem = torch.empty((), dtype=dtype).element_size()
    H, I, D, V = config.hidden_size, config.intermediate_size, config.head_dim, config.vocab_size
    nq, nkv, E = config.num_attention_heads * D, config.num_key_value_heads * D, config.num_local_experts
    attention = (H * nq + nq) + 2 * (H * nkv + nkv) + (nq * H + H) + config.num_attention_heads
    router = E * H + E
    expert = (H * 2 * I + 2 * I) + (I * H + H)
    per_layer = (attention + router + config.num_experts_per_tok * expert + 2 * nkv) * elem + 2 * H * 4
    weights = config.num_hidden_layers * per_layer + (H + V * H) * elem + H * 4
    kv_read = sum(2 * nkv * elem * keys_seen(config, layer, p)
                  for p in positions for layer in range(config.num_hidden_layers)) / len(positions)
    return weights + kv_read


def roofline(config: ModelConfig, dtype: torch.dtype, positions: range, decode_tok_s: float,
             bandwidth: float) -> dict:
    """The JSON record: measured bandwidth, bytes/token, achieved bandwidth and the fraction of the roofline."""
    per_token = bytes_per_token(config, dtype, positions)
    return {
        "bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "bytes_per_token_mb": round(per_token / 1e6, 2),
        "bytes_per_token_formula": BYTES_PER_TOKEN_FORMULA,
        "decode_tok_s": round(decode_tok_s, 2),
        "achieved_gb_s": round(decode_tok_s * per_token / 1e9, 2),
        "roofline_tok_s": round(bandwidth / per_token, 2),
        "fraction": round(decode_tok_s * per_token / bandwidth, 3),
    }
