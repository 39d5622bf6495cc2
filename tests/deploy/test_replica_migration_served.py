"""`epserve serve --replicas 2`, one ModelServer replica lost while greedy and seeded streams run over HTTP (its
process SIGKILLed, or its only EP rank, which fails the group and ends the replica): every stream completes with
200, no error event, exactly the tokens and usage of an undisturbed run (the gateway continued the lost replica's
streams on the other one), and the server answers a new request right after."""
import asyncio
import json
import os
import signal
import time

import httpx
import pytest

from bench.chaos_events import RANK_TITLE, REPLICA_TITLE, is_full_size
from cluster.process_group import free_port
from tests.deploy.live_server import live_server, session_pids

MAX_TOKENS = 160
NUM_GREEDY = 8


def bodies() -> list[dict]:
    prompts = [f"<|start|>user<|message|>What is {i} + 3?<|end|><|start|>assistant" for i in range(NUM_GREEDY + 1)]
    common = {"max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True, "logprobs": 0,
              "stream_options": {"include_usage": True}}
    greedy = [{"prompt": p, "temperature": 0, **common} for p in prompts[:-1]]
    return greedy + [{"prompt": prompts[-1], "temperature": 1.0, "top_p": 0.95, "seed": 1234, **common}]


async def stream(client: httpx.AsyncClient, url: str, body: dict, started: asyncio.Event,
                 halfway: asyncio.Event) -> dict:
    """Status, per-token strings (logprobs tokens), text, usage and error events of one SSE stream."""
    got = {"status": None, "tokens": [], "text": "", "usage": None, "errors": [], "done": False}
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        got["status"] = response.status_code
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                got["done"] = True
                continue
            event = json.loads(line[6:])
            if "error" in event:
                got["errors"].append(event["error"])
            for choice in event.get("choices") or ():
                got["text"] += choice.get("text") or ""
                got["tokens"] += (choice.get("logprobs") or {}).get("tokens") or []
            got["usage"] = event.get("usage") or got["usage"]
            if len(got["tokens"]) >= 5:
                started.set()
            if len(got["tokens"]) >= MAX_TOKENS // 2:         # a slow replica must not let the others finish first
                halfway.set()
    started.set()
    return got


async def run_all(url: str, kill=None) -> list[dict]:
    """Every body at once; `kill()` runs once every stream has 5 tokens, or one is halfway."""
    async with httpx.AsyncClient(timeout=300) as client:
        events, halfway = [asyncio.Event() for _ in bodies()], asyncio.Event()
        tasks = [asyncio.ensure_future(stream(client, url, b, e, halfway)) for b, e in zip(bodies(), events)]
        if kill is not None:
            all_started = asyncio.ensure_future(asyncio.gather(*(e.wait() for e in events)))
            await asyncio.wait([all_started, asyncio.ensure_future(halfway.wait())], timeout=120,
                               return_when=asyncio.FIRST_COMPLETED)
            assert sum(not t.done() for t in tasks) >= len(tasks) // 2, "most streams ended before the kill"
            kill()
            all_started.cancel()
        return await asyncio.gather(*tasks)


@pytest.fixture(scope="module")
def server():
    metrics_port = free_port("127.0.0.1")
    with live_server("--ep-size", "1", "--replicas", "2", "--max-migrations", "3", "--metrics-port",
                     str(metrics_port)) as (url, proc):
        yield url, proc, metrics_port


def migrated(metrics_port: int) -> float:
    """ray_epserve_requests_migrated_total over every replica, as Ray's metrics agent exports it."""
    from prometheus_client.parser import text_string_to_metric_families
    try:
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    except httpx.HTTPError:
        return 0.0
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "ray_epserve_requests_migrated_total")


def wait_migrated(metrics_port: int, more_than: float, timeout_s: float = 30) -> float:
    deadline = time.monotonic() + timeout_s
    while (count := migrated(metrics_port)) <= more_than and time.monotonic() < deadline:
        time.sleep(1.0)
    return count


def wait_full_size(proc, timeout_s: float = 180) -> None:
    """Both ModelServer replicas and their ranks running (after a kill: Serve's replacement started)."""
    deadline = time.monotonic() + timeout_s
    while not is_full_size(proc.pid, replicas=2, ep_size=1):
        assert time.monotonic() < deadline, "the server did not get back to 2 replicas"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def reference(server):
    url, _, _ = server
    runs = asyncio.run(run_all(url))
    assert all(r["status"] == 200 and r["done"] and not r["errors"] for r in runs), runs
    assert all(len(r["tokens"]) == MAX_TOKENS for r in runs)
    return runs


@pytest.mark.parametrize("victim", [REPLICA_TITLE, RANK_TITLE])
def test_streams_of_a_lost_replica_continue_token_exact(server, reference, victim):
    """SIGKILL the replica process itself (the gateway moves its streams), or its only rank (the replica recovers
    or, failing that, exits and the gateway moves its streams): either way every stream is exact."""
    url, proc, metrics_port = server
    wait_full_size(proc)
    before = migrated(metrics_port)
    pids = session_pids(proc, victim)
    assert len(pids) == 2, pids
    disturbed = asyncio.run(run_all(url, lambda: os.kill(pids[0], signal.SIGKILL)))
    for ref, got in zip(reference, disturbed):
        assert got["status"] == 200 and got["done"] and got["errors"] == []
        assert got["tokens"] == ref["tokens"] and got["text"] == ref["text"]
        assert got["usage"] == ref["usage"] and got["usage"]["completion_tokens"] == MAX_TOKENS
    if victim == REPLICA_TITLE:          # a lost rank may also be handled inside the replica (survivors, replacement)
        assert wait_migrated(metrics_port, before) > before, "no stream was migrated: the kill hit none in flight"
    after = httpx.post(f"{url}/v1/completions", json={"prompt": "<|start|>user<|message|>Hi<|end|>", "max_tokens": 4,
                                                      "temperature": 0}, timeout=60)
    assert after.status_code == 200, after.text


def test_a_bad_request_still_fails_fast(server):
    url, _, _ = server
    r = httpx.post(f"{url}/v1/completions", json={"prompt": [1, 2, 10 ** 9], "max_tokens": 4}, timeout=60)
    assert r.status_code == 400 and "out of range" in r.json()["error"]["message"]
