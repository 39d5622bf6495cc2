"""Frozen configs of the engine's model-independent parts: the paged KV cache and the scheduler.

Each component receives only its own config; values found at run time (the number of KV blocks after
profiling memory) are passed in by whoever measured them, never written back into a config.
"""
from __future__ import annotations

from dataclasses import dataclass

# KV groups: layers of one kind share a block pool and a block table per sequence. The model runner maps
# HF `layer_types` onto them: "full_attention" -> FULL, "sliding_attention" -> SLIDING.
FULL = "full"
SLIDING = "sliding"
# Block-table entry of a sliding block recycled after leaving the window; keeps tables indexed by position.
NULL_BLOCK = -1
# KV memory when nothing is given (engine/kv_budget.py turns it into pools). On CPU, bytes per engine (per EP rank),
# committed at start: 1 GiB holds the 120b attention geometry's sliding pool (0.68 GiB in fp32 for 64 sequences)
# plus ~4.7K full-attention tokens, and the demo model 131072 tokens 16 times over, while a two-rank replica still
# leaves ~90% of a 24 GiB machine. On CUDA, the fraction of the GPU's total memory for weights, activations and the
# KV cache together, as in vLLM.
DEFAULT_KV_CACHE_MEMORY = 1 << 30
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9


def max_blocks_spanned(num_positions: int, block_size: int) -> int:
    """Most blocks that `num_positions` consecutive positions can touch, over every alignment."""
    if num_positions <= 0:
        return 0
    return (num_positions + block_size - 2) // block_size + 1


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """Paged KV cache: two pools of `block_size`-token blocks, one per KV group.

    The full pool holds every position of every sequence. The sliding pool holds, per sequence, only the
    blocks that a future query can still read (the last `sliding_window` positions, rounded out to
    blocks, plus the current chunk); it is unused and may be empty when the model has no sliding layers.
    """

    num_full_blocks: int            # found by profiling memory; holds num_full_blocks * block_size tokens
    num_sliding_blocks: int = 0     # 0 only when sliding_window is None
    block_size: int = 16            # tokens per block (vLLM's default): little waste on short requests
    sliding_window: int | None = None  # W: query i reads keys i-W+1 .. i on sliding layers (gpt-oss: 128)
    enable_prefix_caching: bool = False  # opt-in, as it trades memory bookkeeping for skipped prefill

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be a positive number of tokens, got {self.block_size}")
        if self.num_full_blocks < 1:
            raise ValueError(f"num_full_blocks must be at least 1, got {self.num_full_blocks}; "
                             "give the KV cache more memory or use a smaller block_size")
        if self.num_sliding_blocks < 0:
            raise ValueError(f"num_sliding_blocks must be non-negative, got {self.num_sliding_blocks}")
        if self.sliding_window is not None:
            if self.sliding_window < 1:
                raise ValueError(f"sliding_window must be a positive number of tokens or None, "
                                 f"got {self.sliding_window}")
            if self.num_sliding_blocks < 1:
                raise ValueError(f"sliding_window={self.sliding_window} needs a sliding block pool, "
                                 f"got num_sliding_blocks={self.num_sliding_blocks}")

    @property
    def groups(self) -> tuple[str, ...]:
        """The KV groups in use: FULL always, SLIDING only when the model has sliding layers."""
        return (FULL,) if self.sliding_window is None else (FULL, SLIDING)

    def num_blocks(self, group: str) -> int:
        if group == FULL:
            return self.num_full_blocks
        if group == SLIDING:
            return self.num_sliding_blocks
        raise ValueError(f"unknown KV group {group!r}; expected {FULL!r} or {SLIDING!r}")


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """Continuous batching: one token budget per step shared by decodes and prefill chunks."""

    max_num_seqs: int = 64               # running sequences at once; bounds the decode batch
    max_num_batched_tokens: int = 512    # tokens per step (decodes + prefill chunks); bounds step latency
    enable_chunked_prefill: bool = True  # split long prompts over steps so decodes keep flowing
    max_model_len: int = 4096            # prompt + output tokens; set from the model (gpt-oss: 131072)

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2 (one prompt and one output token), "
                             f"got {self.max_model_len}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}) so every running sequence can decode each step; "
                "raise max_num_batched_tokens or lower max_num_seqs")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"without chunked prefill a whole prompt runs in one step, so max_num_batched_tokens "
                f"({self.max_num_batched_tokens}) must be >= max_model_len ({self.max_model_len}); "
                "enable chunked prefill, raise max_num_batched_tokens or lower max_model_len")

    @property
    def max_chunk_tokens(self) -> int:
        """Most tokens one sequence can be scheduled in one step."""
        return min(self.max_num_batched_tokens, self.max_model_len)


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Knobs of one replica (one LLMEngine); the scheduler and cache configs are derived from these and the model.

    KV memory, first match wins: `kv_cache_bytes` (exact bytes for both pools), else on CUDA `gpu_memory_utilization`
    (profiled at start: the KV cache gets what the fraction leaves after weights and a peak step), else on CPU
    `kv_cache_memory`. engine/kv_budget.py turns the bytes into pools and the effective max_model_len.
    """
    max_num_seqs: int = 64                  # concurrent sequences (the decode batch)
    max_num_batched_tokens: int = 512       # tokens per step: decodes + prefill chunks
    max_model_len: int | None = None        # prompt + output; None: what the KV cache holds, capped by the model
    block_size: int = 16
    kv_cache_bytes: int | None = None       # exact KV bytes for both pools; overrides the two below
    kv_cache_memory: int = DEFAULT_KV_CACHE_MEMORY                     # CPU: KV bytes of this engine
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION    # CUDA: fraction of total GPU memory
    enable_prefix_caching: bool = False
    enable_chunked_prefill: bool = True
    seed: int | None = None                 # seeds the shared generator of unseeded requests
    cuda_graphs: bool = True                # decode steps as CUDA graphs (CUDA only; EP ranks too)

    def __post_init__(self) -> None:
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2 (one prompt and one output token) or None (what "
                             f"fits), got {self.max_model_len}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes < 1:
            raise ValueError(f"kv_cache_bytes must be a positive number of bytes or None, got {self.kv_cache_bytes}")
        if self.kv_cache_memory < 1:
            raise ValueError(f"kv_cache_memory must be a positive number of bytes, got {self.kv_cache_memory}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization is a fraction of the GPU's memory in (0, 1], "
                             f"got {self.gpu_memory_utilization}")
