"""KVBudget: a KV memory budget turned into the two block pools and the longest sequence they hold (max_model_len).

Owns the sizing arithmetic and, on CUDA, the memory profile that turns gpu_memory_utilization into bytes (vLLM's
rule). It never allocates the cache (ModelRunner does) and never runs the model itself (the engine hands it a
profiling step).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.config import FULL, SLIDING, CacheConfig, EngineConfig, max_blocks_spanned
from model.config import ModelConfig
from model.paged_attention import PagedKVCache

GiB = 1 << 30


def gib(num_bytes: float) -> str:
    """Bytes for people: 2.00 GiB, 512.0 MiB, 1.5 KiB, 12 B."""
    for unit, size in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if num_bytes >= size:
            return f"{num_bytes / size:.2f} {unit}" if unit == "GiB" else f"{num_bytes / size:.1f} {unit}"
    return f"{int(num_bytes)} B"


def sliding_blocks(config: ModelConfig, block_size: int, max_num_seqs: int, max_chunk_tokens: int) -> int:
    """Blocks the sliding pool needs (0 without sliding layers): every running sequence's last W positions plus one
    chunk with the W-1 keys before it."""
    if not any(config.is_sliding(i) for i in range(config.num_hidden_layers)):
        return 0
    W = config.sliding_window
    return max_num_seqs * max_blocks_spanned(W, block_size) + max_blocks_spanned(W - 1 + max_chunk_tokens, block_size)


def kv_bytes_for(config: ModelConfig, dtype: torch.dtype, block_size: int, max_num_seqs: int, max_chunk_tokens: int,
                 num_full_blocks: int) -> int:
    """The exact kv_cache_bytes whose plan is the sliding pool these settings need plus `num_full_blocks` full
    blocks (benchmarks and tests that want a pool of a given size)."""
    sliding = sliding_blocks(config, block_size, max_num_seqs, max_chunk_tokens)
    return (sliding * PagedKVCache.bytes_per_block(config, block_size, dtype, SLIDING)
            + num_full_blocks * PagedKVCache.bytes_per_block(config, block_size, dtype, FULL))


@dataclass(frozen=True)
class KVBudget:
    """The KV cache an engine starts with: both pools, the effective max_model_len, and where the bytes came from."""
    cache: CacheConfig
    max_model_len: int
    num_bytes: int              # both pools, as allocated
    source: str                 # what set the budget, e.g. "kv_cache_memory=2.00 GiB"
    max_num_seqs: int

    @property
    def full_tokens(self) -> int:
        return self.cache.num_full_blocks * self.cache.block_size

    @property
    def concurrency(self) -> float:
        """Sequences of max_model_len tokens the full pool holds at once (vLLM's "maximum concurrency")."""
        return self.full_tokens / self.max_model_len

    def describe(self) -> str:
        c = self.cache
        sliding = (f", sliding pool {c.num_sliding_blocks * c.block_size:,} tokens ({c.num_sliding_blocks:,} blocks: "
                   f"window {c.sliding_window} for {self.max_num_seqs} sequences)" if c.num_sliding_blocks else "")
        return (f"KV cache {gib(self.num_bytes)} ({self.source}): full pool {self.full_tokens:,} tokens "
                f"({c.num_full_blocks:,} blocks of {c.block_size}){sliding}; max_model_len {self.max_model_len:,}, "
                f"concurrency {self.concurrency:.2f}x at max_model_len")


def plan_kv_budget(model: ModelConfig, dtype: torch.dtype, config: EngineConfig, kv_bytes: int,
                   source: str) -> KVBudget:
    """Size both pools from `kv_bytes` and pick max_model_len: the one asked for (capped by the model), which must
    fit one sequence in the full pool, or else the most that fits (capped by the model). Unless the bytes are exact
    (kv_cache_bytes) or prefix caching may keep finished blocks, the full pool is trimmed to what max_num_seqs
    sequences of max_model_len can use, so a small model does not take the whole budget."""
    B, model_max = config.block_size, model.max_position_embeddings
    asked = None if config.max_model_len is None else min(config.max_model_len, model_max)
    limit = asked or (model_max if config.enable_chunked_prefill else min(model_max, config.max_num_batched_tokens))
    sliding = sliding_blocks(model, B, config.max_num_seqs, min(config.max_num_batched_tokens, limit))
    per_sliding = PagedKVCache.bytes_per_block(model, B, dtype, SLIDING)
    per_full = PagedKVCache.bytes_per_block(model, B, dtype, FULL)
    left = kv_bytes - sliding * per_sliding
    if left < 0 or left < per_full:
        raise ValueError(
            f"the KV cache ({source}) cannot hold the sliding-window pool ({sliding} blocks = "
            f"{gib(sliding * per_sliding)} for max_num_seqs={config.max_num_seqs}, window {model.sliding_window}) "
            f"plus any full-attention block; give it more than that (each token of max_model_len adds "
            f"{per_full // B:,} bytes) or lower max_num_seqs")
    num_full = left // per_full if per_full else config.max_num_seqs * -(-limit // B)
    fits = min(num_full * B, model_max)
    if asked is not None and asked > fits:
        raise ValueError(
            f"max_model_len={asked} does not fit: the KV cache ({source}) holds {num_full * B} tokens of one sequence "
            f"in its full-attention pool, so the largest max_model_len that fits is {fits}; lower max_model_len or "
            f"give the KV cache more memory")
    max_model_len = asked or min(limit, fits)
    if max_model_len < 2:
        raise ValueError(f"the KV cache ({source}) holds {num_full * B} tokens, fewer than the 2 a sequence needs; "
                         "give it more memory")
    if config.kv_cache_bytes is None and not config.enable_prefix_caching:
        num_full = min(num_full, config.max_num_seqs * -(-max_model_len // B))
    cache = CacheConfig(num_full_blocks=int(num_full), num_sliding_blocks=sliding, block_size=B,
                        sliding_window=model.sliding_window if sliding else None,
                        enable_prefix_caching=config.enable_prefix_caching)
    return KVBudget(cache, max_model_len, int(num_full * per_full + sliding * per_sliding), source,
                    config.max_num_seqs)


def gpu_kv_bytes(total: int, used: int, peak_activations: int, utilization: float) -> int:
    """vLLM's rule: the KV cache gets utilization * total minus what is in use (weights, CUDA context, anything else
    on the GPU) and minus the activation peak of the largest step, which is freed between steps."""
    kv = int(utilization * total) - used - peak_activations
    if kv <= 0:
        need = (used + peak_activations) / total
        raise ValueError(
            f"gpu_memory_utilization={utilization} allows {gib(utilization * total)} of the GPU's {gib(total)}, but "
            f"{gib(used)} is in use (weights, CUDA context, other processes) and a step's activations peak at "
            f"{gib(peak_activations)}: nothing is left for the KV cache; raise gpu_memory_utilization above "
            f"{need:.2f} or lower max_num_batched_tokens")
    return kv


def profile_cuda_kv_bytes(device: torch.device, utilization: float, peak_step: Callable[[], None]) -> tuple[int, str]:
    """Run `peak_step` (one step of the largest size, its temporaries dropped on return) with the model loaded, then
    apply `gpu_kv_bytes`; returns the bytes and a description for logs and errors."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    peak_step()
    torch.cuda.synchronize(device)
    peak_activations = torch.cuda.max_memory_allocated(device) - torch.cuda.memory_allocated(device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    kv = gpu_kv_bytes(total, total - free, peak_activations, utilization)
    return kv, (f"gpu_memory_utilization={utilization} of {gib(total)}; in use {gib(total - free)}, activation "
                f"peak {gib(peak_activations)}")
