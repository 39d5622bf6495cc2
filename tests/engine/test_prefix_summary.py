"""PrefixSummary: the router's view of a prefix cache agrees with the engine's own lookups, block for block."""
from engine.block_manager import BlockManager
from engine.config import CacheConfig
from engine.prefix_summary import PrefixSummary, prefix_report, prompt_block_keys, summarize
from tests.engine.helpers import make_seq
from tests.engine.test_prefix_cache import prefill

PROMPT = list(range(1, 25))  # 24 tokens = 6 blocks of 4


def manager(num_full=16) -> BlockManager:
    return BlockManager(CacheConfig(block_size=4, num_full_blocks=num_full, enable_prefix_caching=True))


def test_summary_predicts_the_engines_hit():
    bm = manager()
    prefill(bm, make_seq(0, PROMPT))
    summary = summarize(bm.prefix_cache)
    for prompt in (PROMPT + [99], PROMPT[:10] + [7, 7, 7, 7, 7], [5] + PROMPT, PROMPT[:4]):
        predicted = summary.cached_blocks(prompt_block_keys(prompt, 4)) * 4
        assert predicted == bm.find_cached_prefix(make_seq(1, prompt)).num_tokens, prompt


def test_prompt_keys_leave_the_last_token_and_chain():
    assert len(prompt_block_keys(PROMPT, 4)) == 5          # 24 tokens: the block holding the last one is never hit
    assert len(prompt_block_keys(PROMPT + [1], 4)) == 6
    assert prompt_block_keys([9] + PROMPT[1:], 4)[1] != prompt_block_keys(PROMPT, 4)[1]   # block 1 equal, parent not


def test_wire_round_trip_merge_and_cap():
    bm = manager()
    prefill(bm, make_seq(0, PROMPT))
    summary = summarize(bm.prefix_cache)
    assert PrefixSummary.from_wire(summary.to_wire()).keys == summary.keys and len(summary.keys) == 6
    assert len(summarize(bm.prefix_cache, max_keys=2).keys) == 2
    other = PrefixSummary(4, frozenset({1, 2}), 5.0)
    merged = PrefixSummary.merge([summary, other])
    assert merged.keys == summary.keys | {1, 2} and merged.made_at == 5.0
    assert PrefixSummary.merge([]) is None


def test_evicted_blocks_leave_the_summary():
    bm = manager(num_full=8)
    a = make_seq(0, PROMPT)
    prefill(bm, a)
    bm.free(a)                                              # parked: still cached
    prefill(bm, make_seq(1, list(range(100, 128))))       # needs 7 blocks of 8: evicts most of the first prompt
    summary = summarize(bm.prefix_cache)
    assert summary.cached_blocks(prompt_block_keys(PROMPT + [99], 4)) * 4 == \
        bm.find_cached_prefix(make_seq(2, PROMPT + [99])).num_tokens < 24


def test_report_without_prefix_caching():
    bm = BlockManager(CacheConfig(block_size=4, num_full_blocks=16))
    assert prefix_report(type("Engine", (), {"block_manager": bm})()) == (None, 0, 0)
