"""usage.prompt_tokens_details.cached_tokens through a live `epserve serve --enable-prefix-caching`: a repeated
conversation reports the prompt tokens the prefix cache served, on chat (plain and streamed usage), completions and
Responses; a first-seen prompt reports 0."""
import httpx
import openai
import pytest

from tests.deploy.live_server import live_server

HISTORY = [{"role": "user", "content": "Reverse the word lamp."},
           {"role": "assistant", "content": "pmal"},
           {"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def url():
    with live_server("--ep-size", "1", "--enable-prefix-caching") as (base, _):
        yield base


def test_repeated_prompts_report_cached_tokens(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
    first = client.chat.completions.create(model=None, messages=HISTORY, temperature=0, max_tokens=8).usage
    assert first.prompt_tokens_details.cached_tokens == 0
    again = client.chat.completions.create(model=None, messages=HISTORY, temperature=0, max_tokens=8).usage
    assert 16 <= again.prompt_tokens_details.cached_tokens < again.prompt_tokens      # whole blocks, never all
    streamed = list(client.chat.completions.create(model=None, messages=HISTORY, temperature=0, max_tokens=8,
                                                   stream=True, stream_options={"include_usage": True}))
    assert streamed[-1].usage.prompt_tokens_details.cached_tokens == again.prompt_tokens_details.cached_tokens

    prompt = "<|start|>user<|message|>" + "Reverse the word tree. " * 6 + "<|end|><|start|>assistant"
    cold = client.completions.create(model=None, prompt=prompt, max_tokens=4).usage
    warm = client.completions.create(model=None, prompt=prompt, max_tokens=4).usage
    assert cold.prompt_tokens_details.cached_tokens == 0 < warm.prompt_tokens_details.cached_tokens

    body = {"input": HISTORY, "max_output_tokens": 8, "temperature": 0}
    usage = httpx.post(f"{url}/v1/responses", json=body, timeout=60).json()["usage"]
    assert usage["input_tokens_details"]["cached_tokens"] == again.prompt_tokens_details.cached_tokens
