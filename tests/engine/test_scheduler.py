"""Scheduler with no model: budgets, chunked prefill, decode priority, preemption order, rejection."""
import pytest

from engine.config import FULL
from engine.sequence import SequenceStatus
from tests.engine.helpers import check_blocks, make_scheduler, make_seq, run_step, run_until_done


def shape(batch):
    """(seq_id, start, num_tokens, samples) per row."""
    return [(s.seq_id, s.start_position, s.num_tokens, s.samples) for s in batch.seqs]


def test_chunked_prefill_splits_prompt_and_samples_on_last_chunk():
    sched = make_scheduler(max_num_batched_tokens=16, max_num_seqs=4)
    seq = make_seq(0, 40, max_tokens=2)
    sched.add(seq)
    shapes = [shape(run_step(sched)[0]) for _ in range(4)]
    assert shapes == [[(0, 0, 16, False)], [(0, 16, 16, False)], [(0, 32, 8, True)], [(0, 40, 1, True)]]
    assert seq.output_token_ids == [7, 7] and seq.finish_reason == "length"
    assert not sched.has_unfinished()


def test_chunks_carry_the_right_token_ids():
    sched = make_scheduler(max_num_batched_tokens=16, max_num_seqs=4)
    seq = make_seq(0, 20, max_tokens=3)
    sched.add(seq)
    first = run_step(sched)[0].seqs[0]
    second = run_step(sched)[0].seqs[0]
    assert first.token_ids == list(range(100, 116)) and second.token_ids == list(range(116, 120))
    assert run_step(sched)[0].seqs[0].token_ids == [7]   # the decode feeds the sampled token back


def test_without_chunked_prefill_a_prompt_waits_for_a_whole_budget():
    sched = make_scheduler(max_num_batched_tokens=64, max_num_seqs=4, enable_chunked_prefill=False)
    sched.add(make_seq(0, 50, max_tokens=5))
    sched.add(make_seq(1, 30, max_tokens=5))
    assert shape(run_step(sched)[0]) == [(0, 0, 50, True)]        # 30 more would exceed 64: seq 1 waits
    assert shape(run_step(sched)[0]) == [(0, 50, 1, True), (1, 0, 30, True)]


def test_decodes_go_before_new_prefills_in_the_same_step():
    sched = make_scheduler(max_num_batched_tokens=8, max_num_seqs=4)
    for i in range(3):
        sched.add(make_seq(i, 2, max_tokens=10))
    run_step(sched)                                   # three 2-token prefills
    sched.add(make_seq(3, 30, max_tokens=10))
    batch, _ = run_step(sched)
    assert shape(batch) == [(0, 2, 1, True), (1, 2, 1, True), (2, 2, 1, True), (3, 0, 5, False)]


def test_budgets_hold_every_step():
    sched = make_scheduler(max_num_batched_tokens=20, max_num_seqs=5, num_full_blocks=40, max_model_len=60)
    for i in range(12):
        sched.add(make_seq(i, 3 + 4 * i % 37, max_tokens=1 + i % 6))
    steps = 0
    while sched.has_unfinished():
        batch, _ = run_step(sched)                    # run_step checks budgets and slots of the batch
        check_blocks(sched)
        assert batch.num_tokens == 20 or sched.num_waiting == 0 or sched.num_running == 5 or batch.preempted
        steps += 1
    assert steps < 100


def test_preemption_takes_the_most_recently_admitted_and_requeues_it_first():
    # 6 blocks of 4: three 7-token prompts use 2 blocks each; at position 8 everyone needs a third block.
    sched = make_scheduler(num_full_blocks=6, max_model_len=24, max_num_seqs=4)
    a, b, c = (make_seq(i, 7, max_tokens=3 if i == 0 else 10) for i in range(3))
    for seq in (a, b, c):
        sched.add(seq)
    run_step(sched)                                   # prefills, token at position 7
    run_step(sched)                                   # decode position 7: still block 1
    batch, _ = run_step(sched)                        # position 8: a and b each take c's freed block
    assert batch.preempted == (c,) and sched.num_preemptions == 1
    assert shape(batch) == [(0, 8, 1, True), (1, 8, 1, True)]
    assert c.status is SequenceStatus.PREEMPTED and c.block_tables == {} and c.num_computed_tokens == 0
    assert c.output_token_ids == [7, 7] and list(sched.waiting) == [c]
    check_blocks(sched)
    assert a.finish_reason == "length"                # a's 3rd token frees its blocks
    batch, _ = run_step(sched)                        # c returns: prompt + both outputs recomputed
    assert shape(batch) == [(1, 9, 1, True), (2, 0, 9, True)]
    assert batch.seqs[1].token_ids == list(range(100, 107)) + [7, 7]
    assert run_until_done(sched) > 0 and c.num_output_tokens == 10
    assert sched.block_manager.num_free_blocks(FULL) == 6


def test_preempted_sequences_requeue_in_admission_order():
    sched = make_scheduler(num_full_blocks=8, max_model_len=32, max_num_seqs=4)
    seqs = [make_seq(i, 8, max_tokens=20) for i in range(4)]     # 2 blocks each: the cache is full
    for seq in seqs:
        sched.add(seq)
    run_step(sched)
    batch, _ = run_step(sched)                        # position 8: seq 0 evicts 3, seq 1 evicts 2
    assert batch.preempted == (seqs[3], seqs[2])
    assert list(sched.waiting) == [seqs[2], seqs[3]]
    assert shape(batch) == [(0, 8, 1, True), (1, 8, 1, True)]


def test_a_sequence_preempts_itself_when_it_is_the_newest():
    # a (7 tokens, 2 blocks) and b (11 tokens, 3 blocks) leave one free block; at positions 8 and 12 both
    # need one: a takes it, and the newest running sequence not yet scheduled is b itself.
    sched = make_scheduler(num_full_blocks=6, max_model_len=24, max_num_seqs=4)
    a, b = make_seq(0, 7, max_tokens=10), make_seq(1, 11, max_tokens=10)
    sched.add(a)
    sched.add(b)
    run_step(sched)
    assert sched.block_manager.num_free_blocks(FULL) == 1
    batch, _ = run_step(sched)                        # positions 7 and 11: no new block
    assert batch.preempted == ()
    batch, _ = run_step(sched)
    assert batch.preempted == (b,) and shape(batch) == [(0, 8, 1, True)]
    assert b.status is SequenceStatus.PREEMPTED and sched.num_running == 1


def test_no_admission_in_a_step_that_preempted():
    # 8 blocks of 4. Step 1: a (8 tokens) + p's first 8-token chunk. Step 2: a's decode takes a block, p's
    # next 15-token chunk needs 4 of the 3 left, so p preempts itself; re-admitting it at once would redo
    # the work it just dropped.
    sched = make_scheduler(num_full_blocks=8, max_model_len=32, max_num_batched_tokens=16, max_num_seqs=4)
    a, p = make_seq(0, 8, max_tokens=10), make_seq(1, 28, max_tokens=2)
    sched.add(a)
    sched.add(p)
    assert shape(run_step(sched)[0]) == [(0, 0, 8, True), (1, 0, 8, False)]
    batch, _ = run_step(sched)
    assert batch.preempted == (p,) and shape(batch) == [(0, 8, 1, True)]
    assert list(sched.waiting) == [p] and sched.block_manager.num_free_blocks(FULL) == 5
    assert shape(run_step(sched)[0]) == [(0, 9, 1, True), (1, 0, 15, False)]


def test_max_num_seqs_caps_admission():
    sched = make_scheduler(max_num_seqs=2, max_num_batched_tokens=32)
    for i in range(3):
        sched.add(make_seq(i, 2, max_tokens=4))
    batch, _ = run_step(sched)
    assert [s.seq_id for s in batch.seqs] == [0, 1] and sched.num_waiting == 1


def test_impossible_prompt_and_configs_are_rejected():
    sched = make_scheduler(max_model_len=64)
    with pytest.raises(ValueError, match="64 prompt tokens but max_model_len is 64"):
        sched.add(make_seq(0, 64))
    with pytest.raises(ValueError, match="stop strings"):
        sched.add(make_seq(1, 4, stop=("x",)))        # no detokenizer
    sched.add(make_seq(2, 4))
    with pytest.raises(ValueError, match="already scheduled"):
        sched.add(make_seq(2, 4))
    with pytest.raises(ValueError, match="KV cache holds 16 tokens"):
        make_scheduler(num_full_blocks=4, max_model_len=64)
    with pytest.raises(ValueError, match="num_sliding_blocks=4 is too small"):
        make_scheduler(num_sliding_blocks=4, sliding_window=8, max_num_batched_tokens=32)
    assert sched.num_waiting == 1


def test_update_checks_the_number_of_sampled_tokens():
    sched = make_scheduler()
    sched.add(make_seq(0, 4))
    batch = sched.schedule()
    with pytest.raises(ValueError, match="expected 1 sampled token ids"):
        sched.update(batch, [])
