"""Structured output in the sampler: random logits (any model) still give text that validates and ends before
max_tokens; free text stays free until the budget closes it; states survive preemption (rebuilt by replay); masks
never leave a row without a token; reported logprobs stay raw."""
import json
from pathlib import Path

import jsonschema
import pytest
import torch
from tokenizers import Tokenizer

from engine.grammar_vocabulary import GrammarCompileError, GrammarVocabulary
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.structured_output import (DONE, Constraint, FreeText, Matches, StructuredOutput, Tokens,
                                      min_json_chars)

TOKENIZER = str(Path(__file__).resolve().parents[2] / "deploy" / "demo_model" / "tokenizer.json")
VOCAB = 512
TOK = Tokenizer.from_file(TOKENIZER)
END, OPEN, CLOSE = (TOK.token_to_id(t) for t in ("<|return|>", "<|message|>", "<|end|>"))
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "minLength": 2, "maxLength": 8},
                                      "age": {"type": "integer", "minimum": 18, "maximum": 99},
                                      "score": {"type": "number", "exclusiveMinimum": 0}},
     "required": ["name", "age", "score"], "additionalProperties": False},
    {"type": "array", "items": {"enum": ["red", "green", 3, None]}, "minItems": 2, "maxItems": 5},
    {"$defs": {"node": {"type": "object", "properties": {"v": {"type": "boolean"},
                                                         "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                        "required": ["v", "kids"]}}, "$ref": "#/$defs/node"},
    {"anyOf": [{"type": "string", "format": "date"}, {"type": "object", "properties": {"x": {"type": "null"}}}]},
    {"type": "object", "additionalProperties": {"type": "string"}},
]


def matches_only(constraint: Constraint) -> StructuredOutput:
    return StructuredOutput(TOKENIZER, (Matches(constraint, (END,)),))


def generate(spec: StructuredOutput, max_tokens: int, seed: int, temperature: float = 1.0, scale: float = 3.0,
             copy_history: bool = False, sampler: Sampler | None = None, **kw) -> list[int]:
    """Sample like the engine does, from random logits (a model that could say anything)."""
    sampler = sampler or Sampler(seed=seed)
    params = SamplingParams(max_tokens=max_tokens, structured=spec, temperature=temperature, seed=seed, **kw)
    generator, out = torch.Generator().manual_seed(seed), []
    while len(out) < max_tokens and (not out or out[-1] != END):
        logits = torch.randn(1, VOCAB, generator=generator) * scale
        history = list(out) if copy_history else out
        out.append(sampler(logits, [params], [len(out)], [([1, 2], history)]).token_ids[0])
    return out


@pytest.mark.parametrize("schema", SCHEMAS, ids=["object", "enum-array", "recursive", "anyOf", "map"])
def test_random_models_give_valid_json_that_ends_in_time(schema):
    constraint = Constraint("json_schema", json.dumps(schema))
    for seed in range(6):
        budget = 3 * min_json_chars(schema) + 24 + 4 * seed
        out = generate(matches_only(constraint), budget, seed, scale=(0.5, 3.0, 8.0)[seed % 3])
        assert out[-1] == END, (seed, TOK.decode(out))
        jsonschema.validate(json.loads(TOK.decode(out[:-1])), schema)      # json.loads: strict, no raw controls


def test_no_raw_control_character_even_where_xgrammar_would_allow_one():
    """xgrammar 0.2.9 lets raw tabs and control bytes into strings with minLength/maxLength; JSON forbids them."""
    schema = {"type": "object", "properties": {"s": {"type": "string", "minLength": 3, "maxLength": 9}},
              "required": ["s"]}
    controls = [TOK.encode(c).ids[0] for c in "\t\n\x1a\x01"]
    params = SamplingParams(max_tokens=200, temperature=0.0,
                            structured=matches_only(Constraint("json_schema", json.dumps(schema))))
    sampler, out = Sampler(), []
    while not out or out[-1] != END:
        logits = torch.zeros(1, VOCAB)
        logits[0, controls] = 50.0                                             # a model that loves control bytes
        out.append(sampler(logits, [params], [len(out)], [([1], out)]).token_ids[0])
    jsonschema.validate(json.loads(TOK.decode(out[:-1])), schema)


@pytest.mark.parametrize("constraint, check", [
    (Constraint("regex", r"[a-c]{2,4}-\d+"), lambda t: __import__("re").fullmatch(r"[a-c]{2,4}-\d+", t)),
    (Constraint("choice", json.dumps(["alpha", "beta"])), lambda t: t in ("alpha", "beta")),
    (Constraint("json_object"), lambda t: isinstance(json.loads(t), dict)),
    (Constraint("grammar", 'root ::= "x" ("y" | "z")*'), lambda t: set(t[1:]) <= {"y", "z"} and t[0] == "x"),
])
def test_other_constraints_hold(constraint, check):
    for seed in range(4):
        out = generate(matches_only(constraint), 40, seed)
        assert out[-1] == END and check(TOK.decode(out[:-1])), TOK.decode(out)


def reasoning_then_answer(schema: dict) -> StructuredOutput:
    """<|message|> free text <|end|> <|message|> JSON <|return|> -- a harmony-like turn in miniature."""
    return StructuredOutput(TOKENIZER, (
        Tokens((((OPEN,), 1),)), FreeText(((CLOSE, 2),)), Tokens((((OPEN,), 3),)),
        Matches(Constraint("json_schema", json.dumps(schema)), (END,))))


def test_free_text_is_free_until_the_budget_closes_it():
    schema = SCHEMAS[0]
    long = generate(reasoning_then_answer(schema), 400, seed=1, scale=0.1)     # a flat model rarely ends the text
    free = long[1:long.index(CLOSE)]
    assert len(free) > 100 and len(set(free)) > 50                            # the model chose what it liked
    assert long[-1] == END and len(long) <= 400
    jsonschema.validate(json.loads(TOK.decode(long[long.index(CLOSE) + 2:-1])), schema)
    short = generate(reasoning_then_answer(schema), 60, seed=1, scale=0.1)
    assert short[-1] == END and short.index(CLOSE) < 20     # little room: the text closes as soon as the JSON needs it


def test_states_are_rebuilt_by_replay_with_the_same_tokens():
    spec = reasoning_then_answer(SCHEMAS[1])
    live_sampler, copy_sampler = Sampler(seed=3), Sampler(seed=3)
    live = generate(spec, 120, seed=3, sampler=live_sampler)
    replayed = generate(spec, 120, seed=3, copy_history=True, sampler=copy_sampler)
    assert live == replayed and live[-1] == END
    assert live_sampler.grammars.num_replayed_tokens == 0 < copy_sampler.grammars.num_replayed_tokens


def test_a_row_left_without_tokens_follows_the_structure_and_logprobs_stay_raw():
    spec = matches_only(Constraint("choice", json.dumps(["a"])))
    logits = torch.randn(1, VOCAB)
    a = TOK.token_to_id("a")
    sampler = Sampler(seed=0)
    params = SamplingParams(max_tokens=4, structured=spec, temperature=0.0, logprobs=1, logit_bias={a: -100},
                            min_tokens=4)
    first = sampler(logits, [params], [0], [([1], [])])
    assert first.token_ids == [a]           # the bias made every allowed token -inf: the grammar still decides
    assert first.logprobs[0] == pytest.approx(torch.log_softmax(logits[0], -1)[a].item())
    out = [a]
    assert sampler(logits, [params], [1], [([1], out)]).token_ids == [END]     # min_tokens cannot hold the end off


def test_mixed_batch_leaves_unconstrained_rows_alone():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0))
    spec = matches_only(Constraint("choice", json.dumps(["yes"])))
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, structured=spec),
              SamplingParams(temperature=0.0)]
    out = Sampler()(logits, params, [0, 0, 0], [([1], []), ([1], []), ([1], [])]).token_ids
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax() and TOK.decode([out[1]]) in "yes"


def test_bad_constraints_and_automata_are_refused():
    vocabulary = GrammarVocabulary.get(TOKENIZER, VOCAB)
    with pytest.raises(GrammarCompileError, match="regex"):
        vocabulary.compile(Constraint("regex", "(?<=a)b"))
    with pytest.raises(ValueError, match="not a state"):
        StructuredOutput(TOKENIZER, (FreeText(((CLOSE, 5),)),))
    with pytest.raises(ValueError, match="kind"):
        Constraint("yaml")
    with pytest.raises(ValueError, match="StructuredOutput"):
        SamplingParams(structured="json")
    with pytest.raises(ValueError, match="does not exist"):
        Sampler().prepare(SamplingParams(structured=StructuredOutput("/nowhere/tokenizer.json", (
            FreeText(((CLOSE, DONE),)),))), VOCAB)
