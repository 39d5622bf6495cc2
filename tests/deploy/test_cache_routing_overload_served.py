"""The cache-aware router's load bound through a live `epserve serve --replicas 2 --enable-prefix-caching
--routing-load-bound 2`: a conversation runs on replica A (the owner of its `prompt_cache_key`); while A holds
bound + 1 streams more than replica B, a keyless turn of that conversation goes to B (it reports no cached tokens:
B never saw the conversation) and the router counts a `load` decision; once the streams are gone, the next keyless
turn is back on A (served from A's cache).

Exactly bound + 1 streams: the router itself sends any further one pinned to A to B once A is past the bound,
which raises B's load too, so A can never lead B by more than bound + 1. One gateway replica: the router lives in
each gateway and sees the replicas' load through its own requests (plus Serve's probes), so with one gateway the
loads it compares are exactly the streams this test holds open."""
import time

import httpx
import openai
import pytest

from cluster.process_group import free_port
from tests.deploy.live_server import live_server

BOUND = 2
SYSTEM = "You are a terse assistant for word games. " + " ".join(
    f"Rule {k}: reverse each word the user gives, keep its case, answer in one line." for k in range(5))
TURNS = ["Turn one: reverse the words lamp, tree and river, then say which of them is the longest word.",
         "Turn two: now reverse the words stone, cloud and garden, and tell me which one starts with a vowel.",
         "Turn three: reverse apple."]


@pytest.fixture(scope="module")
def server():
    metrics_port = free_port("127.0.0.1")
    with live_server("--replicas", "2", "--ep-size", "1", "--enable-prefix-caching", "--routing-load-bound",
                     str(BOUND), "--gateway-replicas", "1", "--metrics-port", str(metrics_port)) as (url, _):
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=120), metrics_port


def ask(client, messages, **extra):
    r = client.chat.completions.create(model=None, messages=messages, temperature=0, max_tokens=6, extra_body=extra)
    return r.choices[0].message.content or "", r.usage


def cached(usage) -> int:
    return usage.prompt_tokens_details.cached_tokens


def samples(port: int, name: str, **labels: str) -> list:
    """A metric's samples with these labels, as Ray's metrics agent exports them (none when absent)."""
    from prometheus_client.parser import text_string_to_metric_families
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    except httpx.HTTPError:
        return []
    return [s for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def metric(port: int, name: str, **labels: str) -> float:
    return sum(s.value for s in samples(port, name, **labels))


def wait_metric(port: int, name: str, done, timeout_s: float = 60, **labels: str) -> float:
    deadline = time.monotonic() + timeout_s
    while not done(value := metric(port, name, **labels)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return value


def wait_router_knows_both_replicas(client, port: int, timeout_s: float = 60) -> None:
    """The gateway's router learns of each ModelServer replica (Serve's controller tells it) when that replica is
    running, the second possibly after the server first answered; a session key's owner is picked among the
    replicas the router knows, so the conversation starts once it knows both (it has their queue lengths: Serve's
    `request_router_queue_len` series). Requests on another key make it probe any replica it has no length for;
    they are raw completions, sharing no prefix with the chats below."""
    def known() -> int:
        return len({s.labels["replica_id"] for s in samples(port, "ray_serve_request_router_queue_len",
                                                            deployment="ModelServer")})
    deadline = time.monotonic() + timeout_s
    while known() < 2:
        assert time.monotonic() < deadline, "the gateway's router does not know both ModelServer replicas"
        client.completions.create(model=None, prompt="warm-up", max_tokens=2, extra_body={"prompt_cache_key": "w"})
        time.sleep(1.0)


def wait_router_sees_caches(client, port: int, messages: list[dict], timeout_s: float = 60) -> None:
    """Until the replicas' first prefix-cache reports reach the router (Serve's routing stats, via its controller),
    it knows no cached tokens and routes keyless requests by power of two. Repeats a request pinned to its replica
    (harmless: it lands where it already ran) until the router says it saw cached tokens."""
    deadline = time.monotonic() + timeout_s
    while metric(port, "ray_epserve_routing_cached_tokens_total") == 0:
        assert time.monotonic() < deadline, "the router saw no replica's prefix cache report"
        ask(client, messages, prompt_cache_key="hot")
        time.sleep(1.0)


def open_stream(client, i: int):
    """A long completion pinned to the conversation's replica, returned once its first token arrived (it is running
    there, counted in that replica's ongoing requests until closed)."""
    stream = client.completions.create(model=None, prompt=f"<|start|>user<|message|>Count sheep, batch {i}.<|end|>"
                                       "<|start|>assistant", max_tokens=4000, stream=True,
                                       extra_body={"prompt_cache_key": "hot", "ignore_eos": True})
    for chunk in stream:
        assert chunk.choices and chunk.choices[0].finish_reason is None
        return stream
    raise AssertionError("the stream ended before its first token")


def test_an_overloaded_replica_stops_receiving_cache_affine_requests(server):
    client, metrics_port = server
    wait_router_knows_both_replicas(client, metrics_port)
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TURNS[0]}]
    answer, _ = ask(client, history, prompt_cache_key="hot")                    # on A, the key's owner
    history += [{"role": "assistant", "content": answer}, {"role": "user", "content": TURNS[1]}]
    answer, _ = ask(client, history, prompt_cache_key="hot")
    wait_router_sees_caches(client, metrics_port, history)
    on_a = ask(client, history, prompt_cache_key="hot")[1]
    assert cached(on_a) >= 0.7 * on_a.prompt_tokens, on_a                       # A holds the conversation
    history += [{"role": "assistant", "content": answer}]
    side = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Reverse the word moon."}]
    affine = ask(client, side)[1]                                               # no key, A idle: affinity to A
    assert cached(affine) >= 0.7 * affine.prompt_tokens, affine

    decisions, ongoing = "ray_epserve_routing_decisions_total", "ray_serve_num_ongoing_requests_at_replicas"
    load_before = metric(metrics_port, decisions, reason="load")
    streams = [open_stream(client, i) for i in range(BOUND + 1)]               # A: bound + 1 ongoing, B: none
    try:
        probe = ask(client, side[:1] + [{"role": "user", "content": "Reverse the word star."}])[1]
        # B served it: nothing of the conversation was cached there (on A most of the prompt would be)
        assert cached(probe) < 0.3 * probe.prompt_tokens, probe
        assert wait_metric(metrics_port, decisions, lambda v: v > load_before, reason="load") > load_before
        assert wait_metric(metrics_port, ongoing, lambda v: v >= BOUND + 1, deployment="ModelServer") >= BOUND + 1
    finally:
        for stream in streams:
            stream.close()
    # the gateway saw the streams end: the router's load of A is back within the bound
    assert wait_metric(metrics_port, ongoing, lambda v: v == 0, deployment="ModelServer") == 0

    back = ask(client, history + [{"role": "user", "content": TURNS[2]}])[1]
    # on A again: cached through the conversation's second turn, more than all B holds (the probe's prompt)
    assert cached(back) > probe.prompt_tokens and cached(back) >= 0.7 * back.prompt_tokens, (back, probe)
