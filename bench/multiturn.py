"""`epserve bench load --workload multiturn`: conversations that resend their whole history every turn, each with a
long system prompt of its own, against `epserve serve` with the cache-aware router and with power of two choices,
side by side in one run (fresh servers, `--repeats` per router in A B B A order, turns pooled); then a workload
without shared prefixes (single-turn, unique prompts) on both, to show the router costs nothing there. Reports, per
router and workload: the share of prompt tokens of turns 2+ served from the prefix cache
(usage.prompt_tokens_details.cached_tokens), TTFT p50/p95 and throughput, and the ratios. Writes summary.json under
--out.
"""
from __future__ import annotations

import asyncio
import json
import random
import shlex
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

ROUTERS = ("cache_aware", "power_of_two")
DEFAULT_SERVE_ARGS = "--replicas 2 --ep-size 2 --enable-prefix-caching"
_WORDS = ("expert", "router", "token", "layer", "cache", "batch", "tensor", "replica", "rank", "prompt", "window")


@dataclass
class Turn:
    conversation: int
    turn: int
    status: str = "error"
    ttft: float | None = None
    e2e: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0


def system_prompt(rng: random.Random, conv: int, words: int) -> str:
    return f"You are assistant {conv}. " + " ".join(rng.choice(_WORDS) for _ in range(words))


async def _turn(client, base: str, messages: list[dict], max_tokens: int, record: Turn) -> str:
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start, text = time.monotonic(), []
    async with client.stream("POST", base + "/v1/chat/completions", json=body) as r:
        record.status = str(r.status_code)
        if r.status_code != 200:
            await r.aread()
            return ""
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            chunk = json.loads(line[5:])
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") or {}
                if delta.get("content") or delta.get("reasoning_content"):     # the first token, either channel
                    record.ttft = time.monotonic() - start if record.ttft is None else record.ttft
                text.append(delta.get("content") or "")
            if chunk.get("usage"):
                usage = chunk["usage"]
                record.prompt_tokens, record.output_tokens = usage["prompt_tokens"], usage["completion_tokens"]
                record.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    record.e2e = time.monotonic() - start
    return "".join(text)


async def run_conversations(base: str, conversations: int, turns: int, system_words: int, max_tokens: int,
                            concurrency: int, seed: int) -> tuple[list[Turn], float]:
    """Each conversation runs its turns in order, resending its history; `concurrency` conversations at a time."""
    import httpx
    rng = random.Random(seed)
    systems = [system_prompt(rng, c, system_words) for c in range(conversations)]
    slots, records = asyncio.Semaphore(concurrency), []

    async def conversation(c: int, client) -> None:
        async with slots:
            messages = [{"role": "system", "content": systems[c]}] if turns > 1 else []
            for t in range(turns):
                messages.append({"role": "user", "content": f"Question {t}: " + (
                    systems[c] if turns == 1 else f"summarize point {t} in a few words.")})
                record = Turn(c, t)
                records.append(record)
                answer = await _turn(client, base, messages, max_tokens, record)
                messages.append({"role": "assistant", "content": answer})

    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.monotonic()
        await asyncio.gather(*(conversation(c, client) for c in range(conversations)))
        return records, time.monotonic() - t0


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summarize(records: list[Turn], duration: float) -> dict:
    ok = [r for r in records if r.status == "200" and r.e2e is not None]
    later = [r for r in ok if r.turn > 0] or ok
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    later_ttfts = [r.ttft for r in later if r.ttft is not None]
    prompt = sum(r.prompt_tokens for r in later)
    return {"requests": len(records), "ok": len(ok),
            "cache_hit_ratio": round(sum(r.cached_tokens for r in later) / prompt, 3) if prompt else None,
            "ttft_p50_s": _pct(ttfts, 0.5), "ttft_p95_s": _pct(ttfts, 0.95),
            "later_turns_ttft_p50_s": _pct(later_ttfts, 0.5), "later_turns_ttft_p95_s": _pct(later_ttfts, 0.95),
            "mean_ttft_s": statistics.fmean(ttfts) if ttfts else None,
            "output_tokens_per_s": round(sum(r.output_tokens for r in ok) / duration, 2),
            "requests_per_s": round(len(ok) / duration, 3), "duration_s": round(duration, 2)}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def ratios(cache_aware: dict, power_of_two: dict) -> dict:
    """The targets' ratios: TTFT p50 speedup (power of two's over cache-aware's) and throughput ratio (cache-aware's
    over power of two's), per workload."""
    found = {}
    for workload in ("multiturn", "no_shared_prefix"):
        ca, p2 = cache_aware[workload], power_of_two[workload]
        found[workload] = {"ttft_p50_speedup": _ratio(p2["ttft_p50_s"], ca["ttft_p50_s"]),
                           "later_turns_ttft_p50_speedup": _ratio(p2["later_turns_ttft_p50_s"],
                                                                  ca["later_turns_ttft_p50_s"]),
                           "throughput_ratio": _ratio(ca["output_tokens_per_s"], p2["output_tokens_per_s"])}
    return found


def router_order(repeats: int) -> list[str]:
    """A B B A ...: each router starts first as often as the other, so drift of the machine hits both alike."""
    return [r for k in range(repeats) for r in (ROUTERS if k % 2 == 0 else ROUTERS[::-1])]


def run(args) -> dict:
    """Start `epserve serve` per router (`--repeats` times each, alternating), run the multi-turn then the
    no-shared-prefix workload on it; each router's turns are pooled over its runs."""
    from bench.serve_process import ServeProcess
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    serve_args = shlex.split(args.serve_args or DEFAULT_SERVE_ARGS)
    conversations, turns, repeats = max(1, args.requests // 4), 4, max(1, getattr(args, "repeats", 1))
    summary: dict = {"serve_args": serve_args, "conversations": conversations, "turns": turns, "repeats": repeats,
                     "routers": {}}
    pooled = {r: {w: ([], 0.0) for w in ("multiturn", "no_shared_prefix")} for r in ROUTERS}
    for k, router in enumerate(router_order(repeats)):
        seed = args.seed + 1000 * k
        with ServeProcess([*serve_args, "--request-router", router], out / f"serve-{router}-{k}.log") as server:
            found = {"multiturn": asyncio.run(run_conversations(
                         server.url, conversations, turns, args.system_words, 16, args.concurrency, seed)),
                     "no_shared_prefix": asyncio.run(run_conversations(
                         server.url, conversations * turns, 1, args.system_words, 16, args.concurrency, seed + 1))}
        for workload, (records, duration) in found.items():
            held, total = pooled[router][workload]
            pooled[router][workload] = (held + records, total + duration)
    for router in ROUTERS:
        summary["routers"][router] = {w: summarize(*pooled[router][w]) for w in pooled[router]}
    summary["cache_aware_vs_power_of_two"] = ratios(summary["routers"]["cache_aware"],
                                                    summary["routers"]["power_of_two"])
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return summary
