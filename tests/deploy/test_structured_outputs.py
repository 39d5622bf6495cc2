"""Structured outputs and forced tools through the gateway on a tiny RANDOM checkpoint (LocalBackend, no Ray): whatever
such a model would say, the answer or the call's arguments validate against the schema, reasoning stays free, and
what the engine cannot enforce is a 400 naming it."""
import json

import jsonschema
import pytest
from fastapi.testclient import TestClient

from deploy.backend import LocalBackend
from deploy.harmony.render import RenderOptions, render_chat
from deploy.openai.structured_outputs import ResponseFormatSection
from deploy.tokenizer import model_stop_ids
from tests.deploy.gateway_fixtures import (USER, make_app, make_ctx, make_engine, sse_json, tiny_dir,  # noqa: F401
                                           tiny_model, tok)

MAX_MODEL_LEN = 1024

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}}},
          "required": ["name", "age", "tags"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "integer"}}, "required": ["zone"]}}}


@pytest.fixture(scope="module")
def local(tiny_dir, tiny_model, tok):
    stop_ids = model_stop_ids(tiny_dir, tok)
    engine = make_engine(tiny_model, tok, stop_ids, max_model_len=MAX_MODEL_LEN)
    with TestClient(make_app(make_ctx(LocalBackend(engine), tok, stop_ids, max_model_len=MAX_MODEL_LEN))) as client:
        yield client, engine, None


def chat(client, **body):
    response = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 120, **body})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


@pytest.mark.parametrize("seed", range(4))
def test_json_schema_answer_validates_whatever_the_random_model_says(local, seed):
    client, _, _ = local
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    choice = chat(client, response_format=fmt, temperature=1.0, seed=seed)
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)


def test_json_object_answer_is_an_object(local):
    client, _, _ = local
    choice = chat(client, response_format={"type": "json_object"}, temperature=1.0, seed=3)
    assert choice["finish_reason"] == "stop" and isinstance(json.loads(choice["message"]["content"]), dict)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_calls_validate_against_strict_schemas(local, tool_choice):
    client, _, _ = local
    for seed in range(3):
        choice = chat(client, tools=[WEATHER, TIME], tool_choice=tool_choice, temperature=1.0, seed=seed)
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        (call,) = choice["message"]["tool_calls"]
        tool = {"get_weather": WEATHER, "get_time": TIME}[call["function"]["name"]]
        jsonschema.validate(json.loads(call["function"]["arguments"]), tool["function"]["parameters"])
        if isinstance(tool_choice, dict):
            assert call["function"]["name"] == "get_weather"


def test_tool_choice_none_never_calls_a_tool(local):
    client, _, _ = local
    for seed in range(3):
        choice = chat(client, tools=[WEATHER], tool_choice="none", temperature=1.0, seed=seed)
        assert not choice["message"]["tool_calls"]


def test_streamed_structured_answer_equals_the_plain_one(local):
    client, _, _ = local
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    plain = chat(client, response_format=fmt, temperature=0)
    body = {"messages": USER, "max_tokens": 120, "response_format": fmt, "temperature": 0, "stream": True}
    chunks = sse_json(client.post("/v1/chat/completions", json=body).text)
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert content == plain["message"]["content"]
    jsonschema.validate(json.loads(content), PERSON)


def test_vllm_guided_extras_constrain_the_answer(local):
    client, _, _ = local
    assert chat(client, guided_choice=["yes", "no"], temperature=1.0, seed=1)["message"]["content"] in ("yes", "no")
    choice = chat(client, structured_outputs={"regex": "[0-9]{3}"}, temperature=1.0, seed=2)
    assert len(choice["message"]["content"]) == 3 and choice["message"]["content"].isdigit()
    guided = chat(client, guided_json=PERSON, temperature=1.0, seed=3)["message"]["content"]
    jsonschema.validate(json.loads(guided), PERSON)


def test_completions_constrain_the_raw_text(local):
    client, _, _ = local
    body = {"prompt": "Name:", "max_tokens": 60, "temperature": 1.0, "seed": 4,
            "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["text"]), PERSON)


def test_responses_text_format_and_forced_function(local):
    client, _, _ = local
    body = {"input": "Hi", "max_output_tokens": 120, "temperature": 1.0,
            "text": {"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}}}
    response = client.post("/v1/responses", json=body).json()
    assert response["status"] == "completed" and response["text"]["format"]["name"] == "person"
    message = [item for item in response["output"] if item["type"] == "message"][0]
    jsonschema.validate(json.loads(message["content"][0]["text"]), PERSON)
    tool = {"type": "function", **WEATHER["function"]}
    body = {"input": "Hi", "max_output_tokens": 120, "tools": [tool], "tool_choice": {"type": "function",
                                                                                      "name": "get_weather"}}
    calls = [i for i in client.post("/v1/responses", json=body).json()["output"] if i["type"] == "function_call"]
    assert [c["name"] for c in calls] == ["get_weather"]
    jsonschema.validate(json.loads(calls[0]["arguments"]), tool["parameters"])


@pytest.mark.parametrize("body, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "uniqueItems": True}}}}, "response_format.json_schema.schema.uniqueItems", "uniqueItems"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"d": {"type": "string", "format": "color"}}}}}},
     "response_format.json_schema.schema.properties.d.format", "'color'"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tool_choice": "required"}, "tool_choice", "at least one tool"),
    ({"structured_outputs": {"regex": "(?<=a)b"}}, "response_format", "regex"),
    ({"guided_json": PERSON, "guided_regex": "a"}, None, "at most one"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "stict": True}}},
     "response_format.json_schema.stict", "Extra inputs"),
    ({"use_beam_search": True}, None, "use_beam_search"),
    ({"functions": [{"name": "f"}]}, None, "functions"),
])
def test_what_cannot_be_enforced_is_a_400_naming_it(local, body, param, words):
    client, _, _ = local
    response = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 8, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert words in error["message"]
    if param is not None:
        assert error["param"] == param


def test_response_formats_section_is_rendered_as_harmony_expects(tok):
    fmt = ResponseFormatSection("shopping_list", "A shopping list", {"type": "object", "properties": {}})
    prompt = render_chat(tok, USER, RenderOptions(response_format=fmt)).text
    assert ('<|start|>developer<|message|># Response Formats\n\n## shopping_list\n\n// A shopping list\n'
            '{"type":"object","properties":{}}<|end|>') in prompt
