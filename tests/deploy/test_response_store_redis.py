"""RedisResponseStore against a real redis-server: JSON under `epserve:response:<id>` with the store's time to live,
records round-trip, delete says whether the key was there, and a Redis that is gone is a 503 naming it without its
password."""
import asyncio
import json

import pytest
import redis

from deploy.openai.errors import ServiceUnavailableError
from deploy.openai.response_store import StoredResponse
from deploy.openai.response_store_redis import RedisResponseStore
from tests.deploy.redis_server import redis_server

RECORD = StoredResponse(response={"id": "resp_1", "object": "response", "output": []},
                        input_items=[{"type": "message", "role": "user", "id": "msg_1",
                                      "content": [{"type": "input_text", "text": "hi ✓"}]}])


@pytest.fixture(scope="module")
def url():
    with redis_server() as url:
        yield url


def test_records_round_trip_with_a_ttl(url):
    async def scenario():
        store = RedisResponseStore(url, ttl_s=90.5)
        try:
            await store.save(RECORD)
            return await store.load("resp_1"), await store.load("resp_2"), await store.remove("resp_1"), \
                await store.remove("resp_1"), await store.load("resp_1")
        finally:
            await store.close()

    async def raw():
        store = RedisResponseStore(url, ttl_s=90.5)
        await store.save(RECORD)
        await store.close()
    assert asyncio.run(scenario()) == (RECORD, None, True, False, None)
    asyncio.run(raw())
    client = redis.Redis.from_url(url, decode_responses=True)
    assert json.loads(client.get("epserve:response:resp_1")) == RECORD.model_dump()
    assert 80 < client.ttl("epserve:response:resp_1") <= 91
    client.close()


def test_an_unreachable_redis_is_a_503_without_the_password():
    with redis_server() as url:
        dead = url.replace("redis://", "redis://:s3cret@")
    store = RedisResponseStore(dead, ttl_s=60)
    with pytest.raises(ServiceUnavailableError) as caught:
        asyncio.run(store.load("resp_1"))
    assert "Redis at redis://127.0.0.1:" in caught.value.message and "s3cret" not in caught.value.message
