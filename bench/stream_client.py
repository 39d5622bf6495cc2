"""Streaming OpenAI client for benchmarks: sends bodies all at once over httpx and times each SSE stream as the
client sees it (TTFT, gaps between content chunks, e2e, tokens from the streamed usage).

Knows the wire format of /v1/completions and /v1/chat/completions chunks only; it starts no server.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time


@dataclasses.dataclass
class StreamResult:
    """One streamed request. `itls` are the gaps between content chunks (a chunk may carry several tokens once the
    server coalesces them); `num_tokens` is the usage's completion_tokens, or the content chunks without usage."""
    text: str = ""
    num_tokens: int = 0
    num_chunks: int = 0
    ttft: float | None = None
    itls: list[float] = dataclasses.field(default_factory=list)
    e2e: float | None = None
    done: bool = False
    error: str | None = None
    finish_reason: str | None = None
    _usage_tokens: int | None = None
    _last: float | None = None

    @property
    def ok(self) -> bool:
        return self.done and self.error is None

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first: robust to chunks that carry several tokens."""
        if self.ttft is None or self.e2e is None or self.num_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.num_tokens - 1)


def chunk_text(chunk: dict) -> str:
    """The generated text one chunk carries: completions' `text`, or chat's content and reasoning deltas."""
    parts = []
    for choice in chunk.get("choices") or ():
        if "text" in choice:
            parts.append(choice.get("text") or "")
        delta = choice.get("delta") or {}
        parts += [delta.get("reasoning_content") or "", delta.get("content") or ""]
    return "".join(parts)


def feed_line(result: StreamResult, line: str, start: float, now: float) -> None:
    """Fold one SSE line received at `now` (request sent at `start`) into `result`."""
    if not line.startswith("data:") or result.done:
        return
    data = line[5:].strip()
    if data == "[DONE]":
        result.done = True
        result.e2e = now - start
        result.num_tokens = result._usage_tokens if result._usage_tokens is not None else result.num_chunks
        return
    chunk = json.loads(data)
    if chunk.get("error"):
        result.error = str(chunk["error"].get("message", chunk["error"]) if isinstance(chunk["error"], dict)
                           else chunk["error"])
        return
    if chunk.get("usage"):
        result._usage_tokens = chunk["usage"].get("completion_tokens")
    for choice in chunk.get("choices") or ():
        result.finish_reason = choice.get("finish_reason") or result.finish_reason
    text = chunk_text(chunk)
    if not text:
        return
    if result.ttft is None:
        result.ttft = now - start
    else:
        result.itls.append(now - result._last)
    result._last = now
    result.text += text
    result.num_chunks += 1


async def stream_one(client, url: str, body: dict) -> StreamResult:
    import httpx
    result, start = StreamResult(), time.monotonic()
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return result
            async for line in r.aiter_lines():
                feed_line(result, line, start, time.monotonic())
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
    if not result.done and result.error is None:
        result.error = "the stream ended without data: [DONE]"
    return result


async def run_streams(url: str, bodies: list[dict], timeout_s: float = 900.0) -> tuple[list[StreamResult], float]:
    """Send every body at once (one connection each); returns the results in order and the wall time from the
    first send to the last [DONE]."""
    import httpx
    limits = httpx.Limits(max_connections=len(bodies) + 4, max_keepalive_connections=len(bodies) + 4)
    async with httpx.AsyncClient(limits=limits, timeout=timeout_s) as client:
        t0 = time.monotonic()
        results = await asyncio.gather(*(stream_one(client, url, b) for b in bodies))
        return list(results), time.monotonic() - t0


def run_streams_sync(url: str, bodies: list[dict]) -> tuple[list[StreamResult], float]:
    return asyncio.run(run_streams(url, bodies))
