"""`epserve bench load` against a tiny in-process fake OpenAI server (FastAPI + uvicorn on a free loopback port)
that streams a few SSE chunks with small sleeps, answers every fifth request with 503 and requires an API key."""
import asyncio
import json
import socket
import statistics
import threading
import time

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client.parser import text_string_to_metric_families

from bench.load import LENGTH_MIX, LoadConfig, make_workload
from bench.load_report import percentile
from deploy.cli import main

KEY = "secret"
TOKENS = 5                                 # content chunks per answer
CHUNK_S = 0.01


def fake_app() -> FastAPI:
    app = FastAPI()

    def authorized(request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {KEY}"

    @app.get("/v1/models")
    async def models(request: Request):
        if not authorized(request):
            return JSONResponse({"error": {"message": "bad key", "code": 401}}, status_code=401)
        return {"object": "list", "data": [{"id": "fake-oss", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        index = int(body["messages"][0]["content"].split()[1].rstrip(":"))
        if not authorized(request) or index % 5 == 3:
            return JSONResponse({"error": {"message": "overloaded", "code": 503}}, status_code=503)

        async def events():
            base = {"id": f"c{index}", "object": "chat.completion.chunk", "model": body["model"]}
            yield "data: " + json.dumps({**base, "choices": [{"index": 0, "delta": {"role": "assistant"}}]}) + "\n\n"
            for i in range(TOKENS):
                await asyncio.sleep(CHUNK_S)
                delta = {"reasoning_content": "think"} if i == 0 else {"content": f" w{i}"}
                yield "data: " + json.dumps({**base, "choices": [{"index": 0, "delta": delta}]}) + "\n\n"
            yield "data: " + json.dumps({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}) \
                + "\n\n"
            usage = {"prompt_tokens": 9, "completion_tokens": TOKENS, "total_tokens": 9 + TOKENS}
            yield "data: " + json.dumps({**base, "choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def fake_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(fake_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_load_against_a_streaming_server(fake_server, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["bench", "load", "--url", fake_server, "--rate", "40", "--requests", "12", "--concurrency", "4",
               "--api-key", KEY, "--out", str(out), "--seed", "1"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["requests"] == 12 and summary["completed"] == 10        # requests 3 and 8 get 503
    assert summary["status_codes"] == {"200": 10, "503": 2} and summary["errors"] == {"503": 2}
    assert summary["output_tokens"] == 10 * TOKENS and summary["output_tokens_per_s"] > 0
    ttft, itl, e2e = summary["ttft_s"], summary["itl_s"], summary["e2e_s"]
    assert ttft["count"] == e2e["count"] == 10 and itl["count"] == 10 * (TOKENS - 1)
    for q in ("p50", "p90", "p99"):
        assert 0 < ttft[q] <= e2e[q]
        assert ttft[q] >= CHUNK_S * 0.9 and e2e[q] >= TOKENS * CHUNK_S * 0.9
        assert CHUNK_S * 0.5 <= itl[q] < 1.0
    assert ttft["p50"] <= ttft["p90"] <= ttft["p99"]
    assert "api_key" not in summary["config"]
    png = (out / "load.png").read_bytes()
    assert len(png) > 5000 and png[:8] == b"\x89PNG\r\n\x1a\n"
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families((out / "metrics.prom").read_text()) for s in f.samples}
    base = (("model_name", "bench"), ("replica", "bench"))
    assert samples[("epserve_time_to_first_token_seconds_count", base)] == 10
    assert samples[("epserve_inter_token_latency_seconds_count", base)] == 10 * (TOKENS - 1)
    assert samples[("epserve_http_errors_total", base + (("status_code", "503"),))] == 2
    assert samples[("epserve_request_success_total", (("finished_reason", "length"),) + base)] == 10


@pytest.mark.parametrize("argv, message", [
    (["--url", "localhost:8000"], "--url must be an http(s) URL"),
    (["--url", "http://127.0.0.1:8000", "--rate", "-1"], "--rate must be a positive"),
    (["--url", "http://127.0.0.1:8000", "--concurrency", "0"], "at least 1"),
    (["--url", "http://127.0.0.1:9"], "cannot reach"),
])
def test_user_errors_exit_2_with_one_line(argv, message, capsys, tmp_path):
    assert main(["bench", "load", *argv, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_a_wrong_api_key_is_a_user_error(fake_server, capsys, tmp_path):
    assert main(["bench", "load", "--url", fake_server + "/v1", "--api-key", "nope", "--out", str(tmp_path)]) == 2
    assert "401" in capsys.readouterr().err


def test_poisson_arrivals_and_length_mix():
    work = make_workload(LoadConfig(url="http://x:1", rate=10.0, requests=4000, seed=3))
    gaps = [b[0] - a[0] for a, b in zip(work, work[1:])]
    assert statistics.mean(gaps) == pytest.approx(0.1, rel=0.06)
    assert statistics.stdev(gaps) == pytest.approx(0.1, rel=0.1)              # exponential: sd == mean
    for weight, _, max_tokens in LENGTH_MIX:
        share = sum(1 for w in work if w[2] == max_tokens) / len(work)
        assert share == pytest.approx(weight, abs=0.03)
    assert work == make_workload(LoadConfig(url="http://x:1", rate=10.0, requests=4000, seed=3))


def test_percentiles_are_exact():
    values = [0.3, 0.1, 0.9, 0.5, 0.7, 0.2]
    for q in (0.0, 0.5, 0.9, 0.99, 1.0):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q * 100))
    assert percentile([], 0.5) is None
