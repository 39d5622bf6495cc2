"""Acceptance (issue 13): `epserve make-tiny --preset 120b-attention` (gpt-oss-120b's attention geometry and vocab,
small hidden and experts) served by a live `epserve serve` with no KV or length flags: a 2,000-token prompt, then 16
concurrent 500-token prompts with `stop`, over HTTP with the openai client.

Slow on CPU whatever the hidden size: 64 query heads of 64 make attention as wide as the real model's, so a 2,000-token
prefill is ~0.6 TFLOP of attention (about a minute on 2 cores), and the 16 prompts several minutes.
"""
import asyncio
import subprocess
import sys
import time

import openai
import pytest
import torch

from tests.deploy.live_server import live_server

pytestmark = pytest.mark.slow
VOCAB = 201088
NEVER = "§never§"                    # a stop string no output contains: its requests are the references
STOPS = [" ", "e", "a", "o"]         # at most 4 (OpenAI's limit); some occurs within a few tokens of English BPE


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("real-shapes")
    model = root / "gpt-oss-120b-attention"
    made = subprocess.run([sys.executable, "-m", "deploy.cli", "make-tiny", str(model), "--preset", "120b-attention"],
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    with live_server(str(model), "--ep-size", "1", "--num-cpus", "4", timeout_s=300, log=root / "serve.log") as (
            url, _):
        yield url


def token_prompts(count: int, length: int, seed: int) -> list[list[int]]:
    return torch.randint(0, VOCAB, (count, length), generator=torch.Generator().manual_seed(seed)).tolist()


def test_max_model_len_is_what_the_default_kv_cache_holds(server):
    """No length flag: the ranks' 1 GiB (CPU default) holds the 64-sequence sliding pool and 4,688 full-attention
    tokens (tests/engine/test_kv_budget.py), and the gateway serves that length, not the model's 131072."""
    models = openai.OpenAI(base_url=f"{server}/v1", api_key="none").models.list()
    assert models.data[0].model_extra["max_model_len"] == 4688


def test_a_2000_token_prompt(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none", timeout=900)
    start = time.monotonic()
    r = client.completions.create(model=None, prompt=token_prompts(1, 2000, seed=1)[0], max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    print(f"2,000-token prompt + 8 tokens: {time.monotonic() - start:.1f} s")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (2000, 8)
    assert r.choices[0].finish_reason == "length"


def test_16_concurrent_500_token_prompts_with_stop(server):
    """8 prompts twice, all 16 at once: with stop strings that never occur (the reference) and with common ones. The
    second must stop at the first stop string of the reference text, with the text before it."""
    prompts = token_prompts(8, 500, seed=2)

    async def one(client, prompt, stop):
        r = await client.completions.create(model=None, prompt=prompt, max_tokens=16, temperature=0, stop=stop,
                                            extra_body={"ignore_eos": True})
        return r.choices[0], r.usage

    async def run():
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="none", timeout=900) as client:
            return await asyncio.gather(*(one(client, p, stop) for stop in ([NEVER], STOPS) for p in prompts))
    start = time.monotonic()
    results = asyncio.run(run())
    print(f"16 concurrent 500-token prompts + up to 16 tokens: {time.monotonic() - start:.1f} s")
    refs, stopped = results[:8], results[8:]
    for (ref, ref_usage), (got, usage) in zip(refs, stopped):
        assert ref.finish_reason == "length" and ref_usage.completion_tokens == 16
        found = [i for i in (ref.text.find(s) for s in STOPS) if i >= 0]
        assert found, f"no stop string in the reference {ref.text!r}: the check would be empty"
        cut = min(found)
        assert got.finish_reason == "stop" and got.text == ref.text[:cut], (ref.text, got.text)
        assert usage.prompt_tokens == 500 and usage.completion_tokens <= 16
