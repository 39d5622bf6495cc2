"""The default response store: one `ResponseStore` Serve deployment of the app holding a MemoryResponseStore, which
every Gateway replica reaches through its DeploymentHandle, so a response stored through one gateway is found
through any other. It lives and dies with the application (deleted with it; a restarted replica starts empty);
Redis (response_store_redis.py) keeps responses across restarts.
"""
from __future__ import annotations

from deploy.openai.response_store import ResponseStore
from deploy.openai.response_store_memory import MemoryResponseStore


class ResponseStoreReplica:
    """The Serve deployment's class: exactly one replica (build_app fixes num_replicas=1), so there is one store.
    Async methods run on the replica's event loop one at a time, as the memory store needs."""

    def __init__(self, max_entries: int, max_bytes: int, ttl_s: float):
        self.store = MemoryResponseStore(max_entries, max_bytes, ttl_s)

    async def put(self, key: str, value: str) -> None:
        await self.store.put(key, value)

    async def get(self, key: str) -> str | None:
        return await self.store.get(key)

    async def delete(self, key: str) -> bool:
        return await self.store.delete(key)

    async def stats(self) -> dict:
        return self.store.stats()


class RayResponseStore(ResponseStore):
    """A gateway's view of the ResponseStore deployment (a Serve DeploymentHandle)."""

    name = "response store (the app's ResponseStore deployment)"

    def __init__(self, handle):
        self.handle = handle

    async def put(self, key: str, value: str) -> None:
        await self.handle.put.remote(key, value)

    async def get(self, key: str) -> str | None:
        return await self.handle.get.remote(key)

    async def delete(self, key: str) -> bool:
        return await self.handle.delete.remote(key)
