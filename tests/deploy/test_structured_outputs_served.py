"""Structured outputs and forced tools as users get them: a live `epserve serve` of the demo model (two EP ranks, so
the grammar runs in each rank's sampler) through the official openai SDK -- `.parse()` with pydantic models,
json_object, tool_choice "required" and a named function with strict tools, the same streamed, Responses'
`text.format` -- LangChain's with_structured_output / bind_tools(tool_choice="any") and an OpenAI Agents SDK agent
with a function tool and an output_type, and a 400 for a schema the engine cannot enforce. Sampling at temperature 1:
whatever the tiny model would say, the output validates."""
import json

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.deploy.live_server import live_server

MAX_TOKENS = 160


class City(BaseModel):
    name: str = Field(max_length=20)
    population: int = Field(ge=0)
    coastal: bool


class GetWeather(BaseModel):
    """Looks up the current weather in a city."""
    city: str
    unit: str = Field(json_schema_extra={"enum": ["celsius", "fahrenheit"]})


class GetTime(BaseModel):
    """The local time in a time zone."""
    zone: int


TOOLS = [openai.pydantic_function_tool(GetWeather), openai.pydantic_function_tool(GetTime)]
QUESTION = [{"role": "user", "content": "Tell me about Oslo."}]


@pytest.fixture(scope="module")
def served():
    with live_server("--ep-size", "2") as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served}/v1", api_key="none", timeout=300, max_retries=0)


def test_parse_returns_the_pydantic_object(client):
    for seed in range(3):
        completion = client.chat.completions.parse(model="gpt-oss-demo", messages=QUESTION, response_format=City,
                                                   temperature=1.0, seed=seed, max_completion_tokens=MAX_TOKENS)
        choice = completion.choices[0]
        assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, City)


def test_json_object_is_a_json_object(client):
    completion = client.chat.completions.create(model="gpt-oss-demo", messages=QUESTION, temperature=1.0, seed=5,
                                                response_format={"type": "json_object"}, max_tokens=MAX_TOKENS)
    assert isinstance(json.loads(completion.choices[0].message.content), dict)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "GetTime"}}])
def test_forced_tool_calls_validate_against_their_strict_schemas(client, tool_choice):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for seed in range(2):
        completion = client.chat.completions.parse(model="gpt-oss-demo", messages=QUESTION, tools=TOOLS,
                                                   tool_choice=tool_choice, temperature=1.0, seed=seed,
                                                   max_completion_tokens=MAX_TOKENS)
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
        assert isinstance(call.function.parsed_arguments, (GetWeather, GetTime))
        if isinstance(tool_choice, dict):
            assert call.function.name == "GetTime"


def test_streamed_parse_and_streamed_tool_call(client):
    with client.chat.completions.stream(model="gpt-oss-demo", messages=QUESTION, response_format=City,
                                        temperature=1.0, seed=7, max_completion_tokens=MAX_TOKENS) as stream:
        deltas = [e.delta for e in stream if e.type == "content.delta"]
        final = stream.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, City) and len(deltas) > 1
    with client.chat.completions.stream(model="gpt-oss-demo", messages=QUESTION, tools=TOOLS, tool_choice="required",
                                        temperature=1.0, seed=8, max_completion_tokens=MAX_TOKENS) as stream:
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    assert isinstance(call.function.parsed_arguments, (GetWeather, GetTime))


def test_responses_parse_and_stream_with_text_format(client):
    response = client.responses.parse(model="gpt-oss-demo", input="Tell me about Oslo.", text_format=City,
                                      temperature=1.0, max_output_tokens=MAX_TOKENS)
    assert response.status == "completed" and isinstance(response.output_parsed, City)
    with client.responses.stream(model="gpt-oss-demo", input="Tell me about Lima.", text_format=City,
                                 temperature=1.0, max_output_tokens=MAX_TOKENS) as stream:
        final = stream.get_final_response()
    assert isinstance(final.output_parsed, City)
    tool = {"type": "function", "name": "GetTime", "strict": True,
            "parameters": TOOLS[1]["function"]["parameters"]}
    forced = client.responses.create(model="gpt-oss-demo", input="What time is it?", tools=[tool],
                                     tool_choice={"type": "function", "name": "GetTime"}, max_output_tokens=MAX_TOKENS)
    (call,) = [item for item in forced.output if item.type == "function_call"]
    jsonschema.validate(json.loads(call.arguments), tool["parameters"])


def test_a_schema_the_engine_cannot_enforce_is_a_400(client):
    schema = {"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gpt-oss-demo", messages=QUESTION, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert "uniqueItems" in info.value.message
    assert client.chat.completions.create(model="gpt-oss-demo", messages=QUESTION, max_tokens=4).choices


def test_langchain_structured_output_and_forced_tools(served):
    from langchain_openai import ChatOpenAI
    llm = ChatOpenAI(base_url=f"{served}/v1", api_key="none", model="gpt-oss-demo", temperature=1.0,
                     max_tokens=MAX_TOKENS, seed=1)
    assert isinstance(llm.with_structured_output(City).invoke("Tell me about Oslo."), City)
    (call,) = llm.bind_tools([GetWeather, GetTime], tool_choice="any").invoke("What time is it?").tool_calls
    schema = {"GetWeather": GetWeather, "GetTime": GetTime}[call["name"]].model_json_schema()
    jsonschema.validate(call["args"], schema)


@pytest.mark.parametrize("api", ["responses", "chat"])
def test_agents_sdk_runs_a_tool_then_answers_in_its_output_type(served, api):
    from agents import (Agent, ModelSettings, OpenAIChatCompletionsModel, OpenAIResponsesModel, Runner,
                        function_tool, set_tracing_disabled)
    set_tracing_disabled(True)
    zones = []

    @function_tool
    def local_time(zone: int) -> str:
        """The local time in a time zone."""
        zones.append(zone)
        return "12:00"
    model_class = OpenAIResponsesModel if api == "responses" else OpenAIChatCompletionsModel
    agent = Agent(name="city", instructions="Answer about the city.", tools=[local_time], output_type=City,
                  model=model_class(model="gpt-oss-demo", openai_client=openai.AsyncOpenAI(
                      base_url=f"{served}/v1", api_key="none", max_retries=0)),
                  model_settings=ModelSettings(tool_choice="required", temperature=1.0, max_tokens=MAX_TOKENS))
    result = Runner.run_sync(agent, "Tell me about Oslo and its local time.", max_turns=8)
    assert isinstance(result.final_output, City) and zones and all(isinstance(z, int) for z in zones)
