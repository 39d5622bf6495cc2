"""The live stack with the official openai client: Serve app (Gateway + ModelServer, EP 2, the trained demo
model), /health readiness, overload, disconnects and a bad-input matrix. Scaling: test_serve_scaling.py."""
import concurrent.futures
import json
import random
import time

import httpx
import openai
import pytest

from deploy import demo_tasks
from tests.deploy.serve_fixtures import serve_app

KEY, OTHER_KEY = "sk-e2e-test", "sk-e2e-other"
ARGS = {"model": "demo", "ep_size": 2, "num_replicas": 1, "api_keys": [KEY, OTHER_KEY], "max_model_len": 256,
        "max_ongoing_requests": 2, "max_queued_requests": 2, "max_request_bytes": 65536, "collective_timeout_s": 30}


@pytest.fixture(scope="module")
def url(serve_url):
    with serve_app(ARGS, serve_url) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


def server_stats(ray_cluster) -> dict:
    from ray import serve
    return serve.get_deployment_handle("ModelServer", app_name="epserve").stats.remote().result()


def ask(client, question: str, max_tokens: int = 60, **kw):
    return client.chat.completions.create(model="gpt-oss-demo", messages=[{"role": "user", "content": question}],
                                          temperature=0, max_tokens=max_tokens, **kw)


def test_health_is_ready_once_a_model_server_replica_runs(url):
    """503 with OpenAI's body while the ModelServer starts (the gateway is up first), then 200 `{}`; no API key."""
    deadline = time.monotonic() + 120
    while (r := httpx.get(f"{url}/health", timeout=10)).status_code != 200 and time.monotonic() < deadline:
        assert r.status_code == 503 and r.json()["error"]["code"] == 503, r.text
        time.sleep(0.5)
    assert r.status_code == 200 and r.json() == {}


def test_models_and_chat(client):
    assert [m.id for m in client.models.list().data] == ["gpt-oss-demo"]
    r = ask(client, "What is 2 + 3?")
    msg = r.choices[0].message
    assert msg.content.strip() == "5"
    assert msg.model_extra.get("reasoning_content")                  # the analysis channel, kept apart
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_chat_equals_plain(client):
    plain = ask(client, "Reverse the word lamp.").choices[0].message
    chunks = list(ask(client, "Reverse the word lamp.", stream=True, stream_options={"include_usage": True}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                        for c in chunks if c.choices)
    assert content == plain.content and reasoning == plain.model_extra["reasoning_content"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage is not None and not chunks[-1].choices


def test_completions_and_responses(client):
    prompt = demo_tasks.prompt_text(demo_tasks.Example("add", "What is 4 + 4?", "", ""))
    c = client.completions.create(model="gpt-oss-demo", prompt=prompt, max_tokens=40, temperature=0)
    assert demo_tasks.parse_final(c.choices[0].text + "<|return|>") in ("8", None) and c.usage.completion_tokens > 0
    r = client.responses.create(model="gpt-oss-demo", input="What is 3 + 4?", temperature=0, max_output_tokens=60)
    assert r.output_text.strip() == "7" and r.usage.output_tokens > 0
    events = list(client.responses.create(model="gpt-oss-demo", input="What is 3 + 4?", temperature=0,
                                          max_output_tokens=60, stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta").strip() == "7"


def test_a_stored_response_is_visible_only_to_its_api_key(client, url):
    """Another API key's client is told the response does not exist (404, and 400 as previous_response_id); the
    key that stored it continues the conversation."""
    first = client.responses.create(model="gpt-oss-demo", input="What is 2 + 3?", max_output_tokens=40)
    other = openai.OpenAI(base_url=f"{url}/v1", api_key=OTHER_KEY, max_retries=0, timeout=60)
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(first.id)
    with pytest.raises(openai.BadRequestError, match="previous_response_id|Previous response"):
        other.responses.create(model="gpt-oss-demo", input="And 3 + 4?", previous_response_id=first.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(first.id)
    second = client.responses.create(model="gpt-oss-demo", input="And 3 + 4?", previous_response_id=first.id,
                                     max_output_tokens=40)
    assert second.previous_response_id == first.id and client.responses.retrieve(first.id).id == first.id


def test_demo_model_answers_held_out_questions(client):
    rng = random.Random(987654)                                      # not the training or evaluation seed
    examples = [demo_tasks.sample(rng) for _ in range(20)]
    right = sum(ask(client, ex.question).choices[0].message.content.strip() == ex.answer for ex in examples)
    assert right >= 18, f"{right}/20"


BAD = [  # (description, method, path, body (dict, or raw str), headers, status)
    ("malformed json", "POST", "/v1/chat/completions", "{not json", {}, 400),
    ("deeply nested json", "POST", "/v1/chat/completions", "[" * 60_000, {}, 400),      # json.loads recursion
    ("nested beyond the depth limit", "POST", "/v1/chat/completions",
     '{"messages": ' + "[" * 80 + "]" * 80 + "}", {}, 400),
    ("lone surrogate in content", "POST", "/v1/chat/completions",
     '{"messages": [{"role": "user", "content": "\\ud800"}]}', {}, 400),
    ("lone surrogate in a stop string", "POST", "/v1/completions", '{"prompt": "x", "stop": ["\\udfff"]}', {}, 400),
    ("messages not a list", "POST", "/v1/chat/completions", {"messages": "hi"}, {}, 400),
    ("empty messages", "POST", "/v1/chat/completions", {"messages": []}, {}, 400),
    ("unknown role", "POST", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, {}, 400),
    ("missing content", "POST", "/v1/chat/completions", {"messages": [{"role": "user"}]}, {}, 400),
    ("negative max_tokens", "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                             "max_tokens": -1}, {}, 400),
    ("huge max_tokens", "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                         "max_tokens": 10 ** 9}, {}, 400),
    ("temperature type", "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                          "temperature": "hot"}, {}, 400),
    ("temperature range", "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                           "temperature": 9}, {}, 400),
    ("top_p range", "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                     "top_p": 0}, {}, 400),
    ("n too large", "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 1000},
     {}, 400),
    ("too many stops", "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                        "stop": [str(i) for i in range(20)]}, {}, 400),
    ("top_logprobs range", "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                            "logprobs": True, "top_logprobs": 50}, {}, 400),
    ("unsupported tool_choice", "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                                 "tool_choice": "required"}, {}, 400),
    ("unknown model", "POST", "/v1/chat/completions", {"model": "gpt-5", "messages": [{"role": "user",
                                                                                     "content": "x"}]}, {}, 404),
    ("prompt beyond context", "POST", "/v1/chat/completions", {"messages": [{"role": "user",
                                                                            "content": "word " * 400}]}, {}, 400),
    ("prompt + max_tokens beyond context", "POST", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 250}, {}, 400),
    ("completions no prompt", "POST", "/v1/completions", {"max_tokens": 5}, {}, 400),
    ("completions bad token id type", "POST", "/v1/completions", {"prompt": [1, "a"]}, {}, 400),
    ("completions negative id", "POST", "/v1/completions", {"prompt": [-5]}, {}, 400),
    ("completions id beyond vocab", "POST", "/v1/completions", {"prompt": [10 ** 7]}, {}, 400),
    ("responses input wrong type", "POST", "/v1/responses", {"input": 5}, {}, 400),
    ("responses previous_response_id", "POST", "/v1/responses", {"input": "x", "previous_response_id": "r"}, {}, 400),
    ("bad api key", "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]},
     {"Authorization": "Bearer wrong"}, 401),
    ("no api key", "GET", "/v1/models", None, {"Authorization": ""}, 401),
    ("oversized body", "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 100_000}]},
     {}, 413),
    ("unknown route", "GET", "/v1/nothing", None, {}, 404),
    ("wrong method", "GET", "/v1/chat/completions", None, {}, 405),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_gets_an_openai_error(url, case):
    _, method, path, body, headers, status = case
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **headers}
    headers = {k: v for k, v in headers.items() if v}
    content = body if isinstance(body, str) else (json.dumps(body) if body is not None else None)
    r = httpx.request(method, url + path, content=content, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in r.text


def test_server_still_serves_after_bad_input(client):
    assert ask(client, "What is 1 + 1?").choices[0].message.content.strip() == "2"


def test_overload_gets_429_with_retry_after(url):
    body = {"prompt": "What is 2 + 2?", "max_tokens": 150, "stream": True, "ignore_eos": True}  # never stops early

    def one(_):
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
            _ = r.read()
            return r.status_code, r.headers.get("retry-after")
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(one, range(10)))
    codes = [c for c, _ in results]
    assert set(codes) <= {200, 429} and codes.count(200) >= 2 and 429 in codes, codes
    assert all(ra is not None and float(ra) > 0 for c, ra in results if c == 429)


def test_client_disconnect_frees_every_block(url, ray_cluster):
    body = {"prompt": "What is 2 + 2?", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert server_stats(ray_cluster)["in_flight"] == 1
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = server_stats(ray_cluster)
        if stats["in_flight"] == 0 and all(sum(r["blocks_used"].values()) == 0 for r in stats["ranks"]):
            break
        time.sleep(0.2)
    assert stats["in_flight"] == 0
    assert [r["blocks_used"] for r in stats["ranks"]] == [{k: 0 for k in r["blocks_used"]} for r in stats["ranks"]]
