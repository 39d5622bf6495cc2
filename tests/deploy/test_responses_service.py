"""/v1/responses: harmony -> reasoning / message / function_call items, real usage (reasoning tokens included),
the streaming event order with sequence numbers, incomplete and failed responses, and the tiny engine."""
import json

from deploy.openai.errors import queue_full_error
from deploy.harmony.render import RenderOptions, render_chat, render_responses
from tests.deploy.gateway_fixtures import (ANALYSIS_FINAL, MODEL, TOOL_CALL, USER, fake, local,  # noqa: F401
                                           sse_events, tiny_dir, tiny_model, tok)

TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather in a city.",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]


def respond(client, **fields):
    return client.post("/v1/responses", json={"model": MODEL, "input": "Hi", **fields})


def events_of(text):
    """(type, payload) per event; the SSE event name must equal the payload's type."""
    out = []
    for name, data in sse_events(text):
        payload = json.loads(data)
        assert name == payload["type"]
        out.append((name, payload))
    return out


def without_ids(items):
    return [{k: v for k, v in item.items() if k not in ("id", "call_id")} for item in items]


def test_plain_response_items_and_usage(fake, tok):
    client, backend = fake()
    r = respond(client, instructions="Be brief.", reasoning={"effort": "high"})
    assert r.status_code == 200, r.text
    body = r.json()
    (request,) = backend.requests
    assert body["id"].startswith("resp_") and request.request_id == body["id"]
    assert body["object"] == "response" and body["status"] == "completed" and body["model"] == MODEL
    prompt = tok.decode(request.prompt_token_ids)
    assert "Reasoning: high" in prompt and "# Instructions\n\nBe brief." in prompt
    reasoning, message = body["output"]
    assert reasoning["type"] == "reasoning" and reasoning["id"].startswith("rs_")
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "The user greets me. Reply briefly."}]
    assert message["type"] == "message" and message["id"].startswith("msg_") and message["status"] == "completed"
    assert message["content"][0]["type"] == "output_text" and message["content"][0]["text"] == "Hello there!"
    usage = body["usage"]
    assert usage["input_tokens"] == len(request.prompt_token_ids)
    assert usage["output_tokens"] == len(tok.encode(ANALYSIS_FINAL))
    # reasoning tokens: the analysis message from <|message|> to its <|end|>
    analysis = tok.encode("<|message|>The user greets me. Reply briefly.<|end|>")
    assert usage["output_tokens_details"]["reasoning_tokens"] == len(analysis)
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert body["instructions"] == "Be brief." and body["reasoning"]["effort"] == "high"


def test_function_call_item(fake, tok):
    client, backend = fake(TOOL_CALL)
    body = respond(client, tools=TOOLS).json()
    assert "type get_weather" in tok.decode(backend.requests[0].prompt_token_ids)
    reasoning, call = body["output"]
    assert reasoning["type"] == "reasoning" and call["type"] == "function_call"
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": "Oslo"}
    assert call["call_id"].startswith("call_") and call["id"].startswith("fc_") and call["status"] == "completed"
    assert body["tools"][0]["name"] == "get_weather" and body["status"] == "completed"


def test_stream_event_order_and_final_object(fake):
    client, _ = fake()
    plain = respond(client).json()
    r = respond(client, stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = events_of(r.text)
    assert [e["sequence_number"] for _, e in events] == list(range(len(events)))
    collapsed = []
    for kind, _ in events:
        if not collapsed or collapsed[-1] != kind or not kind.endswith(".delta"):
            collapsed.append(kind)
    assert collapsed == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed"]
    created, final = events[0][1]["response"], events[-1][1]["response"]
    assert created["status"] == "in_progress" and created["output"] == [] and created["id"] == final["id"]
    assert without_ids(final["output"]) == without_ids(plain["output"]) and final["usage"] == plain["usage"]
    deltas = "".join(e["delta"] for k, e in events if k == "response.output_text.delta")
    assert deltas == "Hello there!" == next(e["text"] for k, e in events if k == "response.output_text.done")
    added = next(e for k, e in events if k == "response.output_item.added")
    assert added["item"]["status"] == "in_progress" and added["output_index"] == 0


def test_stream_function_call_events(fake):
    client, _ = fake(TOOL_CALL)
    events = events_of(respond(client, tools=TOOLS, stream=True).text)
    kinds = [k for k, _ in events]
    call_added = [e for k, e in events if k == "response.output_item.added"][1]
    assert call_added["item"]["type"] == "function_call" and call_added["item"]["name"] == "get_weather"
    args = "".join(e["delta"] for k, e in events if k == "response.function_call_arguments.delta")
    done = next(e for k, e in events if k == "response.function_call_arguments.done")
    assert json.loads(args) == {"city": "Oslo"} and done["arguments"] == args and done["output_index"] == 1
    assert kinds[-2:] == ["response.output_item.done", "response.completed"]


def test_max_output_tokens_makes_it_incomplete(fake):
    client, _ = fake()
    body = respond(client, max_output_tokens=5).json()
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["usage"]["output_tokens"] == 5 and body["max_output_tokens"] == 5
    events = events_of(respond(client, max_output_tokens=5, stream=True).text)
    assert events[-1][0] == "response.incomplete"


def test_errors(fake):
    client, _ = fake(error=queue_full_error(1))
    r = respond(client, stream=True)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    client, _ = fake(error=RuntimeError("internal detail"), error_after=3)
    r = respond(client, stream=True)
    assert "internal detail" not in r.text
    events = events_of(r.text)
    assert [k for k, _ in events[-2:]] == ["error", "response.failed"]
    assert events[-1][1]["response"]["status"] == "failed"
    r = respond(client, background=True)
    assert r.status_code == 400 and "background" in r.json()["error"]["message"]
    r = respond(client, input=[{"type": "function_call_output", "call_id": "nope", "output": "x"}])
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"


def test_engine_usage_matches_the_equivalent_chat(local, tok):
    client, engine, _ = local
    assert render_responses(tok, "Hi", RenderOptions()) == render_chat(tok, USER, RenderOptions())
    body = respond(client, temperature=0, max_output_tokens=6).json()
    chat = client.post("/v1/chat/completions", json={"messages": USER, "temperature": 0, "max_tokens": 6}).json()
    assert body["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"]
    assert body["usage"]["output_tokens"] == chat["usage"]["completion_tokens"] <= 6
    assert body["status"] == ("incomplete" if chat["choices"][0]["finish_reason"] == "length" else "completed")
    events = events_of(respond(client, temperature=0, max_output_tokens=6, stream=True).text)
    assert without_ids(events[-1][1]["response"]["output"]) == without_ids(body["output"])
    assert not engine.has_unfinished()
