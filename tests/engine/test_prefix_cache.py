"""Prefix caching: shared full blocks, never the last token, LRU eviction, the sliding-window condition."""
from engine.block_manager import BlockManager
from engine.config import FULL, NULL_BLOCK, SLIDING, CacheConfig
from engine.prefix_cache import NO_PREFIX, chain_hash
from tests.engine.helpers import make_seq

PROMPT = list(range(1, 25))  # 24 tokens = 6 blocks of 4


def manager(num_full=16, num_sliding=0, window=None) -> BlockManager:
    return BlockManager(CacheConfig(block_size=4, num_full_blocks=num_full, num_sliding_blocks=num_sliding,
                                    sliding_window=window, enable_prefix_caching=True))


def prefill(bm: BlockManager, seq) -> None:
    """Admit like the scheduler: look up, allocate the rest, compute it, commit."""
    prefix = bm.find_cached_prefix(seq)
    bm.allocate(seq, seq.num_tokens - prefix.num_tokens, prefix)
    seq.num_computed_tokens = seq.num_tokens
    bm.commit_computed(seq)


def test_hash_chains_the_parent():
    assert chain_hash(b"", [1, 2]) == chain_hash(b"", [1, 2])
    assert chain_hash(b"", [1, 2]) != chain_hash(b"", [2, 1])
    assert chain_hash(chain_hash(b"", [9]), [1, 2]) != chain_hash(b"", [1, 2])


def test_disabled_cache_never_hits():
    bm = BlockManager(CacheConfig(block_size=4, num_full_blocks=16))
    a = make_seq(0, PROMPT)
    prefill(bm, a)
    assert bm.find_cached_prefix(make_seq(1, PROMPT + [99])) is NO_PREFIX


def test_shared_prefix_shares_full_blocks():
    bm = manager()
    a = make_seq(0, PROMPT[:10])
    prefill(bm, a)                                    # blocks 0, 1 full and cached; block 2 partial
    b = make_seq(1, PROMPT[:8] + [90, 91, 92])
    prefix = bm.find_cached_prefix(b)
    assert prefix.num_tokens == 8 and prefix.block_ids[FULL] == a.block_tables[FULL][:2]
    bm.allocate(b, 3, prefix)
    assert b.num_computed_tokens == 8 and b.block_tables[FULL][:2] == a.block_tables[FULL][:2]
    assert [bm.ref_count(FULL, x) for x in b.block_tables[FULL]] == [2, 2, 1]
    assert bm.num_free_blocks(FULL) == 16 - 4
    assert bm.prefix_cache.num_hit_tokens == 8
    bm.free(a)
    assert [bm.ref_count(FULL, x) for x in b.block_tables[FULL]] == [1, 1, 1]
    bm.free(b)
    assert bm.num_free_blocks(FULL) == 16 and bm.usage() == 0.0


def test_hit_never_covers_the_last_token():
    bm = manager()
    prefill(bm, make_seq(0, PROMPT[:12]))
    # The same 12 tokens: 3 cached blocks, but the last token must run, so only 8 tokens are served.
    assert bm.find_cached_prefix(make_seq(1, PROMPT[:12])).num_tokens == 8
    assert bm.find_cached_prefix(make_seq(2, PROMPT[:13])).num_tokens == 12
    assert bm.find_cached_prefix(make_seq(3, PROMPT[:4])).num_tokens == 0
    assert bm.find_cached_prefix(make_seq(4, [7] + PROMPT[1:12])).num_tokens == 0  # first block differs


def test_freed_cached_blocks_stay_findable_until_evicted_lru():
    bm = manager(num_full=8)
    a = make_seq(0, PROMPT[:8])
    b = make_seq(1, [50 + i for i in range(8)])
    prefill(bm, a)
    prefill(bm, b)
    bm.free(a)                                         # parked first: evicted first
    bm.free(b)
    assert bm.num_free_blocks(FULL) == 8               # parked blocks count as free
    c = make_seq(2, [80 + i for i in range(16)])
    bm.allocate(c, 16)                                 # 4 never-cached blocks + 0 evictions
    assert bm.find_cached_prefix(make_seq(3, PROMPT[:8] + [1])).num_tokens == 8
    d = make_seq(4, [200 + i for i in range(8)])
    bm.allocate(d, 8)                                  # free list empty: evicts a's 2 blocks (oldest)
    assert bm.find_cached_prefix(make_seq(5, PROMPT[:8] + [1])).num_tokens == 0
    assert bm.find_cached_prefix(make_seq(6, [50 + i for i in range(8)] + [1])).num_tokens == 8
    assert bm.num_free_blocks(FULL) == 2


def test_hit_on_parked_block_counts_against_free_blocks():
    bm = manager(num_full=4)
    a = make_seq(0, PROMPT[:8])
    prefill(bm, a)
    bm.free(a)
    b = make_seq(1, PROMPT[:8] + [1, 2, 3, 4, 5, 6, 7, 8])   # 16 tokens: 2 hit blocks + 2 new
    prefix = bm.find_cached_prefix(b)
    assert prefix.num_tokens == 8 and bm.can_allocate(b, 8, prefix)
    assert not bm.can_allocate(b, 9, prefix)                # a 5th block does not exist
    bm.allocate(b, 8, prefix)
    assert bm.num_free_blocks(FULL) == 0 and b.block_tables[FULL][:2] == prefix.block_ids[FULL]


def test_sliding_hit_needs_the_window_blocks():
    # W=8, block 4: a hit of N tokens needs sliding blocks covering positions N-7 .. N-1.
    bm = manager(num_full=16, num_sliding=8, window=8)
    a = make_seq(0, PROMPT)
    prefill(bm, a)                                     # sliding blocks 0-3 parked, 4-5 live
    hit = bm.find_cached_prefix(make_seq(1, PROMPT + [1]))
    assert hit.num_tokens == 24
    assert hit.block_ids[SLIDING] == [NULL_BLOCK] * 4 + a.block_tables[SLIDING][4:]
    assert hit.block_ids[FULL] == a.block_tables[FULL]
    sliding_of_a = [bm.prefix_cache.lookup(SLIDING, h) for h in a.block_hashes[:6]]
    assert sliding_of_a[4:] == a.block_tables[SLIDING][4:] and None not in sliding_of_a
    bm.free(a)
    filler = make_seq(2, [300 + i for i in range(8)])
    bm.allocate(filler, 8)                             # 2 never-cached sliding blocks: no eviction yet
    assert bm.find_cached_prefix(make_seq(3, PROMPT[:8] + [1])).num_tokens == 8
    filler.num_computed_tokens = 8
    bm.allocate(filler, 8)                             # 2 more: evicts sliding blocks 0 and 1 (oldest)
    assert [bm.prefix_cache.is_cached(SLIDING, b) for b in sliding_of_a] == [False, False] + [True] * 4
    # Full blocks 0-1 are still cached, but a query at 8 reads positions 1..7 on sliding layers: miss.
    assert bm.find_cached_prefix(make_seq(4, PROMPT[:8] + [1])).num_tokens == 0
    # A query at 16 reads positions 9..15 = sliding blocks 2, 3: still cached.
    hit = bm.find_cached_prefix(make_seq(5, PROMPT[:16] + [1]))
    assert hit.num_tokens == 16 and hit.block_ids[SLIDING][:2] == [NULL_BLOCK] * 2
    assert hit.block_ids[SLIDING][2:] == sliding_of_a[2:4]


def test_a_conversations_prompt_end_outlives_other_prefills_on_sliding_layers():
    """The next turn of a conversation hits at the end of its last prompt, where sliding layers read the window
    before it. Other conversations' prefills pass over many sliding blocks; those go first, so the prompt ends of
    finished turns stay (in release order they were evicted first: no next turn hit under concurrency)."""
    bm = manager(num_full=64, num_sliding=12, window=8)       # W=8, block 4: a 24-token prompt spans 6 blocks
    a = make_seq(0, PROMPT)
    prefill(bm, a)
    bm.free(a)                                                # blocks 0-2 passed over; 3-5 end the prompt
    for i, seq_id in enumerate((1, 2)):                       # two more conversations' first turns
        other = make_seq(seq_id, [100 * (i + 1) + t for t in range(24)])
        prefill(bm, other)
        bm.free(other)
    assert bm.find_cached_prefix(make_seq(3, PROMPT + [7, 7, 7, 7])).num_tokens == 24
    assert bm.find_cached_prefix(make_seq(4, [100 + t for t in range(24)] + [7])).num_tokens == 24
