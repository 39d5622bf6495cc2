"""KV sizing (engine/kv_budget.py): memory -> blocks of both pools and the max_model_len that fits, the errors that
name what would fit, vLLM's CUDA rule, and LLMEngine.max_model_len on a real tiny model."""
import dataclasses

import pytest
import torch

from engine.config import FULL, SLIDING, EngineConfig
from engine.engine import LLMEngine
from engine.kv_budget import gpu_kv_bytes, plan_kv_budget, sliding_blocks
from engine.model_runner import profile_forward
from engine.sampling_params import SamplingParams
from model.config import ModelConfig
from model.paged_attention import PagedKVCache
from model.tiny import hf_config, tiny_spec

GiB, MiB = 1 << 30, 1 << 20
# 2 layers (sliding, full), 2 KV heads of 16, fp32: 256 bytes per token per pool, 4 KiB per block of 16.
SMALL = ModelConfig.from_hf_dict(hf_config(tiny_spec(layers=2, kv_heads=2, head_dim=16, sliding_window=8)))
BLOCK = 4096
CONFIG = EngineConfig(max_num_seqs=4, max_num_batched_tokens=32)
# sliding pool: 4 sequences x 2 blocks (window 8) + one 32-token chunk with its 7 keys before it (4 blocks)
SLIDING_BLOCKS = 12


def plan(kv_bytes, model=SMALL, dtype=torch.float32, **changes):
    config = dataclasses.replace(CONFIG, **changes)
    return plan_kv_budget(model, dtype, config, kv_bytes, f"kv_cache_memory={kv_bytes}")


def test_bytes_per_block_and_sliding_pool_are_what_the_layout_says():
    assert PagedKVCache.bytes_per_block(SMALL, 16, torch.float32, FULL) == BLOCK == 2 * 16 * 2 * 16 * 4
    assert sliding_blocks(SMALL, 16, 4, 32) == SLIDING_BLOCKS


def test_memory_becomes_blocks_and_the_length_that_fits():
    budget = plan(SLIDING_BLOCKS * BLOCK + 50 * BLOCK + 100)     # 100 bytes short of another block
    assert (budget.cache.num_sliding_blocks, budget.cache.num_full_blocks) == (SLIDING_BLOCKS, 50)
    assert budget.max_model_len == 50 * 16                         # one sequence may take the whole full pool
    assert budget.num_bytes == (SLIDING_BLOCKS + 50) * BLOCK
    assert budget.concurrency == 1.0
    assert "full pool 800 tokens" in budget.describe() and "max_model_len 800" in budget.describe()


def test_default_length_is_capped_by_the_model_and_the_pool_trimmed_to_what_sequences_can_use():
    budget = plan(GiB)
    assert budget.max_model_len == SMALL.max_position_embeddings == 131072
    assert budget.cache.num_full_blocks == 4 * 131072 // 16          # max_num_seqs sequences of max_model_len
    assert budget.num_bytes < GiB and budget.concurrency == 4.0
    exact = plan(GiB, kv_cache_bytes=GiB)                             # exact bytes are never trimmed
    assert exact.cache.num_full_blocks == (GiB - SLIDING_BLOCKS * BLOCK) // BLOCK
    cached = plan(GiB, enable_prefix_caching=True)                    # spare blocks keep cached prefixes
    assert cached.cache.num_full_blocks == exact.cache.num_full_blocks


def test_an_explicit_length_is_kept_when_it_fits():
    budget = plan(GiB, max_model_len=1000)
    assert budget.max_model_len == 1000
    assert budget.cache.num_full_blocks == 4 * 63                     # ceil(1000 / 16) blocks per sequence
    assert plan(GiB, max_model_len=10 ** 6).max_model_len == 131072   # capped by the model, as before


def test_asking_for_more_than_fits_names_the_largest_length_that_fits():
    with pytest.raises(ValueError, match="largest max_model_len that fits is 800;"):
        plan(SLIDING_BLOCKS * BLOCK + 50 * BLOCK, max_model_len=801)
    assert plan(SLIDING_BLOCKS * BLOCK + 50 * BLOCK, max_model_len=800).max_model_len == 800


def test_a_budget_below_the_sliding_pool_says_so():
    with pytest.raises(ValueError, match=r"cannot hold the sliding-window pool \(12 blocks = 48.0 KiB for "
                                         r"max_num_seqs=4, window 8\).*256 bytes"):
        plan(SLIDING_BLOCKS * BLOCK + BLOCK - 1)


def test_without_chunked_prefill_the_default_length_is_one_step():
    budget = plan(GiB, enable_chunked_prefill=False, max_num_batched_tokens=2048)
    assert budget.max_model_len == 2048


def test_120b_attention_geometry_under_the_defaults():
    """gpt-oss-120b's attention (18 sliding + 18 full layers, 8 KV heads of 64): its sliding pool alone is 0.68 GiB in
    fp32 at 64 sequences, so the old 64 MiB / 256 MiB defaults could not start it; 1 GiB holds 4,688 more tokens."""
    model = ModelConfig.from_hf_dict(hf_config(tiny_spec("120b-attention")))
    default = EngineConfig()
    budget = plan_kv_budget(model, torch.float32, default, default.kv_cache_memory, "default")
    assert budget.cache.num_sliding_blocks == 64 * 9 + 41 == 617
    assert budget.max_model_len == budget.full_tokens == 4688
    assert plan_kv_budget(model, torch.bfloat16, default, default.kv_cache_memory, "default").max_model_len == 19248
    with pytest.raises(ValueError, match="sliding-window pool"):
        plan_kv_budget(model, torch.float32, default, 256 * MiB, "the old app default")


def test_cuda_rule_gives_the_kv_cache_what_the_fraction_leaves():
    assert gpu_kv_bytes(total=100 * GiB, used=30 * GiB, peak_activations=5 * GiB, utilization=0.9) == 55 * GiB
    with pytest.raises(ValueError, match="raise gpu_memory_utilization above 0.35"):
        gpu_kv_bytes(total=100 * GiB, used=30 * GiB, peak_activations=5 * GiB, utilization=0.3)


@pytest.mark.parametrize("change, message", [
    (dict(kv_cache_memory=0), "kv_cache_memory must be a positive"),
    (dict(kv_cache_bytes=0), "kv_cache_bytes must be a positive"),
    (dict(gpu_memory_utilization=1.5), r"gpu_memory_utilization is a fraction .* in \(0, 1\]"),
    (dict(max_model_len=1), "max_model_len must be at least 2"),
])
def test_engine_config_rejects_bad_values(change, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**change)


def test_engine_exposes_the_length_that_fits_and_serves_up_to_it(tiny_model):
    cfg = tiny_model.config                                     # sliding, full, sliding; 2 KV heads of 16; fp32
    sliding = sliding_blocks(cfg, 4, 4, 32) * PagedKVCache.bytes_per_block(cfg, 4, torch.float32, SLIDING)
    config = EngineConfig(max_num_seqs=4, max_num_batched_tokens=32, block_size=4,
                          kv_cache_memory=sliding + 30 * PagedKVCache.bytes_per_block(cfg, 4, torch.float32, FULL))
    engine = LLMEngine(tiny_model, config)
    assert engine.max_model_len == 120 == engine.scheduler.config.max_model_len
    out = engine.generate([list(range(119))], SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))[0][0]
    assert len(out.output_token_ids) == 1 and out.finish_reason == "length"
    with pytest.raises(ValueError, match="max_model_len is 120"):
        engine.add_request("long", list(range(120)), SamplingParams())
    with pytest.raises(ValueError, match="largest max_model_len that fits is 120"):
        LLMEngine(tiny_model, dataclasses.replace(config, max_model_len=121))


def test_profiling_forward_is_the_models_forward(tiny_model):
    """The step that CUDA profiling measures is a real forward (here on CPU): its logits are the full-prefix ones."""
    logits = profile_forward(tiny_model, torch.device("cpu"), num_tokens=21, num_rows=3, block_size=4)   # [3, V]
    want = tiny_model.prefix_logits(torch.zeros(21, dtype=torch.long))[:3]
    assert logits.shape == (3, tiny_model.config.vocab_size)
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-5)


@pytest.mark.gpu
def test_cuda_default_profiles_and_stays_within_the_fraction(tiny_model_dir):
    from model.loader import load_model
    model = load_model(tiny_model_dir, torch.bfloat16, "cuda")
    engine = LLMEngine(model, EngineConfig(gpu_memory_utilization=0.5, max_model_len=4096))
    free, total = torch.cuda.mem_get_info()
    assert engine.kv_budget.source.startswith("gpu_memory_utilization=0.5")
    assert engine.max_model_len == 4096 and total - free <= 0.5 * total
