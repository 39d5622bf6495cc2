"""IncrementalText: a sequence's output text kept up to date by decoding only its most recent tokens.

Knows token ids and an injected `detokenize`, nothing of stop rules (engine/stop_checker.py uses it).
"""
from __future__ import annotations

from collections.abc import Callable

Detokenize = Callable[[list[int]], str]

REPLACEMENT_CHAR = "\ufffd"  # what a byte-level detokenizer shows for a UTF-8 character not yet complete
# After a fallback full decode, the window restarts this many tokens back, so a decoder that treats a window's
# first token specially (sentencepiece's leading space) gets the same context as in the full decode.
PREFIX_WINDOW_TOKENS = 5


class IncrementalText:
    """detokenize(output ids) kept up to date by decoding only a window of recent tokens (vLLM's offsets).

    `text` is the final text of ids[:read_offset]. Each update decodes the window ids[prefix_offset:] and drops
    its first len(prefix_text) characters, the text of ids[prefix_offset:read_offset] decoded alone, which
    leaves the text of the new tokens. If that ends in U+FFFD (a UTF-8 character split across tokens, or any
    text a later token may still change) or is empty, it is held as `pending` and the offsets stay, so the
    next update decodes it again; otherwise it joins `text` and the window moves to start at the old read
    offset. `text + pending` then equals detokenize(ids) for a detokenizer whose text of ids[:j] is final
    wherever it does not end in U+FFFD (byte-level BPE decoding bytes with errors="replace", per-token
    concatenation, sentencepiece through the prefix window). A window whose text does not start with
    prefix_text breaks that contract: that update decodes everything, as the checker always did, and the
    window restarts at the end. A stream that keeps ending in U+FFFD keeps the window growing: O(window) per
    step then, as before, never a wrong text.
    """

    __slots__ = ("prefix_offset", "read_offset", "prefix_text", "text", "pending")

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.prefix_offset = 0
        self.read_offset = 0
        self.prefix_text = ""     # detokenize(ids[prefix_offset:read_offset])
        self.text = ""            # detokenize(ids[:read_offset]), final
        self.pending = ""         # the text ids[read_offset:] add, not final yet

    def update(self, ids: list[int], detokenize: Detokenize) -> tuple[str, int]:
        """Catch up with `ids`, which extend the ids of the last update; returns (detokenize(ids), n): the
        first n characters were already final in the last update's text, so anything new ends after them."""
        if len(ids) < self.read_offset:           # not an extension (never happens in the engine): start over
            self._reset()
        num_final = len(self.text)
        window = detokenize(ids[self.prefix_offset:])
        if not window.startswith(self.prefix_text):
            return self._restart(ids, detokenize), 0
        new = window[len(self.prefix_text):]
        if not new or new.endswith(REPLACEMENT_CHAR):
            self.pending = new
            return self.text + new, num_final
        self.text += new
        self.pending = ""
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        self.prefix_text = detokenize(ids[self.prefix_offset:self.read_offset])
        return self.text, num_final

    def _restart(self, ids: list[int], detokenize: Detokenize) -> str:
        full = detokenize(ids)
        self._reset()
        if full and not full.endswith(REPLACEMENT_CHAR):
            self.text = full
            self.prefix_offset, self.read_offset = max(0, len(ids) - PREFIX_WINDOW_TOKENS), len(ids)
            self.prefix_text = detokenize(ids[self.prefix_offset:])
        else:
            self.pending = full
        return full
