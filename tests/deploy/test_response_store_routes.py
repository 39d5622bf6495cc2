"""Stored responses over HTTP on the app with a FakeBackend and an in-memory store: `previous_response_id` renders the
stored conversation (earlier reasoning dropped after a final answer, kept after a tool call), retrieve / delete /
input_items with OpenAI's bodies and pagination, `store: false`, a response saved before its stream completes, a
failing store as 503, and the 400s for what a stored response cannot do here."""
import asyncio
import json

import pytest

from deploy.openai.errors import queue_full_error
from deploy.harmony.render import RenderOptions, render_responses
from deploy.openai.response_store_memory import MemoryResponseStore
from deploy.openai.responses_routes import GATEWAY_HEADER
from tests.deploy.gateway_fixtures import (MODEL, TOOL_CALL, FakeBackend, asgi_call, fake, make_app,  # noqa: F401
                                           make_ctx, sse_events, tiny_dir, tok)

TOOLS = [{"type": "function", "name": "get_weather", "parameters": {"type": "object",
                                                                     "properties": {"city": {"type": "string"}}}}]


def new_store():
    return MemoryResponseStore(max_entries=100, max_bytes=1 << 20, ttl_s=600)


@pytest.fixture
def stored(fake):
    """(make: texts/kwargs -> (TestClient, FakeBackend, store)) with a fresh in-memory store."""
    def make(*args, **kw):
        store = new_store()
        client, backend = fake(*args, ctx_kw={"response_store": store}, **kw)
        return client, backend, store
    return make


def create(client, **fields):
    r = client.post("/v1/responses", json={"model": MODEL, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def assert_openai_error(r, status, message, param=None):
    assert r.status_code == status, r.text
    assert r.json() == {"error": {"message": message, "type": "invalid_request_error", "param": param,
                                  "code": status}}


def test_second_turn_sees_the_first_without_its_reasoning(stored, tok):
    client, backend, _ = stored()
    first = create(client, input="What is 2 + 3?", instructions="Be brief.")
    second = create(client, input="And 3 + 4?", previous_response_id=first["id"])
    assert second["previous_response_id"] == first["id"] and second["store"] is True and first["store"] is True
    # the stored turn, as if the client had sent the whole conversation; its instructions are not carried over
    explicit = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "Hello there!"},
                {"role": "user", "content": "And 3 + 4?"}]
    assert backend.requests[1].prompt_token_ids == render_responses(tok, explicit, RenderOptions()).token_ids
    assert "The user greets me" not in tok.decode(backend.requests[1].prompt_token_ids)
    assert second["usage"]["input_tokens"] == len(backend.requests[1].prompt_token_ids)
    items = client.get(f"/v1/responses/{second['id']}/input_items", params={"order": "asc"}).json()["data"]
    assert [i["type"] for i in items] == ["message", "reasoning", "message", "message"]
    assert [i["id"] for i in items[1:3]] == [o["id"] for o in first["output"]]
    assert items[0]["content"] == [{"type": "input_text", "text": "What is 2 + 3?"}] and items[0]["role"] == "user"
    assert items[0]["id"].startswith("msg_") and items[3]["content"][0]["text"] == "And 3 + 4?"


def test_a_tool_call_turn_keeps_its_reasoning(stored, tok):
    client, backend, _ = stored(TOOL_CALL)
    first = create(client, input="Weather in Oslo?", tools=TOOLS)
    call = first["output"][-1]
    assert call["type"] == "function_call"
    create(client, previous_response_id=first["id"], tools=TOOLS,
           input=[{"type": "function_call_output", "call_id": call["call_id"], "output": '{"temp": 20}'}])
    prompt = tok.decode(backend.requests[1].prompt_token_ids)
    assert "<|channel|>analysis<|message|>Need the weather.<|end|>" in prompt
    assert '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Oslo"}<|call|>' \
        in prompt
    assert '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"temp": 20}<|end|>' in prompt


def test_retrieve_and_delete(stored):
    client, _, _ = stored()
    body = create(client, input="Hi", metadata={"k": "v"})
    got = client.get(f"/v1/responses/{body['id']}")
    assert got.status_code == 200 and got.json() == body and got.headers[GATEWAY_HEADER].startswith("pid-")
    deleted = client.delete(f"/v1/responses/{body['id']}")
    assert deleted.json() == {"id": body["id"], "object": "response", "deleted": True}
    missing = f"Response with id '{body['id']}' not found."
    assert_openai_error(client.get(f"/v1/responses/{body['id']}"), 404, missing)
    assert_openai_error(client.delete(f"/v1/responses/{body['id']}"), 404, missing)
    assert_openai_error(client.get(f"/v1/responses/{body['id']}/input_items"), 404, missing)
    r = client.post("/v1/responses", json={"input": "Hi", "previous_response_id": body["id"]})
    assert_openai_error(r, 400, f"Previous response with id '{body['id']}' not found.", "previous_response_id")


def test_store_false_is_not_kept(stored):
    client, _, store = stored()
    body = create(client, input="Hi", store=False)
    assert body["store"] is False and len(store) == 0
    assert_openai_error(client.get(f"/v1/responses/{body['id']}"), 404, f"Response with id '{body['id']}' not found.")


def test_without_a_store_nothing_is_kept(fake):
    client, _ = fake()
    body = create(client, input="Hi")
    assert body["store"] is False
    assert client.get(f"/v1/responses/{body['id']}").status_code == 404
    assert client.post("/v1/responses", json={"input": "x", "previous_response_id": body["id"]}).status_code == 400


def test_a_stream_is_stored_before_it_completes(tok):
    seen: list[dict] = []

    class Watching(MemoryResponseStore):
        completed_before_put = None

        async def put(self, key, value):
            self.completed_before_put = any(b"response.completed" in m.get("body", b"") for m in seen)
            await super().put(key, value)
    store = Watching(max_entries=10, max_bytes=1 << 20, ttl_s=60)
    app = make_app(make_ctx(FakeBackend(tok), tok, tok.harmony_stop_ids(), response_store=store))
    sent = asyncio.run(asgi_call(app, "/v1/responses", {"input": "Hi", "stream": True},
                                 disconnect=lambda messages: seen.__setitem__(slice(None), messages) or False))
    text = b"".join(m.get("body", b"") for m in sent).decode()
    final = json.loads(sse_events(text)[-1][1])
    assert final["type"] == "response.completed" and store.completed_before_put is False
    assert json.loads(asyncio.run(store.get(final["response"]["id"])))["response"] == final["response"]


def test_input_items_pages(stored):
    client, _, _ = stored()
    input = [{"type": "message", "role": r, "content": f"turn {n}", "id": f"m{n}"}
             for n, r in enumerate(["user", "assistant", "user", "assistant", "user"], start=1)]
    rid = create(client, input=input)["id"]

    def page(**params):
        r = client.get(f"/v1/responses/{rid}/input_items", params=params)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list"
        ids = [i["id"] for i in body["data"]]
        assert (body["first_id"], body["last_id"]) == ((ids[0], ids[-1]) if ids else (None, None))
        return ids, body["has_more"]
    assert page() == (["m5", "m4", "m3", "m2", "m1"], False)                   # newest first by default
    assert page(limit=2) == (["m5", "m4"], True)
    assert page(limit=2, after="m4") == (["m3", "m2"], True)
    assert page(limit=2, after="m2") == (["m1"], False)
    assert page(order="asc", after="m3") == (["m4", "m5"], False)
    assert page(limit=2, before="m2") == (["m4", "m3"], True)                   # the ones just before m2
    assert page(order="asc", after="m1", before="m4") == (["m2", "m3"], False)
    assert page(order="asc", after="m5") == ([], False)
    items = client.get(f"/v1/responses/{rid}/input_items", params={"order": "asc"}).json()["data"]
    assert items[1] == {"type": "message", "role": "assistant", "id": "m2", "status": "completed",
                        "content": [{"type": "output_text", "text": "turn 2"}]}
    for params, param in [({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"limit": "x"}, "limit"),
                          ({"order": "up"}, "order"), ({"after": "nope"}, "after"), ({"before": "nope"}, "before"),
                          ({"include": "message.input_image.image_url"}, "include")]:
        r = client.get(f"/v1/responses/{rid}/input_items", params=params)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (params, r.text)


def test_a_failing_store_is_a_503_and_the_stream_fails(fake):
    class Down(MemoryResponseStore):
        async def put(self, key, value):
            raise ConnectionError("refused")

        async def get(self, key):
            raise ConnectionError("refused")
    client, _ = fake(ctx_kw={"response_store": Down(max_entries=1, max_bytes=1, ttl_s=1)})
    r = client.post("/v1/responses", json={"input": "Hi"})
    assert r.status_code == 503 and "response store is unavailable (ConnectionError)" in r.json()["error"]["message"]
    events = [json.loads(d) for _, d in sse_events(client.post("/v1/responses", json={"input": "Hi",
                                                                                      "stream": True}).text)]
    assert [e["type"] for e in events[-3:]] == ["response.output_item.done", "error", "response.failed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert client.post("/v1/responses", json={"input": "x", "previous_response_id": "r"}).status_code == 503
    assert client.get("/v1/responses/r").status_code == 503
    assert client.post("/v1/responses", json={"input": "Hi", "store": False}).status_code == 200


def test_what_a_stored_response_cannot_do_here(stored):
    client, _, _ = stored()
    rid = create(client, input="Hi")["id"]
    for query in ({"stream": "true"}, {"starting_after": "3"}, {"include": "reasoning.encrypted_content"}):
        r = client.get(f"/v1/responses/{rid}", params=query)
        assert r.status_code == 400, (query, r.text)
    assert client.get(f"/v1/responses/{rid}", params={"stream": "false"}).status_code == 200
    r = client.post(f"/v1/responses/{rid}/cancel")
    assert r.status_code == 400 and "background" in r.json()["error"]["message"]
    assert client.post("/v1/responses/resp_nope/cancel").status_code == 404
    assert client.post("/v1/responses", json={"input": "Hi", "background": True}).status_code == 400


def test_queue_full_is_not_stored(stored):
    client, _, store = stored(error=queue_full_error(1))
    assert client.post("/v1/responses", json={"input": "Hi"}).status_code == 429 and len(store) == 0


def test_stored_responses_need_the_api_key(fake):
    client, _ = fake(ctx_kw={"response_store": new_store(), "api_keys": frozenset({"sk-k"})})
    auth = {"Authorization": "Bearer sk-k"}
    rid = client.post("/v1/responses", json={"input": "Hi"}, headers=auth).json()["id"]
    for method, path in [("GET", f"/v1/responses/{rid}"), ("GET", f"/v1/responses/{rid}/input_items"),
                         ("DELETE", f"/v1/responses/{rid}"), ("POST", f"/v1/responses/{rid}/cancel")]:
        assert client.request(method, path).status_code == 401, (method, path)
    assert client.get(f"/v1/responses/{rid}", headers=auth).json()["id"] == rid


def test_a_stored_response_belongs_to_the_api_key_that_created_it(fake):
    """Another key gets OpenAI's 404 for every route and a 400 for previous_response_id, as if the id did not exist;
    the owner still sees it, and another key's delete removes nothing. The key itself is never stored."""
    store = new_store()
    client, backend = fake(ctx_kw={"response_store": store, "api_keys": frozenset({"sk-alice", "sk-bob"})})
    alice, bob = {"Authorization": "Bearer sk-alice"}, {"Authorization": "Bearer sk-bob"}
    rid = client.post("/v1/responses", json={"input": "My secret"}, headers=alice).json()["id"]
    not_found = f"Response with id '{rid}' not found."
    for method, path in [("GET", f"/v1/responses/{rid}"), ("GET", f"/v1/responses/{rid}/input_items"),
                         ("DELETE", f"/v1/responses/{rid}"), ("POST", f"/v1/responses/{rid}/cancel")]:
        assert_openai_error(client.request(method, path, headers=bob), 404, not_found)
    r = client.post("/v1/responses", json={"input": "And?", "previous_response_id": rid}, headers=bob)
    assert_openai_error(r, 400, f"Previous response with id '{rid}' not found.", "previous_response_id")
    assert len(backend.requests) == 1                          # bob's turn never reached the model
    assert client.get(f"/v1/responses/{rid}", headers=alice).json()["id"] == rid
    second = client.post("/v1/responses", json={"input": "And?", "previous_response_id": rid}, headers=alice)
    assert second.status_code == 200, second.text
    assert "sk-alice" not in json.dumps(store.__dict__, default=str)
    assert client.delete(f"/v1/responses/{rid}", headers=alice).json()["deleted"] is True
