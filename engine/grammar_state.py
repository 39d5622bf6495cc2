"""GrammarState: where one sequence is in its StructuredOutput automaton, which tokens it may take next, and how it
closes in time.

Owns the per-sequence walk (a trie node in a Tokens state, free text, an xgrammar matcher in a Matches state) and
the closing rule: once the tokens left (max_tokens - generated) come within the shortest way to DONE plus a margin,
each step takes the token that ends soonest (the exit of free text, the shortest header, the end token when the
constraint is complete, else `}` `]` `,` `"` `:` `0`, which close JSON, else anything but a blank), so output that
validates ends before max_tokens.
AutomatonPlan holds what every sequence of one StructuredOutput shares (tries, distances, free-text masks).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from engine.grammar_vocabulary import GrammarVocabulary, bitmask_of
from engine.structured_output import DONE, FreeText, Matches, StructuredOutput, Tokens

logger = logging.getLogger(__name__)

CLOSING_MARGIN = 8          # tokens of slack on top of the shortest way to DONE (nesting, a number half written)
CLOSERS = ("}", "]", ",", '"', ":", "0")       # in this order: a number never grows while "," can end it
BROKEN = -2                 # a token the automaton did not allow was accepted: the rest is unconstrained


@dataclass
class _Node:
    """A trie node of a Tokens state: children by token id; `next` is the state a complete sequence enters."""
    children: dict[int, "_Node"] = field(default_factory=dict)
    next: int | None = None
    dist: int = 0
    mask: np.ndarray | None = None


class AutomatonPlan:
    """The shared, read-only part of running one StructuredOutput over one vocabulary."""

    def __init__(self, spec: StructuredOutput, vocab: GrammarVocabulary):
        self.spec, self.vocab = spec, vocab
        self.dist = spec.distances()
        at = lambda n: 0 if n == DONE else self.dist[n]     # noqa: E731
        self.tries: dict[int, _Node] = {}
        self.free_masks: dict[int, np.ndarray] = {}
        for index, state in enumerate(spec.states):
            if isinstance(state, Tokens):
                self.tries[index] = self._trie(state, at)
            elif isinstance(state, FreeText):
                exits = bitmask_of([t for t, _ in state.exits], vocab.vocab_size)
                self.free_masks[index] = vocab.text_mask | exits
            else:
                vocab.prefetch(state.constraint)
        self.closers = [t for t in (vocab.token_id(c) for c in CLOSERS) if t is not None]
        self.quote, self.letter = vocab.token_id('"'), vocab.token_id("a")

    def _trie(self, state: Tokens, at) -> _Node:
        root = _Node()
        for ids, target in state.sequences:
            node = root
            for t in ids:
                if node.next is not None:
                    raise ValueError(f"token sequences {state.sequences} are prefixes of one another")
                node = node.children.setdefault(t, _Node())
            if node.children or node.next is not None:
                raise ValueError(f"token sequences {state.sequences} are prefixes of one another")
            node.next = target
        self._measure(root, at)
        return root

    def _measure(self, node: _Node, at) -> int:
        node.dist = at(node.next) if node.next is not None else min(1 + self._measure(c, at)
                                                                   for c in node.children.values())
        return node.dist

    def node_mask(self, node: _Node, closing: bool) -> np.ndarray:
        if closing:
            best = min(node.children.items(), key=lambda kv: kv[1].dist)[0]
            return bitmask_of([best], self.vocab.vocab_size)
        if node.mask is None:
            node.mask = bitmask_of(node.children, self.vocab.vocab_size)
        return node.mask


def has_bit(mask_row: np.ndarray, token_id: int) -> bool:
    return bool((int(mask_row[token_id >> 5]) >> (token_id & 31)) & 1)


class GrammarState:
    """One sequence's position: `state` is a state index, DONE or BROKEN."""

    def __init__(self, plan: AutomatonPlan):
        self.plan = plan
        self.num_accepted = 0
        self.node: _Node | None = None
        self.matcher = None
        self._enter(plan.spec.start)

    @property
    def constrained(self) -> bool:
        return self.state >= 0

    def _enter(self, index: int) -> None:
        self.state, self.node, self.matcher = index, None, None
        if index < 0:
            return
        state = self.plan.spec.states[index]
        if isinstance(state, Tokens):
            self.node = self.plan.tries[index]
        elif isinstance(state, Matches):
            try:
                self.matcher = self.plan.vocab.matcher(state.constraint, state.end_token_ids)
            except ValueError as e:       # the gateway compiled it first, so this is a bug, not the client's
                logger.error("structured output: %s; the rest is unconstrained", e)
                self.state = BROKEN

    def distance(self) -> int:
        """Fewest tokens from here to DONE (an estimate inside a Matches state: its whole shortest text)."""
        if self.node is not None:
            return self.node.dist
        return self.plan.dist[self.state] if self.state >= 0 else 0

    def fill(self, bitmask: np.ndarray, row: int, tokens_left: int) -> None:
        """Write the allowed next tokens into bitmask[row] (int32 words, host)."""
        if self.state < 0:
            return                                        # unconstrained: the row stays all ones
        closing = tokens_left <= self.distance() + CLOSING_MARGIN
        state = self.plan.spec.states[self.state]
        if isinstance(state, Tokens):
            bitmask[row] = self.plan.node_mask(self.node, closing)
        elif isinstance(state, FreeText):
            if closing:
                best = min(state.exits, key=lambda e: 0 if e[1] == DONE else self.plan.dist[e[1]])[0]
                bitmask[row] = bitmask_of([best], self.plan.vocab.vocab_size)
            else:
                bitmask[row] = self.plan.free_masks[self.state]
        else:
            self.matcher.fill_next_token_bitmask(bitmask, row)
            if state.constraint.kind in ("json_schema", "json_object"):
                # a letter is allowed only inside a string (or inside `false`, where no blank fits either)
                in_string = self.plan.letter is not None and has_bit(bitmask[row], self.plan.letter)
                bitmask[row] &= ~(self.plan.vocab.any_control_mask if in_string else self.plan.vocab.control_mask)
            if closing:
                choice = self._closing_token(bitmask[row], state)
                if choice is not None:
                    bitmask[row] = bitmask_of([choice], self.plan.vocab.vocab_size)
                elif (bitmask[row] & ~self.plan.vocab.blank_mask).any():
                    bitmask[row] &= ~self.plan.vocab.blank_mask       # never spend the last tokens on blanks

    def _closing_token(self, allowed: np.ndarray, state: Matches) -> int | None:
        """The end token when the text is complete; `"` inside a string that may close; else a closing character;
        None leaves the choice to the model among the allowed tokens but blanks (each moves the text forward)."""
        for end in state.end_token_ids:
            if has_bit(allowed, end):
                return end
        quote, letter = self.plan.quote, self.plan.letter
        if quote is not None and letter is not None and has_bit(allowed, quote) and has_bit(allowed, letter):
            return quote
        return next((t for t in self.plan.closers if has_bit(allowed, t)), None)

    def accept(self, token_id: int) -> None:
        self.num_accepted += 1
        if self.state < 0:
            return
        state = self.plan.spec.states[self.state]
        if isinstance(state, Tokens):
            child = self.node.children.get(token_id)
            if child is None:
                return self._break(token_id)
            if child.next is not None:
                self._enter(child.next)
            else:
                self.node = child
        elif isinstance(state, FreeText):
            target = next((n for t, n in state.exits if t == token_id), None)
            if target is not None:
                self._enter(target)
            elif token_id in self.plan.vocab.special_ids:
                self._break(token_id)
        elif not self.matcher.accept_token(token_id):
            self._break(token_id)
        elif self.matcher.is_terminated():
            self._enter(state.next)

    def _break(self, token_id: int) -> None:
        logger.warning("structured output: token %d was not allowed in state %d; the rest is unconstrained",
                       token_id, self.state)
        self.unconstrain()

    def unconstrain(self) -> None:
        self._enter(BROKEN)
