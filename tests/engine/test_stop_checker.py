"""Finish reasons through the scheduler: length, stop ids, eos, stop strings, max_model_len, abort."""
from engine.config import FULL
from engine.sequence import FINISH_REASONS, SequenceStatus
from tests.engine.helpers import make_scheduler, make_seq, run_step, run_until_done


def detokenize(token_ids: list[int]) -> str:
    """Fake tokenizer: id i is the letter chr(ord('a') + i)."""
    return "".join(chr(ord("a") + t) for t in token_ids)


def feed(*token_ids: int):
    """A fake model that emits the given ids in order, then 25 ('z') forever."""
    it = iter(token_ids)
    return lambda seq: next(it, 25)


def test_finish_reason_map_is_explicit():
    assert FINISH_REASONS == {SequenceStatus.FINISHED_STOPPED: "stop", SequenceStatus.FINISHED_LENGTH: "length",
                              SequenceStatus.FINISHED_ABORTED: "abort"}
    assert [s.is_finished for s in SequenceStatus] == [False, False, False, True, True, True]


def test_max_tokens_finishes_with_length():
    sched = make_scheduler()
    seq = make_seq(0, 5, max_tokens=3)
    sched.add(seq)
    run_until_done(sched, feed(1, 2, 3, 4))
    assert seq.output_token_ids == [1, 2, 3] and seq.finish_reason == "length" and seq.stop_reason is None


def test_stop_token_is_kept_and_recorded():
    sched = make_scheduler()
    seq = make_seq(0, 5, max_tokens=10, stop_token_ids=(3,))
    sched.add(seq)
    run_until_done(sched, feed(1, 2, 3, 4))
    assert seq.output_token_ids == [1, 2, 3] and seq.finish_reason == "stop" and seq.stop_reason == 3


def test_stop_token_on_the_last_allowed_token_is_a_stop():
    sched = make_scheduler()
    seq = make_seq(0, 5, max_tokens=2, stop_token_ids=(2,))
    sched.add(seq)
    run_until_done(sched, feed(1, 2))
    assert seq.finish_reason == "stop"


def test_eos_stops_unless_ignored():
    sched = make_scheduler(eos_token_ids=(9,))
    stops, ignores = make_seq(0, 5, max_tokens=5), make_seq(1, 5, max_tokens=5, ignore_eos=True)
    sched.add(stops)
    sched.add(ignores)
    run_until_done(sched, lambda seq: 9)
    assert stops.output_token_ids == [9] and stops.finish_reason == "stop" and stops.stop_reason == 9
    assert ignores.output_token_ids == [9] * 5 and ignores.finish_reason == "length"


def test_stop_string_truncates_text_not_ids():
    sched = make_scheduler(detokenize=detokenize)
    cut = make_seq(0, 5, max_tokens=10, stop=("cd", "zz"))
    kept = make_seq(1, 5, max_tokens=10, stop=("cd",), include_stop_str_in_output=True)
    sched.add(cut)
    run_until_done(sched, feed(0, 1, 2, 3, 4))        # a b c d e
    sched.add(kept)
    run_until_done(sched, feed(0, 1, 2, 3, 4))
    assert cut.output_token_ids == [0, 1, 2, 3] and cut.output_text == "ab"
    assert cut.finish_reason == "stop" and cut.stop_reason == "cd"
    assert kept.output_text == "abcd" and kept.stop_reason == "cd"


def test_stop_string_without_match_keeps_full_text():
    sched = make_scheduler(detokenize=detokenize)
    seq = make_seq(0, 5, max_tokens=3, stop=("q",))
    sched.add(seq)
    run_until_done(sched, feed(0, 1, 2))
    assert seq.output_text == "abc" and seq.finish_reason == "length"


def test_max_model_len_finishes_with_length():
    sched = make_scheduler(max_model_len=12, num_full_blocks=3)
    seq = make_seq(0, 9, max_tokens=100)
    sched.add(seq)
    run_until_done(sched)
    assert seq.num_tokens == 12 and seq.num_output_tokens == 3 and seq.finish_reason == "length"


def test_abort_frees_everything_at_once():
    sched = make_scheduler(max_num_batched_tokens=16, max_num_seqs=4)
    running = [make_seq(0, 20, request_id="r"), make_seq(1, 20, request_id="r")]  # n=2 under one request
    other = make_seq(2, 4, request_id="other", max_tokens=4)
    for seq in running + [other]:
        sched.add(seq)
    run_step(sched)                                   # seq 0 holds blocks mid-prefill, seq 1 waits
    assert sched.block_manager.num_free_blocks(FULL) < 64
    assert sched.abort("r") == running
    assert [s.finish_reason for s in running] == ["abort", "abort"]
    assert all(s.block_tables == {} for s in running)
    assert sched.block_manager.num_free_blocks(FULL) == 64
    assert sched.num_running == 0 and list(sched.waiting) == [other]
    assert sched.abort("r") == [] and sched.abort("unknown") == []
    run_until_done(sched)
    assert other.finish_reason == "length"


def test_abort_between_schedule_and_update_is_skipped():
    sched = make_scheduler()
    a, b = make_seq(0, 4, max_tokens=3), make_seq(1, 4, max_tokens=3)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    sched.abort(a.request_id)
    updated = sched.update(batch, [5, 6])
    assert updated == [b] and b.output_token_ids == [6] and a.output_token_ids == []
    assert a.finish_reason == "abort"
