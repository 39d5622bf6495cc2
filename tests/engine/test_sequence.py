"""Sequence: token views and lifecycle."""
import pytest

from engine.sequence import Sequence, SequenceStatus


def test_token_views():
    seq = Sequence(0, "r", [1, 2, 3])
    assert seq.last_token_id == 3 and seq.num_tokens == 3 and seq.finish_reason is None
    seq.append_token(4)
    seq.append_token(5)
    assert seq.all_token_ids == [1, 2, 3, 4, 5] and seq.num_output_tokens == 2 and seq.last_token_id == 5
    assert [seq.token_ids(a, b) for a, b in [(0, 2), (1, 4), (3, 5), (0, 5)]] == [[1, 2], [2, 3, 4], [4, 5],
                                                                                  [1, 2, 3, 4, 5]]
    with pytest.raises(ValueError, match="empty prompt"):
        Sequence(1, "r", [])


def test_finish_and_recompute():
    seq = Sequence(0, "r", [1, 2, 3])
    seq.num_computed_tokens = 3
    seq.reset_for_recompute()
    assert seq.status is SequenceStatus.PREEMPTED and seq.num_computed_tokens == 0 and seq.num_preemptions == 1
    with pytest.raises(ValueError, match="FINISHED_"):
        seq.finish(SequenceStatus.RUNNING)
    seq.finish(SequenceStatus.FINISHED_STOPPED, stop_reason="\n")
    assert seq.is_finished and seq.finish_reason == "stop" and seq.stop_reason == "\n"
