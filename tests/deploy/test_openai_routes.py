"""The gateway's HTTP surface: models/health, API keys, body limits, a bad-input matrix (status + OpenAI error body,
and the server still serves afterwards), 404/405/500, disconnects (ASGI 2.3 and 2.4), and the official `openai`
client against the app served by uvicorn on 127.0.0.1."""
import asyncio
import logging
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from deploy.backend import LocalBackend
from deploy.tokenizer import model_stop_ids
from tests.deploy.gateway_fixtures import (ANALYSIS_FINAL, MAX_MODEL_LEN, MODEL, USER, FakeBackend,  # noqa: F401
                                           asgi_call, fake, kv_blocks_all_free, make_app, make_ctx, make_engine,
                                           spy_aborts, tiny_dir, tiny_model, tok)

CHAT, COMPLETIONS, RESPONSES = "/v1/chat/completions", "/v1/completions", "/v1/responses"
OK_CHAT = {"model": MODEL, "messages": USER}


def assert_error(r, status, fragment=None, param=None):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    assert "Traceback" not in r.text
    if fragment is not None:
        assert fragment in error["message"], error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def test_json_depth_at_the_limit_and_escaped_surrogate_pairs_are_accepted(fake, tok):
    client, backend = fake()
    deep = b'{"messages": [{"role": "user", "content": "Hi"}], "x": ' + b"[" * 63 + b"]" * 63 + b"}"   # 64 levels
    assert client.post(CHAT, content=deep, headers={"content-type": "application/json"}).status_code == 200
    pair = b'{"messages": [{"role": "user", "content": "smile \\ud83d\\ude00 \\\\ud800"}]}'  # U+1F600, "\\ud800"
    assert client.post(CHAT, content=pair, headers={"content-type": "application/json"}).status_code == 200
    assert tok.decode(backend.requests[-1].prompt_token_ids).count("smile \U0001F600 \\ud800") == 1


def test_models_and_health(fake):
    client, _ = fake()
    assert client.get("/health").status_code == 200 and client.get("/health").json() == {}
    (card,) = client.get("/v1/models").json()["data"]
    assert card["id"] == MODEL and card["object"] == "model" and card["max_model_len"] == MAX_MODEL_LEN
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    assert_error(client.get("/v1/models/gpt-4"), 404, "The model `gpt-4` does not exist.")


def test_health_follows_the_readiness_probe(fake):
    """Without a probe (in-process backends) /health is 200; with one, 503 with its reason until it finds a model
    replica, 200 after, and 503 again when it fails; open without an API key."""
    answers = ["No ModelServer replica can serve yet (deployment UPDATING).", None,
               "The model deployment ModelServer failed to deploy: RuntimeError: rank 1: out of KV memory", None]

    async def probe():
        answer = answers.pop(0) if answers else RuntimeError("controller gone")
        if isinstance(answer, Exception):
            raise answer
        return answer
    client, _ = fake(ctx_kw={"readiness": probe, "api_keys": frozenset({"sk-good"})})
    error = assert_error(client.get("/health"), 503, "can serve yet")
    assert error["type"] == "ServiceUnavailableError"
    r = client.get("/health")
    assert r.status_code == 200 and r.json() == {}
    assert_error(client.get("/health"), 503, "failed to deploy: RuntimeError: rank 1: out of KV memory")
    assert client.get("/health").status_code == 200
    assert_error(client.get("/health"), 503, "Readiness unknown")


def test_api_keys(fake):
    client, backend = fake(ctx_kw={"api_keys": frozenset({"sk-good", "sk-other"})})
    assert client.get("/health").status_code == 200                    # open for probes
    for headers in ({}, {"Authorization": "Bearer sk-bad"}, {"Authorization": "sk-good"},
                    {"Authorization": "Basic sk-good"}):
        error = assert_error(client.post(CHAT, json=OK_CHAT, headers=headers), 401, "API key")
        assert error["type"] == "AuthenticationError"
    assert_error(client.get("/v1/models"), 401)
    assert backend.requests == []
    good = {"Authorization": "Bearer sk-good"}
    assert client.post(CHAT, json=OK_CHAT, headers=good).status_code == 200
    assert client.get("/v1/models", headers={"Authorization": "Bearer sk-other"}).status_code == 200


def test_body_size_limit_by_header_and_by_actual_body(fake):
    client, backend = fake(ctx_kw={"max_request_bytes": 1000})
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 2000}]}
    assert_error(client.post(CHAT, json=big), 413, "1000 bytes")
    chunks = (b'{"model": "tiny-gpt-oss", "messages": [{"role": "user", "content": "', b"y" * 1500, b'"}]}')
    r = client.post(CHAT, content=iter(chunks), headers={"content-type": "application/json"})
    assert_error(r, 413)
    assert backend.requests == [] and client.post(CHAT, json=OK_CHAT).status_code == 200


LONG = " ".join(["word"] * 400)
BAD_INPUTS = [
    (CHAT, b'{"model": ', 400, "not valid JSON"),
    (CHAT, b"", 400, "not valid JSON"),
    (CHAT, b"[1, 2]", 400, "JSON object"),
    (CHAT, {"model": MODEL}, 400, "messages"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": "hi"}, 400, "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": 123}]}, 400, "content"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400, "image_url"),
    (CHAT, {"messages": USER, "temperature": "hot"}, 400, "temperature"),
    (CHAT, {"messages": USER, "temperature": 5}, 400, "temperature"),
    (CHAT, {"messages": USER, "max_tokens": -1}, 400, "max_tokens"),
    (CHAT, {"messages": USER, "max_tokens": 0}, 400, "max_tokens"),
    (CHAT, {"messages": USER, "max_tokens": 10**9}, 400, "maximum context length is 256 tokens"),
    (CHAT, {"messages": [{"role": "user", "content": LONG}]}, 400, "maximum context length is 256 tokens"),
    (CHAT, {"messages": USER, "stop": [f"s{i}" for i in range(9)]}, 400, "at most 8 stop sequences"),
    (CHAT, {"messages": USER, "n": 1000}, 400, "n"),
    (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs"),
    (CHAT, {"messages": USER, "tool_choice": "required"}, 400, "required"),
    (CHAT, {"messages": USER, "tools": [{"type": "function", "function": {"name": "bad name"}}]}, 400, "name"),
    (CHAT, {"messages": USER, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    (CHAT, {"messages": USER, "presence_penalty": 3.0}, 400, "presence_penalty"),
    (CHAT, {"messages": USER, "min_tokens": 50, "max_tokens": 10}, 400, "min_tokens"),
    (CHAT, {"messages": USER, "seed": "abc"}, 400, "seed"),
    (CHAT, {"messages": [{"role": "tool", "tool_call_id": "c1", "content": "42"}]}, 400, "tool"),
    (CHAT, {"model": "gpt-4", "messages": USER}, 404, "The model `gpt-4` does not exist."),
    (COMPLETIONS, {"model": MODEL}, 400, "prompt"),
    (COMPLETIONS, {"prompt": ""}, 400, "prompt"),
    (COMPLETIONS, {"prompt": [1, -2]}, 400, "non-negative"),
    (COMPLETIONS, {"prompt": "x", "echo": True}, 400, "echo"),
    (COMPLETIONS, {"prompt": "x", "model": "other"}, 404, "does not exist"),
    (RESPONSES, {"model": MODEL}, 400, "input"),
    (RESPONSES, {"input": "Hi", "tools": [{"type": "web_search"}]}, 400, "web_search"),
    (RESPONSES, {"input": "Hi", "max_output_tokens": 0}, 400, "max_output_tokens"),
    (CHAT, b"[" * 100_000, 400, "more than 64 levels deep"),                       # json.loads: RecursionError
    (CHAT, b'{"messages": ' + b"[" * 70 + b"]" * 70 + b"}", 400, "more than 64 levels deep"),     # parses fine
    (CHAT, b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "messages.0.content: the string"),
    (COMPLETIONS, b'{"prompt": "x", "stop": ["ok", "\\udfff"]}', 400, "lone UTF-16 surrogate"),
    (RESPONSES, b'{"input": "\xed\xa0\x80"}', 400, "not valid UTF-8"),                    # encoded surrogate
    (COMPLETIONS, '{"prompt": "\ud800"}'.encode("utf-16", "surrogatepass"), 400, "not valid UTF-8"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "user": {"\\ud83d": 1}}', 400, "user.\\ud83d: the key"),
]


@pytest.mark.parametrize("path,body,status,fragment", BAD_INPUTS)
def test_bad_input_gets_its_status_and_an_openai_body(fake, path, body, status, fragment):
    client, backend = fake()
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert_error(r, status, fragment)
    assert backend.requests == []
    assert client.post(CHAT, json=OK_CHAT).status_code == 200          # still serving


def test_unknown_route_and_wrong_method(fake):
    client, _ = fake()
    assert_error(client.get("/v1/nothing"), 404, "/v1/nothing")
    assert_error(client.post("/v2/chat/completions", json=OK_CHAT), 404)
    r = client.get(CHAT)
    assert_error(r, 405, "GET") and "POST" in r.headers["allow"]
    assert_error(client.post("/v1/models"), 405)


def test_unexpected_error_is_a_generic_500_and_a_log_line(fake, caplog):
    client, _ = fake(error=RuntimeError("secret detail"))
    with caplog.at_level(logging.ERROR):
        error = assert_error(client.post(CHAT, json=OK_CHAT), 500)
    assert "secret" not in error["message"] and error["type"] == "InternalServerError"
    assert any(rec.exc_info and "secret detail" in str(rec.exc_info[1]) for rec in caplog.records)


def test_request_ids_are_unique(fake):
    client, backend = fake()
    ids = [client.post(CHAT, json=OK_CHAT).json()["id"] for _ in range(3)]
    ids.append(client.post(COMPLETIONS, json={"prompt": "x"}).json()["id"])
    ids.append(client.post(RESPONSES, json={"input": "x"}).json()["id"])
    assert len(set(ids)) == 5 and [r.request_id for r in backend.requests] == ids


@pytest.mark.parametrize("path,stream", [(CHAT, True), (CHAT, False), (COMPLETIONS, True), (COMPLETIONS, False),
                                         (RESPONSES, True)])
def test_disconnect_closes_the_backend_stream(tok, path, stream):
    """ASGI 2.3: the client's http.disconnect arrives while the backend is mid-generation."""
    backend = FakeBackend(tok, hang_after=3)
    app = make_app(make_ctx(backend, tok, tok.harmony_stop_ids()))
    body = {CHAT: {"messages": USER}, COMPLETIONS: {"prompt": ["a", "b"]}, RESPONSES: {"input": "Hi"}}[path]
    sent = asyncio.run(asgi_call(app, path, {**body, "stream": stream}, disconnect=lambda _: backend.num_sent >= 3))
    assert sorted(backend.closed) == sorted(r.request_id for r in backend.requests) != []
    assert sent[0]["status"] == (200 if stream else 499)


def test_failed_send_closes_the_backend_stream(tok):
    """ASGI 2.4: the server raises OSError from send once the client has gone; no http.disconnect is needed."""
    backend = FakeBackend(tok)
    app = make_app(make_ctx(backend, tok, tok.harmony_stop_ids()))
    sent = asyncio.run(asgi_call(app, CHAT, {"messages": USER, "stream": True}, spec_version="2.4",
                                 send_error_after=3))
    assert backend.closed == [backend.requests[0].request_id] and len(sent) == 4      # start + 3 bodies
    assert backend.num_sent < len(tok.encode(ANALYSIS_FINAL))                         # stopped early


def test_disconnect_before_the_first_token(tok):
    backend = FakeBackend(tok, hang_after=0)
    app = make_app(make_ctx(backend, tok, tok.harmony_stop_ids()))
    sent = asyncio.run(asgi_call(app, CHAT, {"messages": USER, "stream": True}, disconnect=lambda _: True))
    assert sent[0]["status"] == 499 and backend.closed == [backend.requests[0].request_id]


class Served:
    """The app on uvicorn in a background thread, on a free port of 127.0.0.1."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.sock.close()


def test_official_openai_client(tok):
    app = make_app(make_ctx(FakeBackend(tok), tok, tok.harmony_stop_ids(), api_keys=frozenset({"sk-test"})))
    with Served(app) as served:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="sk-test", max_retries=0)
        assert [m.id for m in client.models.list()] == [MODEL]
        reply = client.chat.completions.create(model=MODEL, messages=USER)
        message = reply.choices[0].message
        assert message.content == "Hello there!" and message.reasoning_content.startswith("The user greets")
        assert reply.usage.completion_tokens > 0
        stream = client.chat.completions.create(model=MODEL, messages=USER, stream=True,
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello there!"
        assert chunks[-1].usage.total_tokens == reply.usage.total_tokens
        text = client.completions.create(model=MODEL, prompt="Say hi", max_tokens=50).choices[0].text
        assert "Hello there!" in text
        response = client.responses.create(model=MODEL, input="Hi")
        assert response.output_text == "Hello there!" and response.usage.output_tokens_details.reasoning_tokens > 0
        events = list(client.responses.create(model=MODEL, input="Hi", stream=True))
        assert events[-1].type == "response.completed" and events[-1].response.output_text == "Hello there!"
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-4", messages=USER)
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL, messages=USER, temperature=9)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=served.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_real_client_disconnect_frees_the_engine(tiny_dir, tiny_model, tok):
    stop_ids = model_stop_ids(tiny_dir, tok)
    engine = make_engine(tiny_model, tok, stop_ids, max_model_len=4096)
    aborted = spy_aborts(engine)
    with Served(make_app(make_ctx(LocalBackend(engine), tok, stop_ids, max_model_len=4096))) as served:
        body = {"messages": USER, "max_tokens": 4000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", served.url + CHAT, json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert [next(lines) for _ in range(6)][0].startswith("data: ")
        deadline = time.monotonic() + 20
        while not aborted or engine.has_unfinished() or not kv_blocks_all_free(engine):
            assert time.monotonic() < deadline, "the request kept running after the client left"
            time.sleep(0.05)


def test_tokenize_detokenize_and_version(fake, tok):
    """vLLM's shapes: /tokenize of chat messages gives exactly the ids a chat request feeds the backend (with and
    without the generation prompt), of a prompt its encoding; /detokenize inverts it; bad ids and models are 400/404."""
    client, backend = fake()
    assert client.post(CHAT, json=OK_CHAT).status_code == 200
    fed = backend.requests[-1].prompt_token_ids
    r = client.post("/tokenize", json={"model": MODEL, "messages": USER, "return_token_strs": True}).json()
    assert r["tokens"] == fed and r["count"] == len(fed) and r["max_model_len"] == MAX_MODEL_LEN
    assert "".join(r["token_strs"]) == tok.decode(fed)
    bare = client.post("/tokenize", json={"messages": USER, "add_generation_prompt": False}).json()["tokens"]
    assert fed[:len(bare)] == bare and tok.decode(fed[len(bare):]) == "<|start|>assistant"
    ids = client.post("/tokenize", json={"prompt": "What is 2 + 3?"}).json()["tokens"]
    assert ids == tok.encode("What is 2 + 3?")
    assert client.post("/detokenize", json={"tokens": ids}).json() == {"prompt": "What is 2 + 3?"}
    assert_error(client.post("/detokenize", json={"tokens": [10 ** 9]}), 400, "out of range", param="tokens")
    assert_error(client.post("/tokenize", json={"model": "gpt-4", "prompt": "x"}), 404)
    assert_error(client.post("/tokenize", json={"prompt": 3}), 400)
    assert client.get("/version").json()["version"] == __import__("importlib.metadata").metadata.version("epserve")


def test_a_slow_plan_does_not_stall_the_event_loop(tok, monkeypatch):
    """Rendering and grammar compiles run in a worker thread: while one request's plan is busy (a new schema over a
    200k vocabulary takes seconds), /health and another request are answered. The busy plan waits until they are;
    on the event loop it would wait out its 10 s and the others would come after."""
    import deploy.openai.routes as routes
    from deploy.openai.chat_service import plan_chat_completion
    from tests.deploy.gateway_fixtures import FakeBackend
    entered, released, waits = threading.Event(), threading.Event(), []

    def busy_plan(ctx, req):
        if req.messages[-1].content == "busy":
            entered.set()
            waits.append(released.wait(timeout=10))       # True: the others were served meanwhile
        return plan_chat_completion(ctx, req)
    monkeypatch.setattr(routes, "plan_chat_completion", busy_plan)
    app = make_app(make_ctx(FakeBackend(tok), tok, tok.harmony_stop_ids()))

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            busy = asyncio.create_task(client.post(CHAT, json={"messages": [{"role": "user", "content": "busy"}]}))
            while not entered.is_set():
                await asyncio.sleep(0.01)
            health = await client.get("/health")
            other = await client.post(CHAT, json={"messages": [{"role": "user", "content": "Hi"}]})
            released.set()
            return health.status_code, other.status_code, (await busy).status_code
    assert asyncio.run(main()) == (200, 200, 200)
    assert waits == [True]
