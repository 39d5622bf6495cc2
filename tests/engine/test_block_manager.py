"""BlockManager: accounting, reference counts, sliding-window recycling, usage and slot mapping."""
import pytest

from engine.block_manager import BlockManager, slot_mapping
from engine.config import FULL, NULL_BLOCK, SLIDING, CacheConfig
from tests.engine.helpers import make_seq


def manager(num_full=16, num_sliding=8, window=8, block_size=4, **kw) -> BlockManager:
    return BlockManager(CacheConfig(block_size=block_size, num_full_blocks=num_full,
                                    num_sliding_blocks=num_sliding, sliding_window=window, **kw))


def compute(bm: BlockManager, seq, num_tokens: int) -> None:
    """What the scheduler does around one step: allocate, 'run', advance, commit."""
    bm.allocate(seq, num_tokens)
    seq.num_computed_tokens += num_tokens
    bm.commit_computed(seq)


def test_allocate_covers_positions_and_free_returns_everything():
    bm = manager(num_full=10, num_sliding=10)
    seq = make_seq(0, 10)
    assert bm.can_allocate(seq, 10)
    bm.allocate(seq, 10)
    assert len(seq.block_tables[FULL]) == 3 and len(seq.block_tables[SLIDING]) == 3
    assert bm.num_free_blocks(FULL) == 7 and bm.num_free_blocks(SLIDING) == 7
    assert all(bm.ref_count(FULL, b) == 1 for b in seq.block_tables[FULL])
    assert len(set(seq.block_tables[FULL])) == 3
    bm.free(seq)
    assert seq.block_tables == {}
    assert bm.num_free_blocks(FULL) == 10 and bm.num_free_blocks(SLIDING) == 10
    assert all(bm.ref_count(FULL, b) == 0 for b in range(10))


def test_can_allocate_refuses_and_allocate_raises_without_side_effects():
    bm = manager(num_full=3, num_sliding=8)
    seq = make_seq(0, 20)
    assert not bm.can_allocate(seq, 13)  # 4 full blocks needed, 3 exist
    assert bm.can_allocate(seq, 12)
    with pytest.raises(RuntimeError, match="not enough free KV blocks"):
        bm.allocate(seq, 13)
    assert bm.num_free_blocks(FULL) == 3 and seq.block_tables == {}


def test_second_allocation_only_adds_missing_blocks():
    bm = manager(window=None, num_sliding=0)
    seq = make_seq(0, 30)
    compute(bm, seq, 5)                 # positions 0..4 -> blocks 0, 1
    first_two = list(seq.block_tables[FULL])
    compute(bm, seq, 3)                 # positions 5..7 fit in block 1
    assert seq.block_tables[FULL] == first_two
    compute(bm, seq, 1)                 # position 8 opens block 2
    assert seq.block_tables[FULL][:2] == first_two and len(seq.block_tables[FULL]) == 3
    assert SLIDING not in seq.block_tables and bm.num_free_blocks(FULL) == 13


def test_sliding_blocks_leave_the_window_while_decoding():
    # W=8, block 4: the next query at position p reads keys p-7..p; block j is dead once 4j+3 < p-7.
    bm = manager(num_full=16, num_sliding=8, window=8, block_size=4)
    seq = make_seq(0, 5)
    compute(bm, seq, 5)
    while seq.num_computed_tokens < 20:
        compute(bm, seq, 1)
        p = seq.num_computed_tokens
        table = seq.block_tables[SLIDING]
        live = [j for j, b in enumerate(table) if b != NULL_BLOCK]
        assert live == [j for j in range(len(table)) if 4 * j + 3 >= p - 7], p
        assert bm.num_free_blocks(SLIDING) == 8 - len(live)
    # Next query at 20: keys 13..20. Blocks 0-2 (positions 0..11) are recycled, block 3 (12..15) still read.
    bm.allocate(seq, 1)
    table = seq.block_tables[SLIDING]
    assert table[:3] == [NULL_BLOCK] * 3 and NULL_BLOCK not in table[3:] and len(table) == 6
    assert len(seq.block_tables[FULL]) == 6 and NULL_BLOCK not in seq.block_tables[FULL]
    assert bm.num_free_blocks(SLIDING) == 8 - 3 and bm.num_free_blocks(FULL) == 16 - 6
    bm.free(seq)
    assert bm.num_free_blocks(SLIDING) == 8 and bm.num_free_blocks(FULL) == 16


def test_long_chunk_holds_every_sliding_block_until_committed():
    # A 20-token chunk writes KV for all its positions, and queries inside it read 7 keys back.
    bm = manager(num_full=16, num_sliding=8, window=8)
    seq = make_seq(0, 30)
    compute(bm, seq, 4)
    bm.allocate(seq, 20)                        # positions 4..23, window start for query 4 is 0
    assert NULL_BLOCK not in seq.block_tables[SLIDING] and len(seq.block_tables[SLIDING]) == 6
    seq.num_computed_tokens += 20
    bm.commit_computed(seq)                     # next query 24 reads 17..24: blocks 4, 5 stay
    assert seq.block_tables[SLIDING][:4] == [NULL_BLOCK] * 4
    assert bm.num_free_blocks(SLIDING) == 6


def test_usage_counts_both_pools():
    bm = manager(num_full=12, num_sliding=4, window=8)
    assert bm.usage() == 0.0
    seq = make_seq(0, 16)
    compute(bm, seq, 16)                        # 4 full blocks; sliding keeps blocks 2, 3 (positions 8..15)
    assert bm.usage() == pytest.approx((4 + 2) / 16)
    bm.free(seq)
    assert bm.usage() == 0.0


def test_slot_mapping_values():
    assert slot_mapping([7, 2, 5], start=3, num_tokens=6, block_size=4) == [31, 8, 9, 10, 11, 20]
    bm = manager()
    seq = make_seq(0, 9)
    bm.allocate(seq, 9)
    slots = slot_mapping(seq.block_tables[FULL], 0, 9, 4)
    table = seq.block_tables[FULL]
    assert slots == [table[p // 4] * 4 + p % 4 for p in range(9)]
    assert len(set(slots)) == 9

