"""Stored Responses on a live `epserve serve` (demo model) through the openai SDK.

With the default store (the app's ResponseStore deployment) and two Gateway replicas: a second turn with
`previous_response_id`, answered by the other gateway than the first turn (the `x-epserve-gateway` header names the
Serve replica that answered), is generated from the stored conversation: the same prompt tokens and the same greedy
answer as the whole conversation sent explicitly. Retrieval from both gateways, input items, a streamed turn,
`store: false`, delete, and the 404/400 bodies. With `--response-store redis://...` (a redis-server the test
starts): the same chain, then the whole server is stopped and a new one started on the same Redis still has the
response and continues from it."""
import openai
import pytest

from tests.deploy.live_server import live_server, session_pids
from tests.deploy.redis_server import redis_server

MODEL = "gpt-oss-demo"
HEADER = "x-epserve-gateway"
FIRST, SECOND = "What is 2 + 3?", "What is 3 + 4?"
GREEDY = {"model": MODEL, "temperature": 0, "max_output_tokens": 96}
TRIES = 16      # Serve's proxy picks one of two idle gateways at random: 2^-16 that the other is never picked


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def create(client, **fields):
    """(response, the gateway replica that answered)."""
    raw = client.responses.with_raw_response.create(**GREEDY, **fields)
    return raw.parse(), raw.headers[HEADER]


def explicit_second_turn(client, first):
    """The second turn sent statelessly: the first turn's conversation in full (its reasoning is dropped by the
    renderer either way, as a final answer follows it)."""
    return client.responses.create(**GREEDY, store=False, input=[
        {"role": "user", "content": FIRST}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": SECOND}])


@pytest.fixture(scope="module")
def two_gateways():
    with live_server("--ep-size", "1", "--gateway-replicas", "2") as (url, proc):
        assert len(session_pids(proc, "ServeReplica:epserve:Gateway")) == 2
        assert len(session_pids(proc, "ServeReplica:epserve:ResponseStore")) == 1
        yield url


def test_second_turn_on_the_other_gateway_sees_the_first(two_gateways):
    client = sdk(two_gateways)
    first, first_gateway = create(client, input=FIRST)
    assert first.status == "completed" and first.output_text and first.store is True
    for _ in range(TRIES):
        second, gateway = create(client, input=SECOND, previous_response_id=first.id)
        if gateway != first_gateway:
            break
    assert gateway != first_gateway, "every second turn landed on the first turn's gateway"
    alone = explicit_second_turn(client, first)
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens == alone.usage.input_tokens > first.usage.input_tokens
    assert second.output_text == alone.output_text
    items = client.responses.input_items.list(second.id, order="asc").data
    assert [(i.type, getattr(i, "role", None)) for i in items] == [
        ("message", "user"), ("reasoning", None), ("message", "assistant"), ("message", "user")]
    assert [i.id for i in items[1:3]] == [o.id for o in first.output]
    assert items[0].content[0].text == FIRST and items[3].content[0].text == SECOND


def test_retrieve_from_both_gateways_then_delete(two_gateways):
    client = sdk(two_gateways)
    stored, _ = create(client, input=FIRST, metadata={"case": "retrieve"})
    seen = set()
    for _ in range(2 * TRIES):
        raw = client.responses.with_raw_response.retrieve(stored.id)
        assert raw.parse().model_dump() == stored.model_dump()
        seen.add(raw.headers[HEADER])
        if len(seen) == 2:
            break
    assert len(seen) == 2, "every retrieval landed on one gateway"
    assert client.responses.delete(stored.id) is None             # the SDK returns nothing for OpenAI's body
    for call in (lambda: client.responses.retrieve(stored.id), lambda: client.responses.delete(stored.id),
                 lambda: client.responses.input_items.list(stored.id)):
        with pytest.raises(openai.NotFoundError) as caught:
            call()
        assert caught.value.body == {"message": f"Response with id '{stored.id}' not found.",
                                     "type": "invalid_request_error", "param": None, "code": 404}
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(**GREEDY, input=SECOND, previous_response_id=stored.id)
    assert caught.value.body["param"] == "previous_response_id"
    assert caught.value.body["message"] == f"Previous response with id '{stored.id}' not found."


def test_streamed_and_unstored_responses(two_gateways):
    client = sdk(two_gateways)
    events = list(client.responses.create(**GREEDY, input=FIRST, stream=True))
    assert events[-1].type == "response.completed"
    streamed = events[-1].response
    assert client.responses.retrieve(streamed.id).model_dump() == streamed.model_dump()
    unstored, _ = create(client, input=FIRST, store=False)
    assert unstored.store is False and unstored.output_text == streamed.output_text
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_redis_store_survives_a_server_restart():
    with redis_server() as redis_url:
        args = ("--ep-size", "1", "--response-store", redis_url)
        with live_server(*args) as (url, proc):
            assert not session_pids(proc, "ServeReplica:epserve:ResponseStore")     # no in-cluster store
            client = sdk(url)
            first, _ = create(client, input=FIRST)
            second, _ = create(client, input=SECOND, previous_response_id=first.id)
            assert second.usage.input_tokens == explicit_second_turn(client, first).usage.input_tokens
            doomed, _ = create(client, input=SECOND)
            client.responses.delete(doomed.id)
        # the whole server is gone (its Ray cluster, gateways and model replica); a new one on the same Redis:
        with live_server(*args) as (url, _):
            client = sdk(url)
            assert client.responses.retrieve(first.id).model_dump() == first.model_dump()
            assert client.responses.retrieve(second.id).model_dump() == second.model_dump()
            third, _ = create(client, input=SECOND, previous_response_id=first.id)
            assert third.usage.input_tokens == second.usage.input_tokens and third.output_text == second.output_text
            with pytest.raises(openai.NotFoundError):
                client.responses.retrieve(doomed.id)
