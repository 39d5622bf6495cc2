"""ScheduledBatch: the flat views the model runner builds its tensors from."""
from engine.scheduled_batch import ScheduledBatch, ScheduledSequence
from engine.sequence import Sequence


def test_scheduled_batch_flattens_rows():
    a, b = Sequence(0, "a", [10, 11, 12]), Sequence(1, "b", [20])
    rows = (ScheduledSequence(a, 1, 2, [11, 12], True, {"full": [5]}),
            ScheduledSequence(b, 0, 1, [20], True, {"full": [2]}))
    batch = ScheduledBatch(seqs=rows)
    assert batch.input_ids() == [11, 12, 20] and batch.positions() == [1, 2, 0]
    assert batch.slot_mapping("full", block_size=4) == [21, 22, 8]
    assert batch.num_tokens == 3 and [s.context_len for s in rows] == [3, 1]
