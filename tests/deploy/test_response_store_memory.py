"""MemoryResponseStore (what the Ray store's one replica holds): bounded in entries and bytes with the least recently
used evicted first, entries expiring a fixed time after their put, and a value too large for the store not kept."""
import asyncio

import pytest

from deploy.openai.response_store import StoredResponse
from deploy.openai.response_store_memory import MemoryResponseStore


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def run(awaitable):
    return asyncio.run(awaitable)


async def fill(store, *keys, size=10):
    for key in keys:
        await store.put(key, key[0] * size)


def test_entries_bound_evicts_the_least_recently_used():
    store = MemoryResponseStore(max_entries=3, max_bytes=1 << 20, ttl_s=60)

    async def scenario():
        await fill(store, "a", "b", "c")
        assert await store.get("a") == "a" * 10            # a is now the most recently used
        await fill(store, "d")                               # evicts b, the least recently used
        return [await store.get(k) is not None for k in "abcd"]
    assert run(scenario()) == [True, False, True, True]
    assert len(store) == 3 and store.num_evicted == 1 and store.num_bytes == 30


def test_bytes_bound_counts_utf8_bytes():
    store = MemoryResponseStore(max_entries=100, max_bytes=25, ttl_s=60)

    async def scenario():
        await store.put("a", "é" * 5)                        # 10 bytes
        await store.put("b", "x" * 10)
        await store.put("c", "y" * 10)                       # 30 bytes: a goes
        return await store.get("a"), await store.get("b")
    assert run(scenario()) == (None, "x" * 10)
    assert store.num_bytes == 20 and store.stats() == {"entries": 2, "bytes": 20, "evicted": 1, "expired": 0}


def test_a_value_larger_than_the_store_is_not_kept(caplog):
    store = MemoryResponseStore(max_entries=100, max_bytes=25, ttl_s=60)

    async def scenario():
        await store.put("a", "x" * 20)
        await store.put("big", "x" * 26)
        return await store.get("a"), await store.get("big")
    assert run(scenario()) == ("x" * 20, None)
    assert "26 bytes exceed" in caplog.text


def test_entries_expire_their_ttl_after_the_put_and_a_new_put_renews():
    clock = Clock()
    store = MemoryResponseStore(max_entries=100, max_bytes=1 << 20, ttl_s=10, clock=clock)

    async def scenario():
        await fill(store, "a", "b")
        clock.now += 5
        await store.get("a")                                 # a read does not extend the time to live
        await store.put("b", "renewed")
        clock.now += 6                                       # a: 11 s old; b: put again 6 s ago
        found = await store.get("a"), await store.get("b")
        clock.now += 5
        return found, await store.get("b")
    assert run(scenario()) == ((None, "renewed"), None)
    assert store.num_expired == 2 and store.num_bytes == 0


def test_delete_and_queued_expiries_stay_bounded():
    store = MemoryResponseStore(max_entries=4, max_bytes=1 << 20, ttl_s=3600)

    async def scenario():
        for i in range(100):
            await store.put(f"k{i}", "v")
        deleted = await store.delete("k99"), await store.delete("k99"), await store.delete("never")
        return deleted
    assert run(scenario()) == (True, False, False)
    assert len(store) == 3 and len(store._expiries) <= 2 * store.max_entries


def test_records_round_trip_through_save_and_load():
    store = MemoryResponseStore(max_entries=4, max_bytes=1 << 20, ttl_s=60)
    record = StoredResponse(response={"id": "resp_1", "output": [{"type": "message", "id": "msg_1"}]},
                            input_items=[{"type": "message", "role": "user", "id": "msg_0",
                                          "content": [{"type": "input_text", "text": "hi ✓"}]}])

    async def scenario():
        await store.save(record)
        return await store.load("resp_1"), await store.load("resp_2"), await store.remove("resp_1")
    assert run(scenario()) == (record, None, True)


@pytest.mark.parametrize("broken", ["put", "get"])
def test_a_failing_store_is_a_503(broken):
    from deploy.openai.errors import ServiceUnavailableError

    class Broken(MemoryResponseStore):
        async def put(self, key, value):
            if broken == "put":
                raise ConnectionError("refused")

        async def get(self, key):
            raise ConnectionError("refused")
    store = Broken(max_entries=4, max_bytes=100, ttl_s=60)
    call = store.save(StoredResponse(response={"id": "r"}, input_items=[])) if broken == "put" else store.load("r")
    with pytest.raises(ServiceUnavailableError, match="ConnectionError"):
        run(call)
