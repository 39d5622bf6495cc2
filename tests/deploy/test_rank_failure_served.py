"""A rank lost under load in a live `epserve serve` (ep 2, 2 redundant experts; and without any) costs no request: 16 greedy streams
with one rank SIGKILLed mid-stream all complete with HTTP 200, no error event and exactly the tokens of an undisturbed
run; the server answers at once after; a replacement brings the group back to 2 ranks (read from its metrics). Then
the same with a rank SIGSTOPped (found stuck, killed, replaced). The server still stops cleanly."""
import asyncio
import json
import os
import signal
import time

import httpx
import pytest

from bench.chaos_events import process_state
from cluster.process_group import free_port
from tests.deploy.live_server import live_server, session_pids
from tests.monitoring.test_metrics import find, scrape

STREAMS, TOKENS = 16, 160


def ep2_server(redundant_experts: int):
    metrics_port = free_port("127.0.0.1")
    with live_server("--ep-size", "2", "--redundant-experts", str(redundant_experts), "--collective-timeout-s", "20",
                     "--metrics-port", str(metrics_port)) as (url, proc):
        yield url, proc, metrics_port
    assert proc.returncode is not None                       # stopped, nothing hung on the way out


@pytest.fixture(scope="module")
def server():
    yield from ep2_server(2)


@pytest.fixture(scope="module")
def server_without_redundancy():
    """No redundant experts: the survivor must load the lost rank's experts from the checkpoint."""
    yield from ep2_server(0)


async def stream(client, url: str, i: int, started: asyncio.Event) -> tuple[int, str, list[str], float]:
    """One streamed completion: (status, text, error messages, longest gap between chunks)."""
    body = {"prompt": f"What is {i} + 1?", "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": True}
    text, errors, chunks, last, gap = [], [], 0, time.monotonic(), 0.0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                errors.append(event["error"]["message"])
                continue
            now = time.monotonic()
            gap, last = max(gap, now - last), now
            text.append(event["choices"][0]["text"])
            chunks += 1
            if chunks == 3:
                started.set()
    return response.status_code, "".join(text), errors, gap


def run_streams(url: str, fault=None) -> list[tuple[int, str, list[str], float]]:
    """16 concurrent streams; `fault()` runs once every stream has its first chunks."""
    async def run():
        async with httpx.AsyncClient(timeout=180) as client:
            events = [asyncio.Event() for _ in range(STREAMS)]
            tasks = [asyncio.ensure_future(stream(client, url, i, e)) for i, e in enumerate(events)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 120)
            if fault is not None:
                fault()
            return await asyncio.gather(*tasks)
    return asyncio.run(run())


def wait_full_size(metrics_port: int, ranks_lost: int, timeout_s: float = 180) -> None:
    """Until the replica's metrics show `ranks_lost` lost ranks and none missing: back at 2 ranks."""
    deadline, samples = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        samples = scrape(metrics_port)
        if find(samples, "ray_epserve_ep_ranks_lost_total") == ranks_lost and \
                find(samples, "ray_epserve_ep_recoveries_total") == ranks_lost and \
                ("ray_epserve_ep_missing_ranks" in {n for n, _ in samples}) and \
                find(samples, "ray_epserve_ep_missing_ranks") == 0:
            return
        time.sleep(1)
    raise AssertionError(f"not back at full size: { {k: v for k, v in samples.items() if '_ep_' in k[0]} }")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["kill", "stop"])
def test_lost_rank_costs_no_stream_and_no_token(server, sig):
    check_lost_rank(server, sig)


def test_lost_rank_without_redundant_experts_costs_no_token(server_without_redundancy):
    check_lost_rank(server_without_redundancy, signal.SIGKILL)


def check_lost_rank(server, sig) -> None:
    url, proc, metrics_port = server
    reference = run_streams(url)
    assert all(status == 200 and not errors and text for status, text, errors, _ in reference)
    ranks = session_pids(proc, "ray::EPWorker")
    assert len(ranks) == 2, ranks
    victim, lost_before = ranks[-1], find(scrape(metrics_port), "ray_epserve_ep_ranks_lost_total")
    results = run_streams(url, lambda: os.kill(victim, sig))
    answered = httpx.post(f"{url}/v1/completions", json={"prompt": "What is 2 + 2?", "max_tokens": 4,
                                                         "temperature": 0}, timeout=30)
    for (status, text, errors, _), (_, want, _, _) in zip(results, reference):
        assert status == 200 and not errors, errors
        assert text == want
    assert answered.status_code == 200
    print(f"{signal.Signals(sig).name}: longest token gap {max(g for *_, g in results):.2f}s")
    wait_full_size(metrics_port, ranks_lost=lost_before + 1)
    assert process_state(victim) is None                           # killed (a stopped one too), not left behind
    after = session_pids(proc, "ray::EPWorker")
    assert len(after) == 2 and victim not in after
