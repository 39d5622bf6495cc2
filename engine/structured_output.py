"""StructuredOutput: what a request's generated tokens must spell, as a small automaton over token ids.

Each state is one of: `Tokens` (one of a few fixed id sequences, e.g. a harmony header), `FreeText` (any ordinary
token until an exit token), `Matches` (text matching a Constraint -- JSON schema, JSON object, regex, choice or
EBNF grammar, compiled by xgrammar over the tokenizer's vocabulary -- then an end token). Built by deploy/, which
knows harmony; run by the sampler on every rank (engine/grammar_state.py). Plain frozen data: pickled to EP ranks,
hashable so that compiled grammars and automata are shared between requests.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

CONSTRAINT_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
DONE = -1            # the state after the last end token: nothing more is constrained
UNKNOWN_LENGTH = 16  # characters assumed for the shortest text of a regex or grammar (closing reserve only)


@dataclass(frozen=True)
class Constraint:
    """kind: one of CONSTRAINT_KINDS. source: the schema as JSON text, the regex, a JSON list of choices or the
    EBNF grammar (empty for json_object). any_whitespace: JSON may have whitespace between its tokens (bounded)."""

    kind: str
    source: str = ""
    any_whitespace: bool = True

    def __post_init__(self) -> None:
        if self.kind not in CONSTRAINT_KINDS:
            raise ValueError(f"constraint kind must be one of {CONSTRAINT_KINDS}, got {self.kind!r}")

    def min_chars(self) -> int:
        """Characters of the shortest text it accepts, or an estimate; sizes the reserve for closing in time."""
        if self.kind == "json_object":
            return 2
        if self.kind == "choice":
            return min((len(c) for c in json.loads(self.source)), default=0)
        if self.kind == "json_schema":
            return min_json_chars(json.loads(self.source))
        return UNKNOWN_LENGTH


@dataclass(frozen=True)
class Tokens:
    """One of `sequences` (token ids, next state) is generated exactly."""

    sequences: tuple[tuple[tuple[int, ...], int], ...]


@dataclass(frozen=True)
class FreeText:
    """Any token that is not a special token of the tokenizer, until one of `exits` (token id, next state)."""

    exits: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Matches:
    """Text matching `constraint`, then one of `end_token_ids`, then state `next`."""

    constraint: Constraint
    end_token_ids: tuple[int, ...]
    next: int = DONE


State = Tokens | FreeText | Matches


@dataclass(frozen=True)
class StructuredOutput:
    """tokenizer: path of the tokenizer.json whose vocabulary grammars are compiled over (the model directory's,
    the same path on every node, like the weights). states[start] is where generation begins."""

    tokenizer: str
    states: tuple[State, ...]
    start: int = 0

    def __post_init__(self) -> None:
        if not self.states or not 0 <= self.start < len(self.states):
            raise ValueError("a structured output needs at least one state and a start state among them")
        for state in self.states:
            for target in self.targets(state):
                if target != DONE and not 0 <= target < len(self.states):
                    raise ValueError(f"state {state} leads to {target}, which is not a state")
            if isinstance(state, Tokens) and (not state.sequences or any(not ids for ids, _ in state.sequences)):
                raise ValueError("Tokens states need non-empty token sequences")

    @staticmethod
    def targets(state: State) -> list[int]:
        if isinstance(state, Tokens):
            return [n for _, n in state.sequences]
        if isinstance(state, FreeText):
            return [n for _, n in state.exits]
        return [state.next]

    def distances(self, matches_tokens: Callable[[Matches], int] = lambda m: m.constraint.min_chars()) -> list[int]:
        """Per state, the fewest tokens from entering it to DONE (Matches costing `matches_tokens` plus its end
        token). A state that cannot reach DONE gets a large number."""
        far = 1 << 30
        dist = [far] * len(self.states)
        at = lambda n: 0 if n == DONE else dist[n]    # noqa: E731
        for _ in range(len(self.states) + 1):        # Bellman-Ford over a handful of states
            for i, state in enumerate(self.states):
                if isinstance(state, Tokens):
                    best = min(len(ids) + at(n) for ids, n in state.sequences)
                elif isinstance(state, FreeText):
                    best = min((1 + at(n) for _, n in state.exits), default=far)
                else:
                    best = matches_tokens(state) + 1 + at(state.next)
                dist[i] = min(dist[i], best, far)
        return dist


def min_json_chars(schema, depth: int = 0, defs: dict | None = None) -> int:
    """Length of the shortest JSON text valid under `schema` (compact, required properties only); an estimate where
    the schema is too intricate to tell (patterns, formats, deep references)."""
    if not isinstance(schema, dict) or depth > 16:
        return 1 if schema is True or schema == {} else UNKNOWN_LENGTH
    defs = schema.get("$defs", schema.get("definitions", defs or {})) if depth == 0 else defs or {}
    if "$ref" in schema:
        name = str(schema["$ref"]).rsplit("/", 1)[-1]
        return min_json_chars(defs.get(name, {}), depth + 1, defs) if name in defs else UNKNOWN_LENGTH
    if "const" in schema:
        return len(json.dumps(schema["const"], separators=(",", ":")))
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return min(len(json.dumps(v, separators=(",", ":"))) for v in schema["enum"])
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return min(min_json_chars(s, depth + 1, defs) for s in schema[key])
    if isinstance(schema.get("allOf"), list) and schema["allOf"]:
        return max(min_json_chars(s, depth + 1, defs) for s in schema["allOf"])
    kind = schema.get("type")
    kind = kind[0] if isinstance(kind, list) and kind else kind
    if kind == "string":
        return 2 + int(schema.get("minLength", 0)) + (UNKNOWN_LENGTH if "pattern" in schema or "format" in schema
                                                      else 0)
    if kind in ("integer", "number"):
        return max(1, len(str(schema.get("minimum", ""))))
    if kind == "boolean":
        return 4
    if kind == "null":
        return 4
    if kind == "array":
        items = schema.get("items") if isinstance(schema.get("items"), dict) else {}
        prefix = schema.get("prefixItems") or []
        n = max(int(schema.get("minItems", 0)), 0)
        sizes = [min_json_chars(s, depth + 1, defs) for s in prefix[:n]]
        sizes += [min_json_chars(items, depth + 1, defs)] * max(0, n - len(prefix))
        return 2 + sum(sizes) + max(0, len(sizes) - 1)
    if kind == "object" or "properties" in schema:
        props = schema.get("properties") or {}
        required = [k for k in schema.get("required") or () if k in props]
        sizes = [len(json.dumps(k)) + 1 + min_json_chars(props[k], depth + 1, defs) for k in required]
        return 2 + sum(sizes) + max(0, len(sizes) - 1)
    return 1
