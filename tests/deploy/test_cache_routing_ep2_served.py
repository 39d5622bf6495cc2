"""The issue's acceptance shape through a live `epserve serve --replicas 2 --ep-size 2 --enable-prefix-caching`:
multi-turn conversations (each resending its history) report `cached_tokens`, and turns 2-4 are served mostly from
cache, so the replica router and each replica's rank placement both sent every turn where its prefix lives (a
prefix-blind choice lands on the right one of four ranks about a quarter of the time). One gateway: each gateway's
router remembers what it sent (README, cache-aware routing)."""
import concurrent.futures
import json

import httpx
import openai
import pytest

from tests.deploy.live_server import live_server


@pytest.fixture(scope="module")
def server():
    with live_server("--replicas", "2", "--ep-size", "2", "--enable-prefix-caching",
                     "--gateway-replicas", "1") as (base, _):
        yield base


def system_prompt(i: int) -> str:
    return f"Assistant {i}. " + " ".join(f"guideline {i}.{k}: keep answers short and reverse words." for k in range(20))


def conversation(client, conv: int) -> list[tuple[int, int, int]]:
    """(turn, cached tokens, prompt tokens) of four turns, each resending the history."""
    messages, found = [{"role": "system", "content": system_prompt(conv)}], []
    for turn in range(4):
        messages.append({"role": "user", "content": f"Turn {turn}: reverse the word cup{turn}."})
        r = client.chat.completions.create(model=None, messages=messages, temperature=0, max_tokens=5)
        found.append((turn, r.usage.prompt_tokens_details.cached_tokens, r.usage.prompt_tokens))
        messages.append({"role": "assistant", "content": r.choices[0].message.content or ""})
    return found


def test_turns_two_to_four_are_served_from_cache_on_two_replicas_of_two_ranks(server):
    """Six conversations at once, so loads differ from turn to turn: load-only choices (power of two, least-loaded
    rank) scatter a conversation's turns over the four ranks (this test fails with --request-router power_of_two)."""
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none", timeout=120)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda c: conversation(client, c), range(6)))
    for conv, turns in enumerate(results):
        for turn, cached, prompt in turns:
            if turn == 0:
                assert cached < 0.3 * prompt, (conv, turns)
            else:
                assert cached >= 0.7 * prompt, (conv, turns)


def test_streamed_usage_reports_the_cached_tokens_too(server):
    messages = [{"role": "system", "content": system_prompt(99)}, {"role": "user", "content": "Reverse lamp."}]
    body = {"messages": messages, "max_tokens": 4, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    usages = []
    for _ in range(2):
        with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            chunks = [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]
        usages.append(next(json.loads(c)["usage"] for c in chunks if c != "[DONE]" and json.loads(c).get("usage")))
    assert usages[0]["prompt_tokens"] == usages[1]["prompt_tokens"]
    assert usages[1]["prompt_tokens_details"]["cached_tokens"] >= 0.7 * usages[1]["prompt_tokens"], usages
