"""Fakes for engine tests with no model: sequence/scheduler builders, a random-token "model", invariants."""
from __future__ import annotations

import random
from collections import Counter

from engine.block_manager import BlockManager, slot_mapping
from engine.config import FULL, NULL_BLOCK, CacheConfig, SchedulerConfig
from engine.sampling_params import SamplingParams
from engine.scheduled_batch import ScheduledBatch
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from engine.stop_checker import StopChecker


def make_seq(seq_id: int, prompt: int | list[int], request_id: str | None = None, **params) -> Sequence:
    """A sequence whose prompt is `prompt` ids, or 100, 101, ... when given a length."""
    prompt_ids = list(range(100, 100 + prompt)) if isinstance(prompt, int) else prompt
    return Sequence(seq_id, request_id or f"req-{seq_id}", prompt_ids, SamplingParams(**params))


def make_scheduler(*, block_size: int = 4, num_full_blocks: int = 64, num_sliding_blocks: int = 0,
                   sliding_window: int | None = None, enable_prefix_caching: bool = False,
                   max_num_seqs: int = 8, max_num_batched_tokens: int = 32, enable_chunked_prefill: bool = True,
                   max_model_len: int = 64, eos_token_ids: tuple[int, ...] = (), detokenize=None) -> Scheduler:
    cache = CacheConfig(block_size=block_size, num_full_blocks=num_full_blocks,
                        num_sliding_blocks=num_sliding_blocks, sliding_window=sliding_window,
                        enable_prefix_caching=enable_prefix_caching)
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                             enable_chunked_prefill=enable_chunked_prefill, max_model_len=max_model_len)
    stop = StopChecker(max_model_len, eos_token_ids=eos_token_ids, detokenize=detokenize)
    return Scheduler(config, BlockManager(cache), stop)


class FakeKVCache:
    """Stands in for the KV tensors: each slot holds the identity of the KV written there, i.e. the token
    prefix ending at that position. Reading checks that every key a query needs is exactly what
    recomputing would give, so sharing (prefix hits), recycling and preemption are checked end to end."""

    def __init__(self, block_manager: BlockManager) -> None:
        self.bm = block_manager
        self.slots: dict[str, dict[int, tuple[int, ...]]] = {g: {} for g in block_manager.groups}

    def run(self, batch: ScheduledBatch) -> None:
        bs = self.bm.block_size
        for entry in batch.seqs:                      # every layer writes its chunk's KV before attending
            tokens = entry.seq.all_token_ids
            for group in self.bm.groups:
                slots = slot_mapping(entry.block_tables[group], entry.start_position, entry.num_tokens, bs)
                for p, slot in zip(entry.positions, slots):
                    self.slots[group][slot] = tuple(tokens[:p + 1])
        for entry in batch.seqs:
            tokens = entry.seq.all_token_ids
            for group in self.bm.groups:
                first = 0 if group == FULL else max(0, entry.start_position - self.bm.sliding_window + 1)
                table = entry.block_tables[group]
                for p in range(first, entry.context_len):
                    slot = table[p // bs] * bs + p % bs
                    assert table[p // bs] != NULL_BLOCK, f"{group} key {p} of {entry.seq} was recycled"
                    assert self.slots[group].get(slot) == tuple(tokens[:p + 1]), f"{group} key {p} of {entry.seq}"


def run_step(scheduler: Scheduler, next_token=lambda seq: 7,
             kv: FakeKVCache | None = None) -> tuple[ScheduledBatch, list[Sequence]]:
    """One engine step with a fake model: every sampling row gets next_token(seq). Checks the batch."""
    batch = scheduler.schedule()
    check_batch(scheduler, batch)
    if kv is not None:
        kv.run(batch)
    tokens = [next_token(s.seq) for s in batch.seqs if s.samples]
    return batch, scheduler.update(batch, tokens)


def run_until_done(scheduler: Scheduler, next_token=lambda seq: 7, max_steps: int = 1000) -> int:
    for step in range(max_steps):
        if not scheduler.has_unfinished():
            return step
        run_step(scheduler, next_token)
    raise AssertionError(f"scheduler still busy after {max_steps} steps")


def random_model(rng: random.Random, vocab: int):
    return lambda seq: rng.randrange(vocab)


def check_batch(scheduler: Scheduler, batch: ScheduledBatch) -> None:
    """Per-step contract: budgets, token slices, and no two tokens writing the same KV slot."""
    config, bm = scheduler.config, scheduler.block_manager
    assert batch.num_tokens <= config.max_num_batched_tokens
    assert batch.num_seqs <= config.max_num_seqs and scheduler.num_running <= config.max_num_seqs
    partial = [i for i, entry in enumerate(batch.seqs) if not entry.samples]
    assert partial in ([], [batch.num_seqs - 1]), "decodes and whole chunks first, one cut prefill last"
    for entry in batch.seqs:
        seq = entry.seq
        assert entry.num_tokens >= 1
        assert entry.token_ids == seq.all_token_ids[entry.start_position:entry.context_len]
        assert entry.samples == (entry.context_len == seq.num_tokens)
    for group in bm.groups:
        slots = batch.slot_mapping(group, bm.block_size)
        assert len(slots) == batch.num_tokens and min(slots, default=0) >= 0
        assert len(set(slots)) == len(slots), f"two tokens write the same {group} slot"
        for entry in batch.seqs:  # written blocks belong to this sequence alone
            for p in entry.positions:
                assert bm.ref_count(group, entry.block_tables[group][p // bm.block_size]) == 1


def check_blocks(scheduler: Scheduler) -> None:
    """Reference counts equal the block-table references of live sequences; free counts add up."""
    bm = scheduler.block_manager
    for group in bm.groups:
        refs = Counter(b for seq in scheduler.running for b in seq.block_tables.get(group, []) if b != NULL_BLOCK)
        for block_id in range(bm.num_total_blocks(group)):
            assert bm.ref_count(group, block_id) == refs[block_id], (group, block_id)
        assert bm.num_free_blocks(group) == bm.num_total_blocks(group) - len(refs)
    for seq in scheduler.waiting:
        assert not any(seq.block_tables.values()) and seq.num_computed_tokens == 0
