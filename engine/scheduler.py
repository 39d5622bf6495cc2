"""Continuous batching: which tokens of which sequences run each step, and what the results change.

Owns the waiting queue and the running list; never runs the model (the model runner does) and never
samples (the Sampler does). Preemption is by recompute: a victim's KV is dropped and recomputed later.
"""
from __future__ import annotations

import logging
import time
from collections import deque

from engine.block_manager import BlockManager
from engine.config import SLIDING, SchedulerConfig, max_blocks_spanned
from engine.scheduled_batch import ScheduledBatch, ScheduledSequence
from engine.sequence import Sequence, SequenceStatus
from engine.stop_checker import StopChecker

logger = logging.getLogger(__name__)


class Scheduler:
    """vLLM-v1 style policy: one token budget per step (max_num_batched_tokens) shared by

    1. running sequences in admission order, i.e. decodes, then the one unfinished prefill (each gets
       min(remaining, budget) tokens; a whole prompt when chunked prefill is off); when blocks run out,
       the most recently admitted running sequence not yet scheduled this step is preempted (possibly
       the one asking) and we retry;
    2. waiting sequences in FCFS order (preempted ones first), while there are seats (max_num_seqs), budget
       and blocks; none are admitted in a step that preempted, to avoid thrashing. A prompt chunk is cut to
       the remaining budget with chunked prefill; otherwise a prompt that does not fit waits.
    A sequence samples only when its chunk reaches its last token.
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 stop_checker: StopChecker | None = None) -> None:
        self.config = config
        self.block_manager = block_manager
        self.stop_checker = stop_checker or StopChecker(config.max_model_len)
        if self.stop_checker.max_model_len != config.max_model_len:
            raise ValueError(f"StopChecker max_model_len ({self.stop_checker.max_model_len}) differs from "
                             f"SchedulerConfig max_model_len ({config.max_model_len}); build both from one value")
        self._check_cache_capacity()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last one is preempted first
        self._by_request: dict[str, list[Sequence]] = {}
        self._seq_ids: set[int] = set()
        self.num_preemptions = 0  # total since start (preemption metric)

    def _check_cache_capacity(self) -> None:
        """A sequence alone must always fit, otherwise it would preempt itself forever."""
        cache, bs = self.block_manager.config, self.block_manager.block_size
        if cache.num_full_blocks * bs < self.config.max_model_len:
            raise ValueError(
                f"the KV cache holds {cache.num_full_blocks * bs} tokens ({cache.num_full_blocks} blocks of {bs}) "
                f"but max_model_len is {self.config.max_model_len}; lower max_model_len or give the cache "
                "more memory")
        if SLIDING in cache.groups:
            assert cache.sliding_window is not None
            span = min(cache.sliding_window - 1 + self.config.max_chunk_tokens, self.config.max_model_len)
            need = max_blocks_spanned(span, bs)
            if cache.num_sliding_blocks < need:
                raise ValueError(
                    f"num_sliding_blocks={cache.num_sliding_blocks} is too small: one chunk of "
                    f"{self.config.max_chunk_tokens} tokens plus the {cache.sliding_window - 1} keys before it "
                    f"can span {need} blocks; raise num_sliding_blocks or lower max_num_batched_tokens")

    # --- requests ------------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; raises ValueError for one that could never be served."""
        if seq.status is not SequenceStatus.WAITING or seq.num_computed_tokens:
            raise ValueError(f"only fresh WAITING sequences can be added, got {seq}")
        if seq.seq_id in self._seq_ids:
            raise ValueError(f"seq_id {seq.seq_id} is already scheduled; sequence ids must be unique")
        if seq.num_tokens >= self.config.max_model_len:
            resumed = f" (with {seq.num_output_tokens} resumed output tokens)" if seq.num_output_tokens else ""
            raise ValueError(
                f"request {seq.request_id!r} has {seq.num_tokens} prompt tokens{resumed} but max_model_len is "
                f"{self.config.max_model_len}: the prompt must leave room for at least one generated token")
        self.stop_checker.validate(seq)
        self.stop_checker.resume(seq)
        self.waiting.append(seq)
        self._by_request.setdefault(seq.request_id, []).append(seq)
        self._seq_ids.add(seq.seq_id)

    def abort(self, request_id: str) -> list[Sequence]:
        """Finish every unfinished sequence of the request as aborted and free all its blocks now."""
        aborted = [s for s in self._by_request.get(request_id, []) if not s.is_finished]
        was_waiting = any(s.status is not SequenceStatus.RUNNING for s in aborted)
        for seq in aborted:
            self.block_manager.free(seq)
            seq.finish(SequenceStatus.FINISHED_ABORTED)
        if was_waiting:
            self.waiting = deque(s for s in self.waiting if not s.is_finished)
        self._forget(aborted)
        return aborted

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # --- one step ------------------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        """Pick this step's tokens and give them KV blocks; an empty batch means nothing can run."""
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        scheduled_ids: set[int] = set()
        preempted: list[Sequence] = []
        # Admission order already puts decodes first: a prompt chunk is cut only when the budget runs out,
        # which ends admission, so only the most recently admitted sequence can be mid-prefill.
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            num_new = min(seq.num_uncomputed_tokens, budget)
            if num_new < seq.num_uncomputed_tokens and not self.config.enable_chunked_prefill:
                continue
            if not self._reserve(seq, num_new, scheduled_ids, preempted):
                continue
            scheduled.append(self._entry(seq, num_new))
            scheduled_ids.add(seq.seq_id)
            budget -= num_new
        if not preempted:
            self._admit_waiting(budget, scheduled)
        return ScheduledBatch(seqs=tuple(scheduled), preempted=tuple(preempted))

    def _reserve(self, seq: Sequence, num_new: int, scheduled_ids: set[int], preempted: list[Sequence]) -> bool:
        """Allocate blocks for a running sequence, preempting newest-first; False if it preempted itself."""
        while not self.block_manager.can_allocate(seq, num_new):
            victim = next(s for s in reversed(self.running) if s.seq_id not in scheduled_ids)
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        self.block_manager.allocate(seq, num_new)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.reset_for_recompute()
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        logger.debug("preempted %s (recompute): out of KV blocks", seq)

    def _admit_waiting(self, budget: int, scheduled: list[ScheduledSequence]) -> None:
        chunked = self.config.enable_chunked_prefill
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            prefix = self.block_manager.find_cached_prefix(seq)
            num_new = seq.num_tokens - prefix.num_tokens
            if num_new > budget:
                if not chunked:
                    break
                num_new = budget
            if not self.block_manager.can_allocate(seq, num_new, prefix):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq, num_new, prefix)
            if seq.num_preemptions == 0:         # resumed output tokens found in the cache are not prompt tokens
                seq.num_cached_tokens = min(prefix.num_tokens, seq.num_prompt_tokens)
                seq.first_scheduled_time = time.monotonic()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(self._entry(seq, num_new))
            budget -= num_new

    @staticmethod
    def _entry(seq: Sequence, num_new: int) -> ScheduledSequence:
        start = seq.num_computed_tokens
        return ScheduledSequence(seq=seq, start_position=start, num_tokens=num_new,
                                 token_ids=seq.token_ids(start, start + num_new),
                                 samples=start + num_new == seq.num_tokens, block_tables=seq.block_tables)

    def update(self, batch: ScheduledBatch, sampled_token_ids: list[int]) -> list[Sequence]:
        """Apply a step's results: one sampled id per sampling row of `batch`, in row order.

        Advances KV progress, appends tokens, runs stop checks and frees finished sequences. Returns the
        sequences that got a token this step (check seq.is_finished / seq.finish_reason on each).
        Sequences aborted between schedule() and update() are skipped.
        """
        num_sampling = sum(1 for s in batch.seqs if s.samples)
        if len(sampled_token_ids) != num_sampling:
            raise ValueError(f"expected {num_sampling} sampled token ids (one per sampling row), "
                             f"got {len(sampled_token_ids)}")
        tokens = iter(sampled_token_ids)
        updated: list[Sequence] = []
        for entry in batch.seqs:
            token_id = next(tokens) if entry.samples else None
            seq = entry.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue
            assert seq.num_computed_tokens == entry.start_position, f"{seq} changed between schedule and update"
            seq.num_computed_tokens += entry.num_tokens
            self.block_manager.commit_computed(seq)
            if token_id is None:
                continue
            seq.append_token(int(token_id))
            updated.append(seq)
            if self.stop_checker.check(seq):
                self.block_manager.free(seq)
        self._forget([seq for seq in updated if seq.is_finished])
        return updated

    def _forget(self, finished: list[Sequence]) -> None:
        """Drop finished sequences from the running list, and requests whose sequences all finished."""
        if not finished:
            return
        self.running = [s for s in self.running if not s.is_finished]
        for request_id in {s.request_id for s in finished}:
            seqs = self._by_request.get(request_id, [])
            if all(s.is_finished for s in seqs):
                del self._by_request[request_id]
                self._seq_ids.difference_update(s.seq_id for s in seqs)
