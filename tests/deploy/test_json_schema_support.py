"""What check_enforceable lets through, xgrammar really enforces (a violating instance is refused, a valid one taken);
what it refuses, it names."""
import json

import pytest

from deploy.openai.errors import BadRequestError
from deploy.openai.json_schema_support import SUPPORTED_FORMATS, UNSUPPORTED_KEYWORDS, check_enforceable
from deploy.model_paths import resolve_model_dir
from engine.grammar_vocabulary import GrammarVocabulary
from engine.structured_output import Constraint

FORMAT_CASES = {"date": ("2024-01-02", "x"), "time": ("03:04:05Z", "x"), "date-time": ("2024-01-02T03:04:05Z", "x"),
                "duration": ("P1D", "x"), "email": ("a@b.co", "x"), "hostname": ("a.b", "a b"),
                "ipv4": ("1.2.3.4", "x"), "ipv6": ("::1", "x"), "uri": ("http://a.b/c", "x y"),
                "uri-reference": ("/a", "a b"), "uuid": ("123e4567-e89b-12d3-a456-426614174000", "x")}
KEYWORD_CASES = [
    ({"type": "string", "minLength": 3, "maxLength": 4}, "abc", "ab"),
    ({"type": "string", "pattern": "^a+$"}, "aa", "b"),
    ({"type": "integer", "minimum": 5, "maximum": 9, "multipleOf": 3}, 6, 7),
    ({"type": "number", "exclusiveMinimum": 5}, 5.5, 5),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2}, [1, 2], [1, 2, 3]),
    ({"type": "array", "prefixItems": [{"type": "string"}], "items": False}, ["a"], ["a", "b"]),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
      "additionalProperties": False}, {"a": 1}, {"b": 1}),
    ({"type": "object", "minProperties": 1, "maxProperties": 1}, {"a": 1}, {}),
    ({"type": "object", "propertyNames": {"pattern": "^x"}}, {"x": 1}, {"y": 1}),
    ({"enum": ["a", 1]}, 1, "b"),
    ({"const": "k"}, "k", "j"),
    ({"anyOf": [{"type": "integer"}, {"type": "boolean"}]}, True, "a"),
    ({"oneOf": [{"type": "integer"}, {"type": "string"}]}, "a", 1.5),
    ({"allOf": [{"type": "integer", "minimum": 5}]}, 7, 3),
    ({"$defs": {"X": {"type": "integer"}}, "$ref": "#/$defs/X"}, 1, "a"),
    ({"type": ["integer", "null"]}, None, "a"),
]


@pytest.fixture(scope="module")
def vocabulary():
    return GrammarVocabulary.get(str(resolve_model_dir("demo") / "tokenizer.json"), 512)


def accepts(vocabulary, schema, value) -> bool:
    matcher = vocabulary.matcher(Constraint("json_schema", json.dumps(schema)), ())
    return matcher.accept_string(json.dumps(value, separators=(",", ":"))) and matcher.is_completed()


@pytest.mark.parametrize("schema, good, bad", KEYWORD_CASES + [
    ({"type": "string", "format": f}, good, bad) for f, (good, bad) in FORMAT_CASES.items()])
def test_what_is_allowed_is_enforced(vocabulary, schema, good, bad):
    check_enforceable(schema, "s")
    assert accepts(vocabulary, schema, good) and not accepts(vocabulary, schema, bad)


def test_every_supported_format_is_exercised():
    assert set(FORMAT_CASES) == set(SUPPORTED_FORMATS)


@pytest.mark.parametrize("keyword", UNSUPPORTED_KEYWORDS)
def test_unenforced_keywords_are_named(keyword):
    with pytest.raises(BadRequestError) as info:
        check_enforceable({"type": "object", "properties": {"p": {keyword: {}}}}, "schema")
    assert info.value.param == f"schema.properties.p.{keyword}" and keyword in info.value.message


@pytest.mark.parametrize("schema, where", [
    ({"type": "array", "uniqueItems": True}, "schema.uniqueItems"),
    ({"type": "number", "multipleOf": 0.5}, "schema.multipleOf"),
    ({"allOf": [{"type": "integer"}, {"minimum": 1}]}, "schema.allOf"),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "schema.oneOf"),
    ({"$ref": "https://example.com/s.json"}, "schema.$ref"),
    ({"type": "string", "format": "color"}, "schema.format"),
    ({"anyOf": [{"type": "wat"}]}, "schema.anyOf[0].type"),
])
def test_unenforceable_parts_are_named(schema, where):
    with pytest.raises(BadRequestError) as info:
        check_enforceable(schema, "schema")
    assert info.value.param == where


def test_discriminated_unions_pass():
    schema = {"$defs": {"A": {"type": "object", "properties": {"kind": {"const": "a"}}, "required": ["kind"]},
                        "B": {"type": "object", "properties": {"kind": {"const": "b"}}, "required": ["kind"]}},
              "oneOf": [{"$ref": "#/$defs/A"}, {"$ref": "#/$defs/B"}]}
    check_enforceable(schema, "s")
