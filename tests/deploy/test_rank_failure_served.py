"""A rank killed under load in a live `epserve serve` (ep 2, ranks driving themselves): every in-flight stream ends
with an error event naming the dead rank within the collective timeout, and the server still stops cleanly."""
import asyncio
import json
import os
import re
import signal
import time

import httpx

from tests.deploy.live_server import live_server, session_pids

TIMEOUT_S = 10


def test_killed_rank_ends_every_stream_with_an_error_naming_it():
    with live_server("--ep-size", "2", "--collective-timeout-s", str(TIMEOUT_S)) as (url, proc):
        killed_at: list[float] = []

        async def stream(client, i: int, started: asyncio.Event) -> tuple[int, str | None, float]:
            body = {"prompt": f"What is {i} + 1?", "max_tokens": 1500, "temperature": 0, "ignore_eos": True,
                    "stream": True}
            chunks, error = 0, None
            async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        error = event["error"]["message"]
                    chunks += 1
                    if chunks == 3:
                        started.set()
            return chunks, error, time.monotonic()

        async def run():
            async with httpx.AsyncClient(timeout=120) as client:
                events = [asyncio.Event() for _ in range(8)]
                tasks = [asyncio.ensure_future(stream(client, i, e)) for i, e in enumerate(events)]
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 60)
                workers = session_pids(proc, "ray::EPWorker")
                assert len(workers) == 2, workers
                os.kill(workers[-1], signal.SIGKILL)
                killed_at.append(time.monotonic())
                return await asyncio.gather(*tasks)
        results = asyncio.run(run())
        for chunks, error, ended in results:
            assert error is not None and re.search(r"rank \d died", error), error
            assert ended - killed_at[0] < TIMEOUT_S + 10
            assert chunks < 1500                                   # ended early, not after generating it all
        stop_started = time.monotonic()
    assert proc.returncode is not None and time.monotonic() - stop_started < 75       # nothing hung on the way out
