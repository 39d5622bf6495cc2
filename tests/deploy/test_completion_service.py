"""/v1/completions: text and token-id prompts, several prompts x n, stop ids kept out of the text, stop strings,
logprobs, streaming (incremental UTF-8-safe text == the plain text), and the tiny engine end to end."""
from deploy.openai.completion_service import IncrementalText
from tests.deploy.gateway_fixtures import MODEL, fake, local, sse_json, tiny_dir, tiny_model, tok  # noqa: F401

HELLO = "Hello world, nice day<|return|>"


def complete(client, **fields):
    return client.post("/v1/completions", json={"model": MODEL, "prompt": "Say hi", **fields})


def streamed_text(chunks, index=0):
    return "".join(c["choices"][0]["text"] for c in chunks if c["choices"] and c["choices"][0]["index"] == index)


def test_text_prompt_plain(fake, tok):
    client, backend = fake(HELLO)
    body = complete(client, max_tokens=50).json()
    (request,) = backend.requests
    assert body["id"].startswith("cmpl-") and request.request_id == body["id"]
    assert body["object"] == "text_completion" and body["model"] == MODEL
    assert request.prompt_token_ids == tok.encode("Say hi")          # no harmony around a raw prompt
    assert request.params.stop_token_ids == tok.harmony_stop_ids()   # ctx.eos_token_ids
    (choice,) = body["choices"]
    assert choice["text"] == "Hello world, nice day"                 # the matched stop id is not text
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == tok.token_id("<|return|>")
    n_out = len(tok.encode(HELLO))
    assert body["usage"]["prompt_tokens"] == len(tok.encode("Say hi")) and body["usage"]["completion_tokens"] == n_out


def test_default_max_tokens_and_ignore_eos(fake):
    client, backend = fake(HELLO)
    assert complete(client).status_code == 200 and backend.requests[0].params.max_tokens == 16
    complete(client, ignore_eos=True, stop_token_ids=[7])
    assert backend.requests[1].params.stop_token_ids == (7,)


def test_several_prompts_times_n(fake, tok):
    client, backend = fake([HELLO, "Other text<|return|>"])
    body = complete(client, prompt=["a b", "c"], n=2).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in body["choices"]] == ["Hello world, nice day", "Other text"] * 2
    ids = [r.request_id for r in backend.requests]
    assert len(set(ids)) == 2 and all(i.startswith(body["id"] + "-") for i in ids)
    assert body["usage"]["prompt_tokens"] == len(tok.encode("a b")) + len(tok.encode("c"))
    assert body["usage"]["completion_tokens"] == 2 * (len(tok.encode(HELLO)) + len(tok.encode("Other text<|return|>")))
    chunks = sse_json(complete(client, prompt=["a b", "c"], n=2, stream=True).text)
    assert [streamed_text(chunks, i) for i in range(4)] == [c["text"] for c in body["choices"]]
    finishes = sorted(c["choices"][0]["index"] for c in chunks if c["choices"][0].get("finish_reason"))
    assert finishes == [0, 1, 2, 3]


def test_token_id_prompts(fake):
    client, backend = fake(HELLO)
    assert complete(client, prompt=[5, 6, 7]).status_code == 200
    assert complete(client, prompt=[[5, 6], [8]]).status_code == 200
    assert [r.prompt_token_ids for r in backend.requests] == [[5, 6, 7], [5, 6], [8]]


def test_stop_string_plain_and_streamed(fake):
    client, _ = fake(HELLO)
    choice = complete(client, stop=["nice"], max_tokens=50).json()["choices"][0]
    assert choice["text"] == "Hello world, " and choice["stop_reason"] == "nice"
    chunks = sse_json(complete(client, stop=["nice"], max_tokens=50, stream=True).text)
    assert streamed_text(chunks) == "Hello world, " and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    kept = complete(client, stop=["nice"], include_stop_str_in_output=True, max_tokens=50).json()
    assert kept["choices"][0]["text"] == "Hello world, nice"


def test_logprobs_in_the_completions_shape(fake, tok):
    client, _ = fake(HELLO)
    choice = complete(client, logprobs=2, max_tokens=50).json()["choices"][0]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"]                    # the stop token is not listed
    assert lp["token_logprobs"] == [-0.25] * len(lp["tokens"])
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    assert all(len(alts) == 2 for alts in lp["top_logprobs"])
    chunks = sse_json(complete(client, logprobs=1, max_tokens=50, stream=True).text)
    tokens = [t for c in chunks for t in (c["choices"][0].get("logprobs") or {}).get("tokens", [])]
    offsets = [o for c in chunks for o in (c["choices"][0].get("logprobs") or {}).get("text_offset", [])]
    assert tokens == lp["tokens"] and offsets == lp["text_offset"]
    assert complete(client).json()["choices"][0]["logprobs"] is None


def test_stream_framing_and_usage(fake):
    client, _ = fake(HELLO)
    plain = complete(client, max_tokens=50).json()
    r = complete(client, max_tokens=50, stream=True, stream_options={"include_usage": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = sse_json(r.text)
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "text_completion" for c in chunks)
    assert streamed_text(chunks) == plain["choices"][0]["text"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == \
        plain["usage"]["completion_tokens"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


def test_incremental_text_never_splits_a_character(tok):
    text = "naïve café 日本語 ok 🙂!"
    ids = tok.encode(text)
    inc = IncrementalText(tok)
    pieces = [inc.push([i]) for i in ids] + [inc.push([], final=True)]
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)


def test_engine_completions_end_to_end(local, tok):
    client, engine, _ = local
    r = complete(client, prompt="The capital of", max_tokens=6, temperature=0, logprobs=0)
    assert r.status_code == 200, r.text
    body = r.json()
    choice, usage = body["choices"][0], body["usage"]
    assert usage["prompt_tokens"] == len(tok.encode("The capital of"))
    stopped_on_id = choice["finish_reason"] == "stop"
    assert usage["completion_tokens"] == len(choice["logprobs"]["tokens"]) + stopped_on_id <= 6
    assert choice["finish_reason"] in ("stop", "length")
    chunks = sse_json(complete(client, prompt="The capital of", max_tokens=6, temperature=0, stream=True).text)
    assert streamed_text(chunks) == choice["text"]
    ids_body = complete(client, prompt=tok.encode("The capital of"), max_tokens=6, temperature=0).json()
    assert ids_body["choices"][0]["text"] == choice["text"]
    assert not engine.has_unfinished()


def test_engine_rejects_token_ids_outside_the_vocabulary(local):
    client, engine, _ = local
    for stream in (False, True):
        r = complete(client, prompt=[1, 5000], stream=stream)
        assert r.status_code == 400 and "out of range" in r.json()["error"]["message"]
    assert not engine.has_unfinished()
