"""Decides whether a sequence is finished after it sampled a token, and why.

Owns the stop rules (stop ids, stop strings, max_tokens, max_model_len). It works in token ids; text
is only produced through an injected `detokenize`, and only for requests with stop strings.
"""
from __future__ import annotations

from collections.abc import Iterable

from engine.incremental_text import Detokenize, IncrementalText
from engine.sequence import Sequence, SequenceStatus

_STATE_ATTR = "_stop_text"  # the IncrementalText of a sequence, kept on it so aborts need no cleanup here


class StopChecker:
    """Stop rules, checked in vLLM's order: stop token -> stop string -> length.

    - A sampled id in `eos_token_ids` (unless params.ignore_eos) or in params.stop_token_ids finishes
      the sequence as FINISHED_STOPPED. The id stays in output_token_ids (as in vLLM) and is recorded
      in stop_reason, so the detokenizer/harmony parser can drop or keep it.
    - A stop string found in detokenize(output ids) finishes as FINISHED_STOPPED; seq.output_text is the
      text cut before the match (or after it with include_stop_str_in_output), stop_reason the string;
      the earliest match wins, then the smallest string. Token ids are not cut. Until then seq.output_text
      is detokenize(output ids) as of the last check. The text is kept incrementally (IncrementalText: a few
      recent tokens decoded per step) and only its last len(longest stop) - 1 final characters plus what
      changed are searched, so a step costs O(new text + longest stop), not O(output).
    - max_tokens output tokens, or max_model_len tokens in all, finish as FINISHED_LENGTH.
    """

    def __init__(self, max_model_len: int, eos_token_ids: Iterable[int] = (),
                 detokenize: Detokenize | None = None) -> None:
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.detokenize = detokenize

    def validate(self, seq: Sequence) -> None:
        """Reject at admission what the rules cannot serve."""
        if seq.params.stop and self.detokenize is None:
            raise ValueError(f"request {seq.request_id!r} has stop strings {list(seq.params.stop)} but the "
                             "engine has no detokenizer; pass detokenize= to StopChecker or use stop_token_ids")

    def resume(self, seq: Sequence) -> None:
        """A continuation (output tokens already generated elsewhere): bring its stop-string text to where checks
        after each of those tokens would have left it, so a stop string that straddles them and the next token
        is caught, and one that lies wholly within them (passed over before min_tokens) is not matched again."""
        if not seq.params.stop or not seq.output_token_ids:
            return
        assert self.detokenize is not None, "validate() rejects stop strings without a detokenizer"
        state = IncrementalText()
        setattr(seq, _STATE_ATTR, state)
        ids = seq.output_token_ids
        for end in range(1, len(ids) + 1):
            seq.output_text = state.update(ids[:end], self.detokenize)[0]

    def check(self, seq: Sequence) -> bool:
        """Call after seq sampled a token; marks it finished (status, stop_reason) and returns True if so."""
        if self._check(seq):
            if hasattr(seq, _STATE_ATTR):
                delattr(seq, _STATE_ATTR)     # output_text keeps the text; the window state is done
            return True
        return False

    def _check(self, seq: Sequence) -> bool:
        params, token_id = seq.params, seq.last_token_id
        if seq.num_output_tokens < params.min_tokens:    # only the length ends it yet (the sampler masks stop ids);
            if params.stop:                                # stop strings matched before min_tokens are passed over
                self._check_stop_strings(seq, act=False)   # (the search window moves on), never acted on later
        elif ((token_id in self.eos_token_ids and not params.ignore_eos) or token_id in params.stop_token_ids):
            seq.finish(SequenceStatus.FINISHED_STOPPED, stop_reason=token_id)
            return True
        elif params.stop and self._check_stop_strings(seq):
            return True
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish(SequenceStatus.FINISHED_LENGTH)
            return True
        return False

    def _check_stop_strings(self, seq: Sequence, act: bool = True) -> bool:
        assert self.detokenize is not None, "validate() rejects stop strings without a detokenizer"
        state = getattr(seq, _STATE_ATTR, None)
        if state is None:
            state = IncrementalText()
            setattr(seq, _STATE_ATTR, state)
        text, num_final = state.update(seq.output_token_ids, self.detokenize)
        seq.output_text = text
        # Every check searched the whole text it had, so a match now must end after the characters that were
        # already final: it starts at most len(stop) - 1 characters before them.
        longest = max(len(stop) for stop in seq.params.stop)
        start = max(0, num_final - longest + 1)
        # The earliest match wins, whichever stop string it is.
        matches = [(text.find(stop, start), stop) for stop in seq.params.stop]
        matches = [(index, stop) for index, stop in matches if index >= 0]
        if not matches or not act:
            return False
        index, stop = min(matches)
        end = index + len(stop) if seq.params.include_stop_str_in_output else index
        seq.output_text = text[:end]
        seq.finish(SequenceStatus.FINISHED_STOPPED, stop_reason=stop)
        return True
