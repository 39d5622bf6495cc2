"""Cache-aware routing through a live `epserve serve --replicas 2 --enable-prefix-caching` (ep 1 per replica: two
replicas x two ranks is too slow on this machine's CPUs; one gateway: each gateway's router remembers only what it
sent, and a turn that follows the last within the replicas' report period (1 s) through another gateway is routed
by power of two, README): later turns of multi-turn conversations land where their prefix is cached, and `prompt_cache_key` pins a conversation's replica even against another replica's cache."""
import openai
import pytest

from tests.deploy.live_server import live_server


@pytest.fixture(scope="module")
def client():
    with live_server("--replicas", "2", "--ep-size", "1", "--enable-prefix-caching",
                     "--gateway-replicas", "1") as (base, _):
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="none", timeout=120)


def system_prompt(i: int) -> str:
    return f"Conversation {i}. " + " ".join(f"rule {i}.{k}: answer briefly and reverse words." for k in range(24))


def ask(client, messages, **extra):
    r = client.chat.completions.create(model=None, messages=messages, temperature=0, max_tokens=6, **extra)
    return r.choices[0].message.content or "", r.usage


def test_later_turns_are_served_from_cache(client):
    for conv in range(4):
        messages = [{"role": "system", "content": system_prompt(conv)}]
        for turn in range(3):
            messages.append({"role": "user", "content": f"Turn {turn}: reverse the word lamp{turn}."})
            answer, usage = ask(client, messages)
            cached = usage.prompt_tokens_details.cached_tokens
            if turn == 0:                          # only the chat template's shared preamble
                assert cached < 0.3 * usage.prompt_tokens, (conv, cached, usage.prompt_tokens)
            else:                                  # everything but the new user message and the last partial block
                assert cached >= 0.7 * usage.prompt_tokens, (conv, turn, cached, usage.prompt_tokens)
            messages.append({"role": "assistant", "content": answer})


def test_prompt_cache_key_pins_the_replica(client):
    """Prompt j first runs under key "home" (on its owner replica); rerun under key "k-j", it is cached exactly when
    "k-j" is owned by the same replica: keys, not caches, decide, and each key always picks the same replica."""
    outcomes = {}
    for j in range(8):
        messages = [{"role": "user", "content": system_prompt(100 + j)}]
        first = ask(client, messages, extra_body={"prompt_cache_key": "home"})[1]
        assert first.prompt_tokens_details.cached_tokens < 0.3 * first.prompt_tokens
        second = ask(client, messages, extra_body={"prompt_cache_key": f"k-{j}"})[1].prompt_tokens_details.cached_tokens
        third = ask(client, messages, extra_body={"prompt_cache_key": f"k-{j}"})[1].prompt_tokens_details.cached_tokens
        assert third > 0.7 * first.prompt_tokens                   # the same key: the same replica as the second
        outcomes[j] = second > 0.7 * first.prompt_tokens
    assert set(outcomes.values()) == {True, False}, outcomes       # some keys live on the other replica

    # `user` pins too when there is no prompt_cache_key
    messages = [{"role": "user", "content": system_prompt(200)}]
    ask(client, messages, user="alice")
    assert ask(client, messages + [{"role": "assistant", "content": "x"}, {"role": "user", "content": "more"}],
               user="alice")[1].prompt_tokens_details.cached_tokens > 100
