"""RedisResponseStore: stored Responses in Redis (`--response-store redis://HOST:PORT/DB`), one JSON string per
response under `epserve:response:<id>` with the store's time to live (SET ... EX), so they outlive gateway and
cluster restarts and every gateway sees the same ones. Bounds beyond the TTL are Redis's own (maxmemory and its
eviction policy). Connections are made on first use; an unreachable Redis is a 503 per request, not a failed start.
"""
from __future__ import annotations

import math

from deploy.openai.response_store import ResponseStore

KEY_PREFIX = "epserve:response:"
TIMEOUT_S = 5.0


class RedisResponseStore(ResponseStore):
    def __init__(self, url: str, ttl_s: float, prefix: str = KEY_PREFIX):
        import redis.asyncio as redis
        self.client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=TIMEOUT_S,
                                           socket_connect_timeout=TIMEOUT_S)
        self.ttl_s = max(1, math.ceil(ttl_s))
        self.prefix = prefix
        self.name = f"response store (Redis at {_without_password(url)})"

    async def put(self, key: str, value: str) -> None:
        await self.client.set(self.prefix + key, value, ex=self.ttl_s)

    async def get(self, key: str) -> str | None:
        return await self.client.get(self.prefix + key)

    async def delete(self, key: str) -> bool:
        return bool(await self.client.delete(self.prefix + key))

    async def close(self) -> None:
        await self.client.aclose()


def _without_password(url: str) -> str:
    """The URL as it may appear in logs and error messages: no credentials."""
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return parts._replace(netloc=netloc).geturl()
