"""Random add/abort/step stress with a fake model: invariants hold each step, every block ends free."""
import random

import pytest

from tests.engine.helpers import FakeKVCache, check_blocks, make_scheduler, make_seq, run_step

NUM_REQUESTS = 300


def stress(rng: random.Random, sched, vocab: int = 6) -> dict[str, int]:
    """Add requests in bursts (some sharing prefixes, some n=2), abort some, step until everything ends.

    A FakeKVCache checks each step that every key read is the KV recomputing would write."""
    prefixes = [[rng.randrange(vocab) for _ in range(rng.randrange(4, 30))] for _ in range(4)]
    added, seq_id, steps, outcomes = 0, 0, 0, {"stop": 0, "length": 0, "abort": 0}
    live: list[str] = []
    kv = FakeKVCache(sched.block_manager)
    while added < NUM_REQUESTS or sched.has_unfinished():
        for _ in range(rng.randrange(4) if added < NUM_REQUESTS else 0):
            prompt = rng.choice(prefixes)[:] if rng.random() < 0.5 else []
            prompt += [rng.randrange(vocab) for _ in range(rng.randrange(1, 25))]
            request_id = f"req-{added}"
            for _ in range(1 if rng.random() < 0.8 else 2):
                sched.add(make_seq(seq_id, prompt, request_id=request_id, max_tokens=rng.randrange(1, 20),
                                   stop_token_ids=(0,) if rng.random() < 0.3 else ()))
                seq_id += 1
            live.append(request_id)
            added += 1
        if live and rng.random() < 0.15:
            for seq in sched.abort(live.pop(rng.randrange(len(live)))):
                outcomes["abort"] += 1
        _, updated = run_step(sched, lambda seq: rng.randrange(vocab), kv)
        for seq in updated:
            if seq.is_finished:
                outcomes[seq.finish_reason] += 1
        check_blocks(sched)
        steps += 1
        assert steps < 20_000, "no progress"
    return outcomes


@pytest.mark.parametrize("sliding", [False, True], ids=["full-only", "sliding"])
@pytest.mark.parametrize("prefix_caching", [False, True], ids=["no-prefix", "prefix"])
@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "whole"])
def test_random_stress_ends_with_every_block_free(sliding, prefix_caching, chunked):
    rng = random.Random(1234)
    num_sliding_blocks = (16 if chunked else 26) if sliding else 0  # one whole 96-token prompt needs 25
    sched = make_scheduler(block_size=4, num_full_blocks=24, num_sliding_blocks=num_sliding_blocks,
                           sliding_window=8 if sliding else None, enable_prefix_caching=prefix_caching,
                           max_num_seqs=6, max_num_batched_tokens=48 if chunked else 96,
                           enable_chunked_prefill=chunked, max_model_len=96)
    outcomes = stress(rng, sched)
    bm = sched.block_manager
    for group in bm.groups:
        assert bm.num_free_blocks(group) == bm.num_total_blocks(group)
    assert bm.usage() == 0.0
    assert sched.num_running == 0 and sched.num_waiting == 0
    # The mix really exercised every path.
    assert min(outcomes.values()) > 10, outcomes
    assert sched.num_preemptions > 0
    if prefix_caching:
        assert bm.prefix_cache.num_hit_tokens > 0
