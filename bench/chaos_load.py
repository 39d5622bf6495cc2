"""The chaos benchmark's steady load: a fixed pool of streamed /v1/completions bodies (greedy, plus seeded sampling),
sent by a fixed number of client loops back to back, each request recorded with the time and token count of every
chunk (continuous usage), its text and how it ended.

Talks HTTP only (httpx); starts no server and injects no fault.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time


@dataclasses.dataclass
class RequestRecord:
    """One streamed request; times are seconds on the load's clock (time.monotonic() - its origin)."""
    body: int                                     # index in the body pool
    start: float
    chunks: list[tuple[float, int]] = dataclasses.field(default_factory=list)   # (time, completion tokens so far)
    text: str = ""
    end: float | None = None
    error: str | None = None
    done: bool = False

    @property
    def ok(self) -> bool:
        return self.done and self.error is None

    @property
    def num_tokens(self) -> int:
        return self.chunks[-1][1] if self.chunks else 0

    def gaps(self) -> list[tuple[float, float]]:
        """(end time, length) of each wait for the next tokens: request start -> first chunk, then chunk -> chunk."""
        times = [self.start] + [t for t, _ in self.chunks]
        return [(b, b - a) for a, b in zip(times, times[1:])]


def pool_bodies(model: str, num: int, max_tokens: int, seeded_every: int = 4) -> list[dict]:
    """`num` distinct demo questions; every `seeded_every`-th body samples (temperature 1, top_p 0.95) with its own
    seed, the rest are greedy. All ignore EOS and stream the usage on every chunk."""
    from bench.serve_bench import completion_prompt, make_questions
    bodies = []
    for i, question in enumerate(make_questions(num, seed=0)):
        body = {"model": model, "prompt": completion_prompt(question), "max_tokens": max_tokens, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
        sampled = seeded_every > 0 and i % seeded_every == seeded_every - 1
        body.update({"temperature": 1.0, "top_p": 0.95, "seed": 1000 + i} if sampled else {"temperature": 0})
        bodies.append(body)
    return bodies


async def stream_request(client, url: str, body: dict, index: int, origin: float) -> RequestRecord:
    import httpx
    record = RequestRecord(index, time.monotonic() - origin)
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
            else:
                async for line in response.aiter_lines():
                    _feed(record, line, time.monotonic() - origin)
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        record.error = f"{type(e).__name__}: {e}"
    if not record.done and record.error is None:
        record.error = "the stream ended without data: [DONE]"
    record.end = time.monotonic() - origin
    return record


def _feed(record: RequestRecord, line: str, now: float) -> None:
    if not line.startswith("data:") or record.done:
        return
    data = line[5:].strip()
    if data == "[DONE]":
        record.done = True
        return
    chunk = json.loads(data)
    if chunk.get("error"):
        error = chunk["error"]
        record.error = str(error.get("message", error) if isinstance(error, dict) else error)
        return
    record.text += "".join(c.get("text") or "" for c in chunk.get("choices") or ())
    tokens = (chunk.get("usage") or {}).get("completion_tokens")
    if tokens is not None and tokens > record.num_tokens:
        record.chunks.append((now, tokens))


class SteadyLoad:
    """`concurrency` client loops, each sending the next body of the pool as soon as its last request ended, until
    stop(); every request's record is kept in `records` (in the order they ended)."""

    def __init__(self, url: str, bodies: list[dict], concurrency: int, origin: float):
        self.url, self.bodies, self.concurrency, self.origin = url, bodies, concurrency, origin
        self.records: list[RequestRecord] = []
        self._stopping = asyncio.Event()
        self._next = 0
        self._tasks: list[asyncio.Task] = []
        self._client = None

    async def start(self) -> None:
        import httpx
        limits = httpx.Limits(max_connections=self.concurrency + 4, max_keepalive_connections=self.concurrency + 4)
        self._client = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600, connect=30))
        self._tasks = [asyncio.ensure_future(self._loop()) for _ in range(self.concurrency)]

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            index = self._next % len(self.bodies)
            self._next += 1
            self.records.append(await stream_request(self._client, self.url, self.bodies[index], index,
                                                     self.origin))

    async def stop(self) -> None:
        """No new requests; wait for the ones in flight to end."""
        self._stopping.set()
        await asyncio.gather(*self._tasks)
        await self._client.aclose()


async def reference_run(url: str, bodies: list[dict]) -> list[RequestRecord]:
    """Every body once, all at once, undisturbed: the tokens each must produce under chaos too."""
    import httpx
    origin = time.monotonic()
    limits = httpx.Limits(max_connections=len(bodies) + 4, max_keepalive_connections=len(bodies) + 4)
    async with httpx.AsyncClient(limits=limits, timeout=600) as client:
        return list(await asyncio.gather(*(stream_request(client, url, b, i, origin) for i, b in enumerate(bodies))))
