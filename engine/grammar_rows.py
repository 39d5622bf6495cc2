"""GrammarRows: the sampler's structured-output side: each constrained row's GrammarState, the batch's token bitmask
built on the host and applied on the logits' device in one copy, and the states advanced by the sampled tokens.

A state is found by the identity of the sequence's output id list (the engine passes the live list, which it only
appends to) and its length; anything else -- a preempted sequence that was dropped, a resumed one, a copy -- is
rebuilt by replaying its output ids, so the result never depends on this cache, only the speed does. States unused
for EVICT_AFTER_CALLS calls are dropped (finished and aborted sequences).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import numpy as np
import torch

from engine.grammar_state import AutomatonPlan, GrammarState
from engine.grammar_vocabulary import GrammarVocabulary, num_words
from engine.sampling_params import SamplingParams
from engine.structured_output import StructuredOutput

logger = logging.getLogger(__name__)
EVICT_AFTER_CALLS = 256
_SHIFTS = torch.arange(32, dtype=torch.int32)


@dataclass
class _Entry:
    state: GrammarState
    output_ids: list[int]        # held so that its id() cannot be reused while the entry lives
    last_used: int


class GrammarRows:
    def __init__(self) -> None:
        self._entries: dict[int, _Entry] = {}
        self._plans: dict[tuple[StructuredOutput, int], AutomatonPlan] = {}
        self._calls = 0
        self.num_replayed_tokens = 0          # tokens replayed to rebuild states (0 on the engine's normal path)

    def prepare(self, structured: StructuredOutput, vocab_size: int) -> None:
        """Load the vocabulary and start compiling the request's grammars in the background; raises ValueError
        for a structured output this process cannot serve (no tokenizer file)."""
        self._plan(structured, vocab_size)

    def _plan(self, spec: StructuredOutput, vocab_size: int) -> AutomatonPlan:
        key = (spec, vocab_size)
        if key not in self._plans:
            if len(self._plans) >= 64:
                self._plans.pop(next(iter(self._plans)))
            self._plans[key] = AutomatonPlan(spec, GrammarVocabulary.get(spec.tokenizer, vocab_size))
        return self._plans[key]

    def mask(self, logits: torch.Tensor, raw: torch.Tensor, params: Seq[SamplingParams], num_outputs: list[int],
             histories: Seq[tuple[Seq[int], Seq[int]]] | None) -> tuple[torch.Tensor, list[tuple[int, GrammarState]]]:
        """logits [B, V] (shaped) -> a copy with disallowed tokens at -inf on constrained rows. A row whose other
        controls (min_tokens, logit_bias) leave no allowed token falls back to the grammar's mask on `raw`.
        Returns the masked logits and the (row, state) pairs to advance once tokens are sampled."""
        if histories is None:
            raise ValueError("structured output needs each row's (prompt ids, output ids)")
        self._calls += 1
        vocab_size = logits.shape[-1]
        rows = [(i, self._state(p.structured, histories[i][1], vocab_size))
                for i, p in enumerate(params) if p.structured is not None]
        bitmask = np.full((len(rows), num_words(vocab_size)), -1, dtype=np.int32)          # host, numpy
        for r, (i, state) in enumerate(rows):
            try:
                state.fill(bitmask, r, params[i].max_tokens - num_outputs[i])
            except Exception:                # never fail the engine's step for one row: that row goes free
                logger.exception("structured output: computing the token mask failed")
                state.unconstrain()
                bitmask[r] = -1
        if self._calls % 64 == 0:
            self._evict()
        device = logits.device
        bits = torch.from_numpy(bitmask)
        bits = bits.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else bits
        allowed = ((bits[:, :, None] >> _SHIFTS.to(device)) & 1).bool().flatten(1)[:, :vocab_size]   # [R, V]
        index = torch.tensor([i for i, _ in rows], dtype=torch.long).to(device, non_blocking=True)    # [R]
        masked = logits[index].masked_fill(~allowed, float("-inf"))                                   # [R, V]
        fallback = raw[index].masked_fill(~allowed, float("-inf"))
        masked = torch.where(masked.isfinite().any(-1, keepdim=True), masked, fallback)
        out = logits.clone()
        out[index] = masked
        return out, rows

    @staticmethod
    def advance(rows: list[tuple[int, GrammarState]], token_ids: list[int]) -> None:
        for i, state in rows:
            try:
                state.accept(token_ids[i])
            except Exception:
                logger.exception("structured output: advancing the grammar failed")
                state.unconstrain()

    def _state(self, spec: StructuredOutput, output_ids: Seq[int], vocab_size: int) -> GrammarState:
        entry = self._entries.get(id(output_ids))
        plan = self._plan(spec, vocab_size)
        if (entry is None or entry.output_ids is not output_ids or entry.state.plan is not plan
                or entry.state.num_accepted != len(output_ids)):
            state = GrammarState(plan)
            for t in output_ids:
                state.accept(t)
            self.num_replayed_tokens += len(output_ids)
            entry = self._entries[id(output_ids)] = _Entry(state, output_ids, self._calls)
        entry.last_used = self._calls
        return entry.state

    def _evict(self) -> None:
        stale = [k for k, e in self._entries.items() if self._calls - e.last_used > EVICT_AFTER_CALLS]
        for k in stale:
            del self._entries[k]
