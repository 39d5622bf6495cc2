"""The served path as users run it: a live `epserve serve` (ep 1 and ep 2) over HTTP with the official openai
client. Many concurrent greedy streams give exactly the in-process engine's tokens; chat streams equal their
non-streamed answers; stop strings hold on chat and completions, streamed and not; streams cancelled under load
leave every rank with zero KV blocks in use."""
import asyncio
import re
import time

import httpx
import openai
import pytest

from deploy.model_paths import resolve_model_dir
from deploy.tokenizer import Tokenizer
from engine.engine import EngineConfig, LLMEngine
from engine.sampling_params import SamplingParams
from model.loader import load_model
from cluster.process_group import free_port
from tests.deploy.live_server import live_server

NUM_STREAMS, MAX_TOKENS = 48, 48
QUESTION = "What is 2 + 3?"


@pytest.fixture(scope="module", params=[1, 2], ids=["ep1", "ep2"])
def server(request):
    metrics_port = free_port("127.0.0.1")
    with live_server("--ep-size", str(request.param), "--metrics-port", str(metrics_port)) as (url, proc):
        yield url, f"http://127.0.0.1:{metrics_port}/metrics", request.param


@pytest.fixture(scope="module")
def demo():
    model_dir = resolve_model_dir("demo")
    return Tokenizer.from_model_dir(model_dir), load_model(model_dir)


def prompts(n: int) -> list[str]:
    words = ["cat", "moon", "tree", "lamp", "bird", "rock"]
    return [f"<|start|>user<|message|>{'Reverse the word ' + words[i % 6] if i % 2 else f'What is {i % 9} + {i % 4}?'}"
            f"<|end|><|start|>assistant" for i in range(n)]


def test_concurrent_greedy_streams_equal_in_process_generation(server, demo):
    url = server[0]
    tokenizer, model = demo
    texts = prompts(NUM_STREAMS)
    engine = LLMEngine(model, EngineConfig(max_num_seqs=64))
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    expected = [tokenizer.decode(outs[0].output_token_ids)
                for outs in engine.generate([tokenizer.encode(t) for t in texts], params)]

    async def stream(client, prompt):
        chunks = await client.completions.create(model=None, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
        text, usage = [], None
        async for chunk in chunks:
            text += [c.text for c in chunk.choices]
            usage = chunk.usage or usage
        return "".join(text), usage

    async def run():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", timeout=300) as client:
            return await asyncio.gather(*(stream(client, p) for p in texts))
    got = asyncio.run(run())
    assert [text for text, _ in got] == expected
    assert all(usage.completion_tokens == MAX_TOKENS for _, usage in got)


def test_chat_streams_equal_their_non_streamed_answers(server):
    url = server[0]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
    for question in (QUESTION, "Reverse the word lamp."):
        messages = [{"role": "user", "content": question}]
        plain = client.chat.completions.create(model=None, messages=messages, temperature=0).choices[0]
        content, reasoning = [], []
        for chunk in client.chat.completions.create(model=None, messages=messages, temperature=0, stream=True):
            for c in chunk.choices:
                content.append(c.delta.content or "")
                reasoning.append(getattr(c.delta, "reasoning_content", None) or "")
        assert "".join(content) == plain.message.content and plain.message.content
        assert "".join(reasoning) == plain.message.reasoning_content


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_stop_strings_on_chat_and_completions(server, stream):
    url = server[0]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
    messages = [{"role": "user", "content": QUESTION}]
    full = client.chat.completions.create(model=None, messages=messages, temperature=0).choices[0].message
    assert "=" in full.reasoning_content                          # the demo model reasons "2 + 3 = 5."
    cut = full.reasoning_content[:full.reasoning_content.index("=")]
    if stream:
        reasoning, content, finish = "", "", None
        for chunk in client.chat.completions.create(model=None, messages=messages, temperature=0, stop=["="],
                                                    stream=True):
            for c in chunk.choices:
                reasoning += getattr(c.delta, "reasoning_content", None) or ""
                content += c.delta.content or ""
                finish = c.finish_reason or finish
    else:
        choice = client.chat.completions.create(model=None, messages=messages, temperature=0, stop=["="]).choices[0]
        reasoning, content, finish = choice.message.reasoning_content, choice.message.content or "", \
            choice.finish_reason
    assert (reasoning, content, finish) == (cut, "", "stop")

    prompt = prompts(1)[0]
    whole = client.completions.create(model=None, prompt=prompt, max_tokens=32, temperature=0).choices[0].text
    assert "=" in whole
    if stream:
        parts = list(client.completions.create(model=None, prompt=prompt, max_tokens=32, temperature=0, stop="=",
                                               stream=True))
        text = "".join(c.text for p in parts for c in p.choices)
        finish = [c.finish_reason for p in parts for c in p.choices if c.finish_reason][-1]
    else:
        choice = client.completions.create(model=None, prompt=prompt, max_tokens=32, temperature=0,
                                           stop="=").choices[0]
        text, finish = choice.text, choice.finish_reason
    assert (text, finish) == (whole[:whole.index("=")], "stop")


def kv_usage_by_rank(metrics_url: str) -> dict[str, float]:
    lines = httpx.get(metrics_url, timeout=10).text.splitlines()
    found = {}
    for line in lines:
        if line.startswith("ray_epserve_kv_cache_usage_perc{"):
            rank = re.search(r'rank="(\d+)"', line).group(1)
            found[rank] = float(line.rsplit(" ", 1)[1])
    return found


def test_streams_cancelled_under_load_free_every_rank_s_kv_blocks(server):
    url, metrics_url, ep_size = server

    async def leave_after(client, i: int, chunks: int) -> int:
        body = {"prompt": prompts(i + 1)[i], "max_tokens": 2000, "temperature": 0, "ignore_eos": True,
                "stream": True}
        seen = 0
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= chunks:
                    return seen                    # leaving the block closes the connection mid-stream
        return seen

    async def run():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(*(leave_after(client, i, 5 + i % 7) for i in range(24)))
    assert all(n >= 5 for n in asyncio.run(run()))
    deadline, usage = time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        usage = kv_usage_by_rank(metrics_url)
        if usage and all(v == 0 for v in usage.values()):
            break
        time.sleep(1)
    assert len(usage) == ep_size and all(v == 0 for v in usage.values()), usage
    assert openai.OpenAI(base_url=f"{url}/v1", api_key="none").completions.create(     # and it still serves
        model=None, prompt="2 + 3", max_tokens=4).usage.completion_tokens == 4


def test_tokenize_counts_what_chat_bills_and_detokenize_inverts_it(server):
    url = server[0]
    messages = [{"role": "user", "content": QUESTION}]
    usage = openai.OpenAI(base_url=f"{url}/v1", api_key="none").chat.completions.create(
        model=None, messages=messages, temperature=0, max_tokens=4).usage
    tokenized = httpx.post(f"{url}/tokenize", json={"messages": messages}).json()
    assert tokenized["count"] == usage.prompt_tokens == len(tokenized["tokens"])
    models = httpx.get(f"{url}/v1/models").json()["data"][0]
    assert tokenized["max_model_len"] == models["max_model_len"]
    text = httpx.post(f"{url}/detokenize", json={"tokens": tokenized["tokens"]}).json()["prompt"]
    assert text.endswith("<|start|>assistant") and QUESTION in text
    assert httpx.post(f"{url}/detokenize", json={"tokens": [-1]}).status_code == 400
    assert httpx.get(f"{url}/version").json()["version"]


def test_logit_bias_min_tokens_and_penalties_change_what_is_generated(server):
    url = server[0]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
    prompt = prompts(1)[0]
    plain = client.completions.create(model=None, prompt=prompt, max_tokens=40, temperature=0, logprobs=1)
    first = plain.choices[0].logprobs.tokens[0]
    (first_id,) = httpx.post(f"{url}/tokenize", json={"prompt": first}).json()["tokens"]
    biased = client.completions.create(model=None, prompt=prompt, max_tokens=3, temperature=0, logprobs=1,
                                       logit_bias={str(first_id): -100})
    assert biased.choices[0].logprobs.tokens[0] != first                   # the greedy first token moved
    natural = plain.usage.completion_tokens
    assert plain.choices[0].finish_reason == "stop" and natural < 40         # the demo answer ends by itself
    held = client.completions.create(model=None, prompt=prompt, max_tokens=40, temperature=0,
                                     extra_body={"min_tokens": natural + 5})
    assert held.usage.completion_tokens >= natural + 5                       # its end token was held off
    # penalties reach the ranks' sampler (their arithmetic: tests/engine/test_logits_shaper.py); the demo model is
    # too sure of its short answers for them to change it, so only acceptance is checked here
    repeated = client.completions.create(model=None, prompt=prompt, max_tokens=40, temperature=0,
                                         frequency_penalty=2.0, presence_penalty=2.0,
                                         extra_body={"repetition_penalty": 1.5, "min_p": 0.1})
    assert repeated.choices[0].finish_reason in ("stop", "length") and repeated.usage.completion_tokens > 0
    with pytest.raises(openai.BadRequestError, match="out of range"):
        client.completions.create(model=None, prompt=prompt, max_tokens=3, logit_bias={"999999999": -100})


def test_continuous_usage_stats_put_the_usage_so_far_on_every_chunk(server):
    url = server[0]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = [c for c in client.completions.create(model=None, prompt=prompts(1)[0], max_tokens=12, temperature=0,
                                                   stream=True, stream_options=options)]
    with_text = [c for c in chunks if c.choices]
    assert with_text and all(c.usage is not None for c in with_text)
    counts = [c.usage.completion_tokens for c in with_text]
    assert counts == sorted(counts) and counts[-1] == chunks[-1].usage.completion_tokens    # grows to the total
    assert all(c.usage.prompt_tokens == chunks[-1].usage.prompt_tokens for c in with_text)
    chat = [c for c in client.chat.completions.create(model=None, messages=[{"role": "user", "content": QUESTION}],
                                                       temperature=0, stream=True, stream_options=options)]
    assert all(c.usage is not None for c in chat)
    plain = [c for c in client.chat.completions.create(model=None, messages=[{"role": "user", "content": QUESTION}],
                                                        temperature=0, stream=True,
                                                        stream_options={"include_usage": True})]
    assert all(c.usage is None for c in plain[:-1]) and plain[-1].usage is not None
