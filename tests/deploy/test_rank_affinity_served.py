"""Inside one replica (live `epserve serve --ep-size 2 --enable-prefix-caching`): a conversation's next turn goes to
the rank that served its last one, even when least-loaded placement would send it to the other rank."""
import threading

import openai
import pytest

from tests.deploy.live_server import live_server


@pytest.fixture(scope="module")
def client():
    with live_server("--ep-size", "2", "--enable-prefix-caching") as (base, _):
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="none", timeout=120)


def test_next_turn_follows_its_prefix_not_the_idle_rank(client):
    messages = [{"role": "system", "content": "Rules: " + " ".join(f"rule {k}: answer briefly." for k in range(40))},
                {"role": "user", "content": "Reverse the word lamp."}]
    first = client.chat.completions.create(model=None, messages=messages, temperature=0, max_tokens=6)
    # An idle group places on the first rank; a long stream started now lands there too (ties go to the first
    # rank), so least-loaded placement would send the next turn to the other, cold rank.
    started, done = threading.Event(), threading.Event()

    def background():
        stream = client.completions.create(model=None, prompt="Count slowly:", max_tokens=400, stream=True,
                                           extra_body={"ignore_eos": True})
        for _ in stream:
            started.set()
            if done.is_set():
                break
        stream.close()
    worker = threading.Thread(target=background, daemon=True)
    worker.start()
    assert started.wait(60)
    try:
        messages += [{"role": "assistant", "content": first.choices[0].message.content or "ok"},
                     {"role": "user", "content": "And the word desk?"}]
        second = client.chat.completions.create(model=None, messages=messages, temperature=0, max_tokens=6)
    finally:
        done.set()
        worker.join(60)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 0.7 * second.usage.prompt_tokens, (cached, second.usage.prompt_tokens)


def test_prompt_cache_key_pins_the_rank(client):
    """Inside the replica too, keys decide over caches: a prompt first run under key "home" is cached for key "k-j"
    exactly when that key's rank is home's, and each key always picks the same rank."""
    def cached(prompt, key):
        r = client.chat.completions.create(model=None, messages=[{"role": "user", "content": prompt}], temperature=0,
                                           max_tokens=4, extra_body={"prompt_cache_key": key})
        return r.usage.prompt_tokens_details.cached_tokens, r.usage.prompt_tokens
    outcomes = {}
    for j in range(8):
        prompt = f"Topic {j}. " + " ".join(f"note {j}.{k}: keep answers short." for k in range(24))
        first, total = cached(prompt, "home")
        assert first < 0.3 * total
        second, _ = cached(prompt, f"k-{j}")
        third, _ = cached(prompt, f"k-{j}")
        assert third > 0.7 * total                     # the same key: the same rank as the second request
        outcomes[j] = second > 0.7 * total
    assert set(outcomes.values()) == {True, False}, outcomes
