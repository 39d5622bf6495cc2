"""Gateway test helpers: the OpenAI app on a tiny random checkpoint (LocalBackend) or on a scripted FakeBackend,
raw ASGI calls that disconnect mid-request, and SSE parsing. No Ray anywhere."""
from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from deploy.backend import LocalBackend
from deploy.openai.routes import register_routes
from deploy.serving_context import ServingContext
from deploy.tokenizer import Tokenizer, model_stop_ids
from engine.engine import EngineConfig, LLMEngine
from engine.token_output import TokenOutput
from model.loader import load_model
from model.tiny import TinySpec, write_tiny

MODEL = "tiny-gpt-oss"
MAX_MODEL_LEN = 256
ANALYSIS_FINAL = ("<|channel|>analysis<|message|>The user greets me. Reply briefly.<|end|>"
                  "<|start|>assistant<|channel|>final<|message|>Hello there!<|return|>")
TOOL_CALL = ("<|channel|>analysis<|message|>Need the weather.<|end|>"
             "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
             '<|message|>{"city": "Oslo"}<|call|>')
USER = [{"role": "user", "content": "Hi"}]


def make_app(ctx: ServingContext) -> FastAPI:
    app = FastAPI()
    register_routes(app)
    app.state.ctx = ctx
    return app


def make_ctx(backend, tokenizer: Tokenizer, eos_token_ids=(), max_model_len=MAX_MODEL_LEN, **kw) -> ServingContext:
    return ServingContext(backend=backend, tokenizer=tokenizer, model_name=MODEL, max_model_len=max_model_len,
                          eos_token_ids=tuple(eos_token_ids), **kw)


def make_engine(model, tokenizer: Tokenizer, stop_ids, max_model_len=MAX_MODEL_LEN) -> LLMEngine:
    config = EngineConfig(max_model_len=max_model_len, block_size=16, kv_cache_bytes=2 << 20, max_num_seqs=8,
                          max_num_batched_tokens=256)
    return LLMEngine(model, config, eos_token_ids=stop_ids, detokenize=tokenizer.decode)


def spy_aborts(engine: LLMEngine) -> list[str]:
    """The request ids the engine aborts from now on (a request closed early is aborted; a finished one is not)."""
    aborted: list[str] = []
    original = engine.abort

    def abort(request_id: str):
        aborted.append(request_id)
        return original(request_id)
    engine.abort = abort
    return aborted


def kv_blocks_all_free(engine: LLMEngine) -> bool:
    bm = engine.block_manager
    return all(bm.num_free_blocks(g) == bm.num_total_blocks(g) for g in bm.groups)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("gateway") / "tiny", TinySpec(seed=5))


@pytest.fixture(scope="session")
def tok(tiny_dir) -> Tokenizer:
    return Tokenizer.from_model_dir(tiny_dir)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    return load_model(tiny_dir)


@pytest.fixture
def local(tiny_dir, tiny_model, tok):
    """(TestClient, engine, ctx) for an app on a fresh LLMEngine over the shared tiny model."""
    stop_ids = model_stop_ids(tiny_dir, tok)
    engine = make_engine(tiny_model, tok, stop_ids)
    ctx = make_ctx(LocalBackend(engine), tok, stop_ids)
    with TestClient(make_app(ctx)) as client:
        yield client, engine, ctx


class FakeBackend:
    """A scripted GenerationBackend: completion i spells texts[i % len(texts)] (harmony written out), one token per
    TokenOutput, and finishes like the engine: "stop" on a stop id (kept in the ids) or a stop string (output_text
    cut), else "length" at max_tokens or at the end of the script. `error` is raised before the first output, or
    after `error_after` outputs; `hang_after` outputs, it waits until closed. Records requests and closed ids."""

    def __init__(self, tokenizer: Tokenizer, texts=(ANALYSIS_FINAL,), error: Exception | None = None,
                 error_after: int | None = None, hang_after: int | None = None):
        self.tok, self.texts = tokenizer, [texts] if isinstance(texts, str) else list(texts)
        self.error, self.error_after, self.hang_after = error, error_after, hang_after
        self.requests, self.closed, self.num_sent = [], [], 0

    async def stream(self, request):
        self.requests.append(request)
        try:
            if self.error is not None and self.error_after is None:
                raise self.error
            scripts = [self.tok.encode(self.texts[i % len(self.texts)]) for i in range(request.params.n)]
            states = [[] for _ in scripts]
            finished = [False] * len(scripts)
            sent = 0
            while not all(finished):
                for i, script in enumerate(scripts):
                    if finished[i]:
                        continue
                    if self.error is not None and sent == self.error_after:
                        raise self.error
                    if self.hang_after is not None and sent == self.hang_after:
                        await asyncio.Event().wait()
                    out = self._step(request, i, script, states[i])
                    finished[i] = out.finished
                    sent += 1
                    self.num_sent += 1
                    yield out
                    await asyncio.sleep(0)
        finally:
            self.closed.append(request.request_id)

    def _step(self, request, index: int, script: list[int], ids: list[int]) -> TokenOutput:
        p = request.params
        token = script[len(ids)]
        ids.append(token)
        reason = stop = text = None
        if token in p.stop_token_ids:
            reason, stop = "stop", token
        elif p.stop:
            full = self.tok.decode(ids)
            hits = sorted((full.find(s), s) for s in p.stop if s in full)
            if hits:
                at, stop = hits[0]
                reason, text = "stop", full[:at + len(stop) if p.include_stop_str_in_output else at]
        if reason is None and (len(ids) >= p.max_tokens or len(ids) == len(script)):
            reason = "length"
        k = p.logprobs
        done = reason is not None                      # the engine's contract: the whole output with the last one
        return TokenOutput(request.request_id, index, [token], list(ids) if done else [],
                           len(request.prompt_token_ids), num_output_tokens=len(ids),
                           finished=done, finish_reason=reason, stop_reason=stop, output_text=text,
                           logprobs=[] if k is None else [-0.25],
                           top_logprobs=[] if k is None else [[(token, -0.25), (0, -3.0)][:k]])


@pytest.fixture
def fake(tok):
    """(make: texts/kwargs -> (TestClient, FakeBackend)); extra ServingContext fields go in ctx_kw."""
    def make(texts=(ANALYSIS_FINAL,), ctx_kw=None, **backend_kw):
        backend = FakeBackend(tok, texts, **backend_kw)
        client = TestClient(make_app(make_ctx(backend, tok, tok.harmony_stop_ids(), **(ctx_kw or {}))))
        return client, backend
    return make


def sse_events(text: str) -> list[tuple[str | None, str]]:
    """(event name or None, data) per SSE event; asserts the framing: `field: value` lines, a blank line after each."""
    assert text.endswith("\n\n"), text[-80:]
    events = []
    for block in text[:-2].split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        assert set(fields) <= {"event", "data"}, block
        events.append((fields.get("event"), fields["data"]))
    return events


def sse_json(text: str) -> list[dict]:
    """The JSON payloads of a chat/completions stream; asserts it ends with exactly one `data: [DONE]`."""
    events = sse_events(text)
    assert events[-1] == (None, "[DONE]") and all(d != "[DONE]" for _, d in events[:-1])
    return [json.loads(d) for _, d in events[:-1]]


async def asgi_call(app, path: str, body: dict, *, disconnect: Callable[[list[dict]], bool] | None = None,
                    spec_version: str = "2.3", send_error_after: int | None = None) -> list[dict]:
    """Run one POST through the ASGI app. The client disconnects (receive -> http.disconnect) once
    `disconnect(messages sent so far)` is true, polled every 5 ms; with send_error_after, `send` raises OSError
    after that many body messages, as an ASGI 2.4 server does when the client is gone. Returns the messages sent."""
    raw = json.dumps(body).encode()
    sent: list[dict] = []
    state = {"body_read": False}
    gone = asyncio.Event()

    def check() -> None:
        if disconnect is not None and disconnect(sent):
            gone.set()

    async def receive():
        if not state["body_read"]:
            state["body_read"] = True
            return {"type": "http.request", "body": raw, "more_body": False}
        while not gone.is_set():
            check()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(gone.wait(), 0.005)
        return {"type": "http.disconnect"}

    async def send(message):
        if send_error_after is not None and message["type"] == "http.response.body" and \
                sum(m["type"] == "http.response.body" for m in sent) >= send_error_after:
            raise OSError("client gone")
        sent.append(message)
        check()

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]}
    await app(scope, receive, send)
    return sent
