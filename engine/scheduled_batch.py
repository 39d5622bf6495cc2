"""The per-step contract from the scheduler to the model runner: which tokens of which sequences run.

Plain data and pure-Python helpers, no torch: the model runner builds its tensors (input_ids [T],
positions [T], slot mappings per KV group, block tables, context lengths) from it.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.block_manager import slot_mapping
from engine.sequence import Sequence


@dataclass(frozen=True)
class ScheduledSequence:
    """One sequence's share of a step: positions start_position .. start_position+num_tokens-1.

    block_tables are the sequence's live tables (per KV group, NULL_BLOCK = -1 for recycled sliding
    blocks): read-only for the runner and valid until Scheduler.update() for this step.
    """

    seq: Sequence
    start_position: int          # = num_computed_tokens before this step
    num_tokens: int              # 1 for a decode, the chunk length for a prefill
    token_ids: list[int]         # all_token_ids[start_position : start_position + num_tokens]
    samples: bool                # the chunk reaches the sequence's last token: sample one token from its logits
    block_tables: dict[str, list[int]]

    @property
    def seq_id(self) -> int:
        return self.seq.seq_id

    @property
    def context_len(self) -> int:
        """Keys visible to the chunk's last query (full layers): cached prefix + this chunk."""
        return self.start_position + self.num_tokens

    @property
    def positions(self) -> range:
        return range(self.start_position, self.start_position + self.num_tokens)


@dataclass(frozen=True)
class ScheduledBatch:
    """Everything scheduled in one step, in row order; decodes and prefill chunks mixed.

    Sampling rows are the entries with samples=True, in this order: the runner returns one sampled
    token id per such row and Scheduler.update() takes them in the same order.
    """

    seqs: tuple[ScheduledSequence, ...] = ()
    preempted: tuple[Sequence, ...] = ()  # dropped their KV this step (recompute later), for metrics

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs)

    @property
    def num_seqs(self) -> int:
        return len(self.seqs)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def sampling_seqs(self) -> list[ScheduledSequence]:
        return [s for s in self.seqs if s.samples]

    def input_ids(self) -> list[int]:
        """Token ids of the step, concatenated over rows: [T]."""
        return [t for s in self.seqs for t in s.token_ids]

    def positions(self) -> list[int]:
        """Position of each token of input_ids(): [T]."""
        return [p for s in self.seqs for p in s.positions]

    def slot_mapping(self, group: str, block_size: int) -> list[int]:
        """KV cache slot each token of input_ids() writes in `group`: [T]."""
        return [slot for s in self.seqs
                for slot in slot_mapping(s.block_tables[group], s.start_position, s.num_tokens, block_size)]
