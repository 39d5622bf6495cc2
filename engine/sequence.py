"""One generated sequence: its token ids, lifecycle status, KV progress and block tables.

Plain state: the scheduler moves it between statuses, the block manager fills its block tables; it
computes nothing and knows no tokenizer.
"""
from __future__ import annotations

import enum
import time
from collections.abc import Iterable

from engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"                     # queued, holds no KV blocks
    RUNNING = "running"                     # admitted: holds blocks, scheduled each step while budget allows
    PREEMPTED = "preempted"                 # its KV was dropped (recompute); waiting again at the queue's front
    FINISHED_STOPPED = "finished_stopped"   # a stop token id or stop string matched
    FINISHED_LENGTH = "finished_length"     # max_tokens or max_model_len reached
    FINISHED_ABORTED = "finished_aborted"   # the client went away or the engine aborted it

    @property
    def is_finished(self) -> bool:
        return self in FINISH_REASONS


# OpenAI finish_reason of each terminal status (vLLM uses the same strings).
FINISH_REASONS: dict[SequenceStatus, str] = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
}


class Sequence:
    """Prompt + generated token ids of one completion, and how much of it has KV in the cache.

    Invariants: 0 <= num_computed_tokens <= num_tokens, and num_computed_tokens < num_tokens while the
    sequence is unfinished (the last token still has to run to produce the next token's logits).
    block_tables[group][i] is the physical block holding positions [i*block_size, (i+1)*block_size) of that
    KV group, or NULL_BLOCK (-1) for a sliding block recycled after leaving the window.
    """

    def __init__(self, seq_id: int, request_id: str, prompt_token_ids: list[int],
                 params: SamplingParams | None = None, arrival_time: float | None = None,
                 output_token_ids: Iterable[int] = ()) -> None:
        """`output_token_ids`: tokens already generated elsewhere (a continuation); their KV is computed with the
        prompt's, like a preempted sequence's."""
        if not prompt_token_ids:
            raise ValueError(f"request {request_id!r} has an empty prompt; at least one token id is needed")
        self.seq_id = seq_id
        self.request_id = request_id
        self.prompt_token_ids: list[int] = list(prompt_token_ids)
        self.output_token_ids: list[int] = list(output_token_ids)
        self.num_resumed_tokens = len(self.output_token_ids)   # of output_token_ids, generated before it came here
        self.params = params if params is not None else SamplingParams()
        self.status = SequenceStatus.WAITING
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.num_computed_tokens = 0      # tokens of all_token_ids whose KV is in the cache
        self.num_cached_tokens = 0        # prompt tokens served by the prefix cache at first admission
        self.num_preemptions = 0
        self.first_scheduled_time: float | None = None   # when it first got KV blocks (queue time ends)
        self.block_tables: dict[str, list[int]] = {}
        self.block_hashes: list[bytes] = []  # content hashes of full blocks, filled by the prefix cache
        self.stop_reason: int | str | None = None  # the stop token id or stop string that matched
        self.output_text: str | None = None  # output text at the last stop-string check; cut when one matched

    # --- token views -------------------------------------------------------------------------------------
    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    def token_ids(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without copying the whole sequence."""
        n = self.num_prompt_tokens
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    # --- lifecycle ---------------------------------------------------------------------------------------
    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        """"stop", "length", "abort", or None while unfinished."""
        return FINISH_REASONS.get(self.status)

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)

    def finish(self, status: SequenceStatus, stop_reason: int | str | None = None) -> None:
        if not status.is_finished:
            raise ValueError(f"finish() needs a FINISHED_* status, got {status}")
        self.status = status
        self.stop_reason = stop_reason

    def reset_for_recompute(self) -> None:
        """Preemption by recompute: forget the KV (the caller freed the blocks); keep every token."""
        assert all(not table for table in self.block_tables.values()), "free the blocks before recompute"
        self.num_computed_tokens = 0
        self.num_preemptions += 1
        self.status = SequenceStatus.PREEMPTED

    def __repr__(self) -> str:
        return (f"Sequence(seq_id={self.seq_id}, request_id={self.request_id!r}, status={self.status.name}, "
                f"tokens={self.num_prompt_tokens}+{self.num_output_tokens}, computed={self.num_computed_tokens})")
