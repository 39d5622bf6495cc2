"""Prefix caching changes where KV comes from, never what is generated: greedy outputs with real cache hits (shared
long prefixes, a second wave that reuses the first wave's blocks, a follow-up turn over a previous output) equal
the outputs of an engine with prefix caching off, on the tiny checkpoint (fp32, sliding window 16, block size 4)."""
import random

import pytest
import torch

from engine.config import FULL, SLIDING
from engine.engine import EngineConfig, LLMEngine
from engine.sampling_params import SamplingParams
from model.paged_attention import PagedKVCache
from tests.engine.conftest import SPEC

BLOCK = 4
MAX_TOKENS = 6


def engine_for(model, prefix_caching: bool, **kw) -> LLMEngine:
    config = dict(max_num_seqs=8, max_num_batched_tokens=48, block_size=BLOCK, max_model_len=256,
                  kv_cache_bytes=4 << 20, enable_prefix_caching=prefix_caching)
    return LLMEngine(model, EngineConfig(**{**config, **kw}))


def greedy_outputs(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [r[0].output_token_ids for r in engine.generate(prompts, params)]


def hit_tokens(engine: LLMEngine) -> int:
    return engine.block_manager.prefix_cache.num_hit_tokens


def all_free(engine: LLMEngine) -> bool:
    bm = engine.block_manager
    return all(bm.num_free_blocks(g) == bm.num_total_blocks(g) for g in (FULL, SLIDING))


@pytest.fixture(scope="module")
def waves():
    """Two waves of prompts over two shared prefixes (70 and 33 tokens: longer than the window, one not
    block-aligned). Wave 2 repeats a wave-1 prompt, extends one, cuts one inside a block, and adds new suffixes."""
    rng = random.Random(7)
    ids = lambda n: [rng.randrange(SPEC.vocab) for _ in range(n)]   # noqa: E731
    shared_a, shared_b = ids(70), ids(33)
    first = [shared_a + ids(n) for n in (1, 9, 22)] + [shared_b + ids(n) for n in (5, 18)]
    second = [first[1], first[2] + ids(7), shared_a[:57], shared_a + ids(3), shared_b + ids(30), shared_b[:20] + ids(4)]
    return first, second


def test_greedy_outputs_with_prefix_hits_equal_outputs_without(tiny_model, waves):
    first, second = waves
    reference = engine_for(tiny_model, prefix_caching=False)
    want_first, want_second = greedy_outputs(reference, first), greedy_outputs(reference, second)
    assert reference.block_manager.prefix_cache is None

    cached = engine_for(tiny_model, prefix_caching=True)
    assert greedy_outputs(cached, first) == want_first
    after_first = hit_tokens(cached)
    assert greedy_outputs(cached, second) == want_second
    second_hits = hit_tokens(cached) - after_first
    # Every wave-2 prompt shares at least 16 block-aligned tokens with wave 1 (shared_b[:20] -> 4 blocks), the
    # repeated prompt all but its last block: the hits cover most of wave 2's shared tokens, not a stray block.
    assert second_hits >= 0.6 * sum(len(p) for p in second), (second_hits, [len(p) for p in second])
    assert all_free(cached)


def test_a_follow_up_turn_hits_the_blocks_of_generated_tokens(tiny_model, waves):
    """Turn 2 = turn 1's prompt + its output + a new message: its hit covers blocks filled by decode steps, whose
    KV was written one token per step (then parked once the request finished)."""
    prompt = waves[0][2]
    rng = random.Random(8)
    reference = engine_for(tiny_model, prefix_caching=False)
    cached = engine_for(tiny_model, prefix_caching=True)
    (out,) = greedy_outputs(cached, [prompt])
    assert out == greedy_outputs(reference, [prompt])[0]
    follow_up = prompt + out + [rng.randrange(SPEC.vocab) for _ in range(5)]
    before = hit_tokens(cached)
    assert greedy_outputs(cached, [follow_up]) == greedy_outputs(reference, [follow_up])
    computed_before = (len(prompt) + len(out) - 1) // BLOCK * BLOCK     # the last output token's KV is never written
    assert hit_tokens(cached) - before == computed_before > len(prompt)


def test_exact_when_a_small_cache_evicts_parked_blocks(tiny_model, waves):
    """40 full blocks (160 tokens) for prompts of up to 99: parked prefixes are evicted, sequences preempted and
    re-admitted (possibly over their own cached blocks) between and within waves; the outputs stay exact."""
    first, second = waves
    cfg, small = tiny_model.config, dict(max_num_seqs=4, max_model_len=128)
    sliding = engine_for(tiny_model, True, **small).block_manager.num_total_blocks(SLIDING)   # what the window needs
    small["kv_cache_bytes"] = (sliding * PagedKVCache.bytes_per_block(cfg, BLOCK, torch.float32, SLIDING)
                               + 40 * PagedKVCache.bytes_per_block(cfg, BLOCK, torch.float32, FULL))
    reference = engine_for(tiny_model, prefix_caching=False, **small)
    cached = engine_for(tiny_model, prefix_caching=True, **small)
    assert cached.block_manager.num_total_blocks(FULL) == 40
    cache, evicted = cached.block_manager.prefix_cache, []
    evict = cache.evict
    cache.evict = lambda group: evicted.append(evict(group)) or evicted[-1]
    prompts = first + second + first[:2]
    assert greedy_outputs(cached, prompts) == greedy_outputs(reference, prompts)
    assert hit_tokens(cached) > 0 and cached.scheduler.num_preemptions > 0
    assert [b for b in evicted if b is not None] and all_free(cached)
