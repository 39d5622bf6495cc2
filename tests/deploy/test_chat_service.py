"""/v1/chat/completions through the HTTP layer: exact harmony parsing on a scripted backend (content, reasoning,
tool calls, n, logprobs, stop strings, errors), and the tiny engine (usage = real token counts, determinism,
stream == plain, cancellation on disconnect frees every KV block)."""
import asyncio
import json

from deploy.openai.errors import no_healthy_replica_error, queue_full_error
from deploy.backend import LocalBackend
from deploy.openai.chat_service import StopHoldback
from deploy.harmony.render import RenderOptions, render_chat
from deploy.tokenizer import model_stop_ids
from tests.deploy.gateway_fixtures import (ANALYSIS_FINAL, MODEL, TOOL_CALL, USER, asgi_call, fake,  # noqa: F401
                                           kv_blocks_all_free, local, make_app, make_ctx, make_engine, spy_aborts,
                                           sse_json, tiny_dir, tiny_model, tok)

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


def chat(client, **fields):
    return client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, **fields})


def counts(usage):
    return {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details")}


def joined(chunks, field, index=0):
    return "".join(c["choices"][0]["delta"].get(field) or "" for c in chunks
                   if c["choices"] and c["choices"][0]["index"] == index)


def test_plain_chat_splits_reasoning_from_content(fake, tok):
    client, backend = fake()
    r = chat(client)
    assert r.status_code == 200, r.text
    body = r.json()
    (request,) = backend.requests
    assert body["id"].startswith("chatcmpl-") and request.request_id == body["id"]
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "Hello there!",
                                 "reasoning_content": "The user greets me. Reply briefly.", "tool_calls": []}
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == tok.token_id("<|return|>")
    prompt = render_chat(tok, USER, RenderOptions()).token_ids
    assert request.prompt_token_ids == prompt
    n_out = len(tok.encode(ANALYSIS_FINAL))
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": n_out,
                             "total_tokens": len(prompt) + n_out, "prompt_tokens_details": {"cached_tokens": 0}}


def test_request_fields_reach_the_prompt_and_the_engine(fake, tok):
    client, backend = fake()
    assert chat(client, reasoning_effort="high", temperature=0.3, top_p=0.9, max_completion_tokens=40, seed=11,
                tools=TOOLS, stop=["xyz"]).status_code == 200
    request = backend.requests[0]
    prompt = tok.decode(request.prompt_token_ids)
    assert "Reasoning: high" in prompt and "type get_weather" in prompt and prompt.endswith("<|start|>assistant")
    p = request.params
    assert (p.temperature, p.top_p, p.max_tokens, p.seed, p.stop) == (0.3, 0.9, 40, 11, ("xyz",))
    assert p.stop_token_ids == tok.harmony_stop_ids()
    chat(client, tools=TOOLS, tool_choice="none", ignore_eos=True)
    assert "get_weather" not in tok.decode(backend.requests[1].prompt_token_ids)
    assert backend.requests[1].params.stop_token_ids == ()


def test_tool_call_becomes_tool_calls(fake):
    client, _ = fake(TOOL_CALL)
    choice = chat(client, tools=TOOLS).json()["choices"][0]
    (call,) = choice["message"]["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Oslo"}
    assert choice["message"]["content"] is None and choice["message"]["reasoning_content"] == "Need the weather."
    assert choice["finish_reason"] == "tool_calls"


def test_stream_deltas_rebuild_the_plain_answer(fake):
    client, _ = fake()
    plain = chat(client).json()
    r = chat(client, stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = sse_json(r.text)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert joined(chunks, "content") == plain["choices"][0]["message"]["content"]
    assert joined(chunks, "reasoning_content") == plain["choices"][0]["message"]["reasoning_content"]
    finish = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0].get("finish_reason")]
    assert [f["finish_reason"] for f in finish] == ["stop"] and chunks[-2]["choices"][0] == finish[0]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == counts(plain["usage"])


def test_stream_tool_call_deltas(fake):
    client, _ = fake(TOOL_CALL)
    chunks = sse_json(chat(client, tools=TOOLS, stream=True).text)
    calls = [tc for c in chunks if c["choices"] for tc in c["choices"][0]["delta"].get("tool_calls") or []]
    first = calls[0]
    assert first["index"] == 0 and first["id"].startswith("call_") and first["type"] == "function"
    assert first["function"]["name"] == "get_weather"
    assert all("id" not in tc and tc["index"] == 0 for tc in calls[1:])
    assert json.loads("".join(tc["function"].get("arguments") or "" for tc in calls)) == {"city": "Oslo"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert all(not c.get("usage") for c in chunks)   # no usage chunk unless asked


def test_n_choices_plain_and_streamed(fake, tok):
    other = "<|channel|>final<|message|>Second answer.<|return|>"
    client, _ = fake([ANALYSIS_FINAL, other])
    body = chat(client, n=2).json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["message"]["content"] for c in body["choices"]] == ["Hello there!", "Second answer."]
    assert body["usage"]["completion_tokens"] == len(tok.encode(ANALYSIS_FINAL)) + len(tok.encode(other))
    chunks = sse_json(chat(client, n=2, stream=True).text)
    assert [c["choices"][0]["delta"].get("role") for c in chunks[:2]] == ["assistant", "assistant"]
    assert [c["choices"][0]["index"] for c in chunks[:2]] == [0, 1]
    assert joined(chunks, "content", 1) == "Second answer."
    assert sorted(c["choices"][0]["index"] for c in chunks if c["choices"][0].get("finish_reason")) == [0, 1]


def test_logprobs_cover_every_generated_token(fake, tok):
    client, _ = fake()
    body = chat(client, logprobs=True, top_logprobs=2).json()
    content = body["choices"][0]["logprobs"]["content"]
    ids = tok.encode(ANALYSIS_FINAL)
    assert len(content) == body["usage"]["completion_tokens"] == len(ids)
    assert [c["token"] for c in content] == [tok.decode([i]) for i in ids]
    assert all(c["logprob"] == -0.25 and len(c["top_logprobs"]) == 2 for c in content)
    assert content[0]["bytes"] == list(content[0]["token"].encode())
    chunks = sse_json(chat(client, logprobs=True, top_logprobs=1, stream=True).text)
    streamed = [lp for c in chunks for lp in (c["choices"][0].get("logprobs") or {}).get("content", [])]
    assert [lp["token"] for lp in streamed] == [c["token"] for c in content]
    assert chat(client).json()["choices"][0]["logprobs"] is None


def test_stop_string_cuts_content_plain_and_streamed(fake):
    text = "<|channel|>final<|message|>Hello there! How are you?<|return|>"
    client, _ = fake(text)
    cut = chat(client, stop=["How"]).json()["choices"][0]
    assert cut["message"]["content"] == "Hello there! " and cut["finish_reason"] == "stop"
    assert cut["stop_reason"] == "How"
    chunks = sse_json(chat(client, stop=["How", "zzz"], stream=True).text)
    assert joined(chunks, "content") == "Hello there! "
    kept = chat(client, stop=["How"], include_stop_str_in_output=True).json()["choices"][0]["message"]
    assert kept["content"] == "Hello there! How"


def test_stop_holdback_never_sends_a_stop_string_prefix():
    hold = StopHoldback(["END"], include_stop=False)
    out = [hold.push(piece) for piece in ["abc", "E", "N"]]
    assert out == ["a", "b", "c"] and hold.pending == "EN"
    assert hold.push("D tail", finished=True, stop="END") == ""
    assert StopHoldback(None, False).push("xyz") == "xyz"


def test_backend_errors_before_the_first_token_are_http_statuses(fake):
    for stream in (False, True):
        client, _ = fake(error=queue_full_error(1.5))
        r = chat(client, stream=stream)
        assert r.status_code == 429 and r.headers["retry-after"] == "2"
        assert r.json()["error"]["type"] == "RateLimitError" and r.json()["error"]["code"] == 429
        client, _ = fake(error=no_healthy_replica_error())
        r = chat(client, stream=stream)
        assert r.status_code == 503 and r.json()["error"]["code"] == 503


def test_error_mid_stream_is_an_sse_error_event_then_done(fake):
    client, backend = fake(error=RuntimeError("secret internals"), error_after=4)
    r = chat(client, stream=True)
    assert r.status_code == 200 and "secret" not in r.text
    chunks = sse_json(r.text)
    assert chunks[-1]["error"]["code"] == 500 and chunks[-1]["error"]["type"] == "InternalServerError"
    assert backend.closed == [backend.requests[0].request_id]
    client, _ = fake(error=no_healthy_replica_error(), error_after=4)
    assert sse_json(chat(client, stream=True).text)[-1]["error"]["code"] == 503


def test_engine_chat_usage_determinism_and_stream_agreement(local, tok):
    client, engine, _ = local
    r = chat(client, temperature=0, max_tokens=6, logprobs=True)
    assert r.status_code == 200, r.text
    body = r.json()
    choice, usage = body["choices"][0], body["usage"]
    assert usage["prompt_tokens"] == len(render_chat(tok, USER, RenderOptions()).token_ids)
    assert usage["completion_tokens"] == len(choice["logprobs"]["content"]) <= 6
    assert choice["finish_reason"] in ("stop", "length", "tool_calls")
    assert (choice["finish_reason"] == "length") == (usage["completion_tokens"] == 6)
    again = chat(client, temperature=0, max_tokens=6, logprobs=True).json()
    assert again["choices"][0]["message"] == choice["message"] and again["id"] != body["id"]
    chunks = sse_json(chat(client, temperature=0, max_tokens=6, stream=True,
                           stream_options={"include_usage": True}).text)
    message = choice["message"]
    assert joined(chunks, "content") == (message["content"] or "")
    assert joined(chunks, "reasoning_content") == (message["reasoning_content"] or "")
    assert chunks[-1]["usage"] == counts(usage)
    assert not engine.has_unfinished() and kv_blocks_all_free(engine)


def test_engine_context_length_error(local):
    client, _, _ = local
    r = chat(client, max_tokens=1000)
    assert r.status_code == 400
    assert "maximum context length is 256 tokens" in r.json()["error"]["message"]


def test_engine_client_disconnect_cancels_the_request_and_frees_blocks(tiny_dir, tiny_model, tok):
    stop_ids = model_stop_ids(tiny_dir, tok)
    engine = make_engine(tiny_model, tok, stop_ids, max_model_len=4096)
    aborted = spy_aborts(engine)
    app = make_app(make_ctx(LocalBackend(engine), tok, stop_ids, max_model_len=4096))
    body = {"model": MODEL, "messages": USER, "max_tokens": 4000, "ignore_eos": True}
    streamed = lambda sent: sum(m["type"] == "http.response.body" for m in sent) >= 4       # noqa: E731
    sent = asyncio.run(asgi_call(app, "/v1/chat/completions", {**body, "stream": True}, disconnect=streamed))
    assert sent[0]["status"] == 200 and len(aborted) == 1
    assert not engine.has_unfinished() and kv_blocks_all_free(engine)
    frames = b"".join(m.get("body", b"") for m in sent).decode()
    assert frames.startswith("data: ") and "[DONE]" not in frames    # cut off, not finished
    running = lambda sent: not kv_blocks_all_free(engine)                                   # noqa: E731
    sent = asyncio.run(asgi_call(app, "/v1/chat/completions", body, disconnect=running))
    assert sent[0]["status"] == 499 and len(aborted) == 2
    assert not engine.has_unfinished() and kv_blocks_all_free(engine)
