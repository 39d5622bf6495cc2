"""OpenAI protocol models: validation -> 400 bodies, sampling-parameter mapping, context length, output shapes."""
import json

import pytest
from pydantic import ValidationError

from deploy.openai import errors as api_errors
from deploy.openai.errors import BadRequestError, validation_error
from deploy.openai.protocol import (MAX_STOP_SEQUENCES, ChatCompletionRequest, CompletionRequest, to_sampling_params)
from deploy.openai.protocol_outputs import (ChatCompletionChunk, ChatCompletionChunkChoice, ChatCompletionResponse,
                                     ChatCompletionChoice, ChatMessage, DeltaMessage, ModelCard, ModelList,
                                     UsageInfo)
from deploy.openai.responses_protocol import (FunctionCallItem, OutputMessage, OutputText, ReasoningItem, ReasoningText,
                                       ResponseLifecycleEvent, ResponseObject, ResponsesRequest, ResponseUsage,
                                       TextDeltaEvent)

USER = [{"role": "user", "content": "Hi"}]


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "gpt-oss", "messages": USER, **fields})


def bad_request(model, body) -> BadRequestError:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return validation_error(info.value)


def test_a_full_chat_request_parses():
    req = chat(messages=[{"role": "system", "content": "Be brief."}, *USER,
                         {"role": "assistant", "content": None, "reasoning_content": "r",
                          "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                         {"role": "tool", "tool_call_id": "c", "content": "ok"}],
               max_tokens=10, temperature=0.7, top_p=0.9, n=2, stop="END", seed=7, stream=True,
               stream_options={"include_usage": True}, logprobs=True, top_logprobs=5, reasoning_effort="low",
               tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
               tool_choice="auto", user="u1")
    assert [m.role for m in req.messages] == ["system", "user", "assistant", "tool"]
    assert req.stop == ["END"] and req.stream_options.include_usage and req.effective_tools[0].function.name == "f"


def test_unknown_fields_are_accepted_and_reported():
    req = chat(frobnicate=3, logit_bias=None)
    assert req.ignored_fields() == ["frobnicate"]


def test_known_fields_are_accepted_only_with_the_values_this_server_honours():
    assert chat(store=False, skip_special_tokens=True, metadata={"k": "v"}, service_tier="auto").store is False
    for field, value in [("store", True), ("skip_special_tokens", False), ("service_tier", "flex"),
                         ("n", 2) if False else ("best_of", 3), ("chat_template", "{{x}}")]:
        err = bad_request(ChatCompletionRequest, {"model": "m", "messages": USER, field: value})
        assert f"{field}={value!r} is not supported" in err.message


BAD_CHAT = [
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": 1000}, "n"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs requires logprobs"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"use_beam_search": True}, "use_beam_search=True is not supported"),
    ({"audio": {"voice": "alloy"}}, "audio"),
    ({"guided_json": {}, "structured_outputs": {"regex": "a"}}, "not both"),
    ({"stop": ["s"] * (MAX_STOP_SEQUENCES + 1)}, f"at most {MAX_STOP_SEQUENCES} stop sequences"),
    ({"stop": [""]}, "non-empty"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "wizard"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "text parts only"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "tool_call_id"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": -5}, "max_completion_tokens"),
    ({"max_tokens": "lots"}, "max_tokens"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"logit_bias": {"abc": 1.0}}, "logit_bias keys"),
    ({"min_p": 1.5}, "min_p"),
    ({"stream_options": {"include_usage": True}}, "only allowed when stream is true"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "bad.name"}}]}, "tools"),
]


@pytest.mark.parametrize("fields, needle", BAD_CHAT)
def test_invalid_chat_requests_are_400_with_a_message(fields, needle):
    err = bad_request(ChatCompletionRequest, {"model": "m", "messages": USER, **fields})
    body = err.response().model_dump()["error"]
    assert err.status_code == 400 and body["code"] == 400 and body["type"] == "BadRequestError"
    assert needle in body["message"]


def test_a_validation_error_names_the_field():
    body = bad_request(ChatCompletionRequest, {"model": "m", "messages": USER, "temperature": 3}).response()
    assert body.error.param == "temperature"
    assert body.error.message == "temperature: Input should be less than or equal to 2"


def test_context_length_error_body_matches_vllm():
    req = chat(max_tokens=100)
    with pytest.raises(BadRequestError) as info:
        to_sampling_params(req, max_model_len=128, prompt_len=40)
    assert info.value.response().model_dump() == {"error": {
        "message": "This model's maximum context length is 128 tokens. However, you requested 140 tokens "
                   "(40 in the messages, 100 in the completion). Please reduce the length of the messages or "
                   "completion.", "type": "BadRequestError", "param": "max_tokens", "code": 400}}
    with pytest.raises(BadRequestError, match="your messages resulted in 128 tokens"):
        to_sampling_params(chat(), max_model_len=128, prompt_len=128)


def test_sampling_params_mapping():
    p = to_sampling_params(chat(max_tokens=50, max_completion_tokens=20, temperature=0, top_p=0.5, seed=3, n=2,
                                stop=["A", "B"], logprobs=True, top_logprobs=4, stop_token_ids=[5]),
                           max_model_len=1000, prompt_len=10, stop_token_ids=(7, 5))
    assert (p.max_tokens, p.temperature, p.top_p, p.seed, p.n) == (20, 0.0, 0.5, 3, 2)   # max_completion_tokens wins
    assert p.stop == ("A", "B") and p.logprobs == 4 and p.stop_token_ids == (7, 5) and p.greedy
    default = to_sampling_params(chat(), max_model_len=1000, prompt_len=10)
    assert (default.max_tokens, default.temperature, default.logprobs, default.n) == (990, 1.0, None, 1)
    assert to_sampling_params(chat(logprobs=True), 1000, 10).logprobs == 0


def test_sampling_params_errors_become_400():
    req = ChatCompletionRequest.model_construct(messages=USER, temperature=None, top_p=None, top_k=None, n=1,
                                                stop=[], seed="x", max_tokens=None, max_completion_tokens=None,
                                                logprobs=False, top_logprobs=None, ignore_eos=False,
                                                include_stop_str_in_output=False, stop_token_ids=None)
    with pytest.raises(BadRequestError, match="seed"):
        to_sampling_params(req, 100, 10)
    with pytest.raises(BadRequestError, match="empty"):
        to_sampling_params(chat(), 100, 0)


@pytest.mark.parametrize("prompt, expected", [
    ("text", ["text"]), (["a", "b"], ["a", "b"]), ([1, 2, 3], [[1, 2, 3]]), ([[1], [2, 3]], [[1], [2, 3]]),
])
def test_completion_prompt_forms(prompt, expected):
    assert CompletionRequest(model="m", prompt=prompt).prompts() == expected


@pytest.mark.parametrize("fields, needle", [
    ({"prompt": []}, "non-empty"), ({"prompt": ""}, "non-empty"), ({"prompt": [[1], []]}, "non-empty"),
    ({"prompt": [1, -2]}, "non-negative"), ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "suffix": "y"}, "suffix"), ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"), ({"prompt": ["a", 1]}, "prompt"),
])
def test_invalid_completion_requests(fields, needle):
    assert needle in bad_request(CompletionRequest, {"model": "m", **fields}).message


def test_completion_max_tokens_default_16_and_null_means_the_rest():
    assert to_sampling_params(CompletionRequest(prompt="x"), 100, 4).max_tokens == 16
    assert to_sampling_params(CompletionRequest(prompt="x", max_tokens=None), 100, 4).max_tokens == 96
    assert to_sampling_params(CompletionRequest(prompt="x", logprobs=3), 100, 4).logprobs == 3


def test_responses_request():
    req = ResponsesRequest(input=[{"role": "user", "content": "hi"}], instructions="Be brief.", max_output_tokens=8,
                           reasoning={"effort": "high"}, temperature=0.2,
                           tools=[{"type": "function", "name": "f", "parameters": {"type": "object"}}])
    assert req.reasoning_effort == "high" and req.effective_tools[0]["name"] == "f"
    p = to_sampling_params(req, 100, 10, stop_token_ids=(1, 2))
    assert (p.max_tokens, p.temperature, p.stop_token_ids) == (8, 0.2, (1, 2))
    assert ResponsesRequest(input="hi").reasoning_effort == "medium"
    for body, needle in [({"input": "x", "tools": [{"type": "web_search"}]}, "web_search"),
                         ({"input": "x", "background": True}, "background"),
                         ({"input": [{"type": "computer_call"}]}, "computer_call"), ({"input": []}, "non-empty"),
                         ({"input": "x", "conversation": "conv_1"}, "conversation"),
                         ({"input": "x", "text": {"format": {"type": "json_schema", "name": "x"}}}, "schema")]:
        assert needle in bad_request(ResponsesRequest, body).message


def test_response_object_and_events_serialise_like_openai():
    resp = ResponseObject(model="gpt-oss", output=[
        ReasoningItem(content=[ReasoningText(text="think")]),
        OutputMessage(content=[OutputText(text="Hello")]),
        FunctionCallItem(call_id="call_1", name="f", arguments="{}")], usage=ResponseUsage.of(5, 7, reasoning_tokens=2))
    body = json.loads(resp.model_dump_json())
    assert body["object"] == "response" and body["id"].startswith("resp_") and body["status"] == "completed"
    assert [o["type"] for o in body["output"]] == ["reasoning", "message", "function_call"]
    assert body["output"][1]["content"][0] == {"type": "output_text", "text": "Hello", "annotations": [],
                                               "logprobs": []}
    assert body["usage"]["total_tokens"] == 12 and body["usage"]["output_tokens_details"]["reasoning_tokens"] == 2
    assert resp.output_text == "Hello"
    assert ResponseObject.model_validate(body).output[2].call_id == "call_1"
    delta = TextDeltaEvent(type="response.reasoning_text.delta", sequence_number=3, item_id="rs_1", output_index=0,
                           delta="th")
    assert json.loads(delta.model_dump_json())["type"] == "response.reasoning_text.delta"
    done = ResponseLifecycleEvent(type="response.completed", sequence_number=9, response=resp)
    assert done.model_dump()["response"]["usage"]["input_tokens"] == 5
    with pytest.raises(ValidationError):
        TextDeltaEvent(type="response.text.delta", sequence_number=0, item_id="x", output_index=0, delta="")


def test_chat_response_and_chunk_shapes():
    resp = ChatCompletionResponse(model="m", usage=UsageInfo.of(3, 4), choices=[ChatCompletionChoice(
        index=0, message=ChatMessage(content="4", reasoning_content="2+2"), finish_reason="stop")])
    body = resp.model_dump()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["usage"]["total_tokens"] == 7 and body["choices"][0]["message"]["role"] == "assistant"
    chunk = ChatCompletionChunk(id=resp.id, model="m", choices=[ChatCompletionChunkChoice(
        index=0, delta=DeltaMessage(reasoning_content="2"))])
    assert json.loads(chunk.model_dump_json(exclude_none=True))["choices"][0]["delta"] == {"reasoning_content": "2"}
    assert ModelList(data=[ModelCard(id="gpt-oss", max_model_len=128)]).model_dump()["data"][0]["object"] == "model"


@pytest.mark.parametrize("error, status", [
    (api_errors.invalid_api_key_error(), 401), (api_errors.model_not_found_error("x"), 404),
    (api_errors.route_not_found_error("/v2"), 404), (api_errors.request_too_large_error(1024), 413),
    (api_errors.queue_full_error(2.2), 429), (api_errors.no_healthy_replica_error(), 503),
])
def test_error_helpers_carry_status_and_openai_body(error, status):
    body = error.response().model_dump()
    assert error.status_code == status == body["error"]["code"]
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
    if status == 429:
        assert error.headers == {"Retry-After": "3"}
