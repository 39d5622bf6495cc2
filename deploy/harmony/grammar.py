"""The harmony grammar bridge: OutputRequirements -> the engine's token automaton for one assistant turn.

After the prompt's `<|start|>assistant` the turn is any number of free `analysis` messages (and commentary
preambles when tools may be called), each `<|end|><|start|>assistant`, then exactly one of: the `final` message
(its content matching the answer's constraint, or free) ending `<|return|>`, or a call
`<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{arguments}<|call|>` (arguments matching that
tool's constraint). Headers are written as parser.py reads them and render.py renders them, by the
tokenizer's own encoding of each header text; special tokens are looked up by name.
"""
from __future__ import annotations

from deploy.openai.structured_outputs import OutputRequirements, check_compiles
from engine.structured_output import DONE, FreeText, Matches, StructuredOutput, Tokens

START, BRANCH, ANALYSIS, NEXT = 0, 1, 2, 3      # fixed states; the final message and the calls follow


def harmony_structure(tokenizer, req: OutputRequirements) -> StructuredOutput | None:
    """The automaton for `req`, or None when the output is not constrained. Compiles each constraint first (a 400
    for one the engine cannot enforce)."""
    if not req.active:
        return None
    check_compiles(tokenizer, ([req.final] if req.final else []) + [c for _, c in req.calls], "response_format"
                   if req.final else "tools")
    special = {name: tokenizer.token_id(name) for name in
               ("<|start|>", "<|channel|>", "<|message|>", "<|constrain|>", "<|end|>", "<|return|>", "<|call|>")}
    text = lambda s: tuple(tokenizer.encode(s))           # noqa: E731  header text, never containing "<|"
    message = special["<|message|>"]
    states: list = [
        Tokens((((special["<|channel|>"],), BRANCH),)),
        None,                                                                 # BRANCH, filled below
        FreeText(((special["<|end|>"], NEXT),)),                              # analysis (and preambles)
        Tokens((((special["<|start|>"], *text("assistant"), special["<|channel|>"]), BRANCH),)),
    ]
    branches = [(text("analysis") + (message,), ANALYSIS)]
    if not req.must_call:
        branches.append((text("final") + (message,), len(states)))
        states.append(Matches(req.final, (special["<|return|>"],)) if req.final
                      else FreeText(((special["<|return|>"], DONE),)))
    if req.calls:
        branches.append((text("commentary") + (message,), ANALYSIS))         # a preamble before the call
    for name, constraint in req.calls:
        header = text(f"commentary to=functions.{name} ") + (special["<|constrain|>"],) + text("json") + (message,)
        branches.append((header, len(states)))
        states.append(Matches(constraint, (special["<|call|>"],)))
    states[BRANCH] = Tokens(tuple(branches))
    return StructuredOutput(str(tokenizer.path), tuple(states), START)
