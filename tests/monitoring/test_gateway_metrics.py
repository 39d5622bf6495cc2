"""The gateway's request metrics through the real routes (FakeBackend, no Ray): every HTTP error counted exactly
once whichever layer raised it (before the first token, mid-stream, routing), and TTFT/e2e measured from the
request's arrival, so parsing, harmony rendering and queueing are inside them."""
import asyncio
import dataclasses
import time

import pytest
from fastapi.testclient import TestClient

from deploy.openai import routes as openai_routes
from deploy.openai.errors import no_healthy_replica_error, queue_full_error
from monitoring import metrics as m
from monitoring.recorders import RequestMetrics
from tests.deploy.gateway_fixtures import USER, FakeBackend, fake, make_app, make_ctx, tiny_dir, tok  # noqa: F401

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


class MemorySink:
    def __init__(self):
        self.records = []

    def record(self, spec, value, tags):
        self.records.append((spec.name, value, dict(tags)))

    def take(self, spec) -> list:
        """Values (HTTP errors: status codes) of `spec` recorded since the last take."""
        got = [t["status_code"] if spec is m.HTTP_ERRORS else v for n, v, t in self.records if n == spec.name]
        self.records = [r for r in self.records if r[0] != spec.name]
        return got


@pytest.fixture
def metered(fake):
    def make(**backend_kw):
        sink = MemorySink()
        client, backend = fake(ctx_kw={"metrics": RequestMetrics("m", replica="g", sink=sink),
                                       "api_keys": frozenset({"sk"})}, **backend_kw)
        client.headers["Authorization"] = "Bearer sk"
        return client, sink
    return make


@pytest.mark.parametrize("error,status", [(queue_full_error(1.0), 429), (no_healthy_replica_error(), 503),
                                          (RuntimeError("boom"), 500)])
@pytest.mark.parametrize("path,body", [(CHAT, {"messages": USER}), (COMPLETIONS, {"prompt": "Hi"})])
@pytest.mark.parametrize("stream", [False, True])
def test_an_error_before_the_first_token_is_counted_once(metered, error, status, path, body, stream):
    """The backend fails before any output: _metered reports it and _guard answers it; one count, no success."""
    client, sink = metered(error=error)
    assert client.post(path, json={**body, "stream": stream}).status_code == status
    assert sink.take(m.HTTP_ERRORS) == [str(status)]
    assert sink.take(m.REQUEST_SUCCESS) == [] and sink.take(m.TTFT) == []


def test_an_error_mid_stream_is_counted_once_and_never_as_a_success(metered):
    client, sink = metered(error=no_healthy_replica_error(), error_after=3)
    r = client.post(CHAT, json={"messages": USER, "stream": True})
    assert r.status_code == 200 and "ServiceUnavailableError" in r.text      # the SSE error event
    assert sink.take(m.HTTP_ERRORS) == ["503"]
    assert sink.take(m.REQUEST_SUCCESS) == [] and len(sink.take(m.TTFT)) == 1


def test_errors_outside_generation_are_counted_once_and_health_is_not(metered):
    client, sink = metered()
    assert client.post(CHAT, json={"messages": []}).status_code == 400                  # validation, in _guard
    assert client.post(CHAT, content=b"[" * 10_000).status_code == 400                  # nesting, in _guard
    assert client.get("/v1/models", headers={"Authorization": "Bearer no"}).status_code == 401
    assert client.get("/v1/nothing").status_code == 404                                  # routing: Starlette
    assert client.get(CHAT).status_code == 405
    assert client.get("/v1/models/gpt-4").status_code == 404
    assert sink.take(m.HTTP_ERRORS) == ["400", "400", "401", "404", "405", "404"]
    assert client.post(CHAT, json={"messages": USER}).status_code == 200
    assert sink.take(m.HTTP_ERRORS) == [] and sink.take(m.REQUEST_SUCCESS) == [1.0]


def test_an_unexpected_exception_in_a_route_is_counted_once(metered, monkeypatch):
    """A failure outside _guard's try (a bug in a route) reaches the last-resort handler, which counts it."""
    client, sink = metered()
    monkeypatch.setattr(openai_routes, "_generate", lambda *a: (_ for _ in ()).throw(RuntimeError("bug")))
    client = TestClient(client.app, raise_server_exceptions=False, headers={"Authorization": "Bearer sk"})
    assert client.post(CHAT, json={"messages": USER}).status_code == 500
    assert sink.take(m.HTTP_ERRORS) == ["500"]


def test_a_response_that_fails_after_the_generation_finished_is_counted(metered, monkeypatch):
    plan = openai_routes.plan_completion
    monkeypatch.setattr(openai_routes, "plan_completion",
                        lambda ctx, req: dataclasses.replace(plan(ctx, req), body=lambda results: 1 / 0))
    client, sink = metered()
    assert client.post(COMPLETIONS, json={"prompt": "Hi"}).status_code == 500
    assert sink.take(m.HTTP_ERRORS) == ["500"]


class WaitingBackend(FakeBackend):
    """Queues for `wait_s` before its first output, as a busy replica does."""

    def __init__(self, tokenizer, wait_s: float):
        super().__init__(tokenizer)
        self.wait_s = wait_s

    async def stream(self, request):
        await asyncio.sleep(self.wait_s)
        async for out in super().stream(request):
            yield out


@pytest.mark.parametrize("stream", [False, True])
def test_ttft_and_e2e_run_from_arrival_through_rendering_and_queueing(tok, monkeypatch, stream):
    render_s, queue_s = 0.3, 0.2
    plan = openai_routes.plan_chat_completion

    def slow_plan(ctx, req):                                  # harmony rendering that takes render_s
        time.sleep(render_s)
        return plan(ctx, req)
    monkeypatch.setattr(openai_routes, "plan_chat_completion", slow_plan)
    sink = MemorySink()
    ctx = make_ctx(WaitingBackend(tok, queue_s), tok, tok.harmony_stop_ids(),
                   metrics=RequestMetrics("m", replica="g", sink=sink))
    client = TestClient(make_app(ctx))
    before = time.monotonic()
    assert client.post(CHAT, json={"messages": USER, "stream": stream}).status_code == 200
    elapsed = time.monotonic() - before
    (ttft,), (e2e,) = sink.take(m.TTFT), sink.take(m.E2E)
    assert render_s + queue_s <= ttft <= e2e <= elapsed
