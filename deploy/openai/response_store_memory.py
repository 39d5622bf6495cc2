"""MemoryResponseStore: stored Responses in this process, bounded in entries and bytes (least recently used go
first) and expiring a fixed time after they were put. The Ray store's one replica holds one; tests use it directly.

Every method runs to completion without awaiting, so one event loop needs no lock.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from deploy.openai.response_store import ResponseStore

logger = logging.getLogger(__name__)


class MemoryResponseStore(ResponseStore):
    name = "in-memory response store"

    def __init__(self, max_entries: int, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self.max_entries, self.max_bytes, self.ttl_s, self.clock = max_entries, max_bytes, ttl_s, clock
        self._entries: OrderedDict[str, tuple[str, int, float]] = OrderedDict()  # value, bytes, expiry; LRU first
        self._expiries: deque[tuple[float, str]] = deque()    # put order is expiry order: one time to live
        self.num_bytes = self.num_evicted = self.num_expired = 0

    def __len__(self) -> int:
        return len(self._entries)

    async def put(self, key: str, value: str) -> None:
        self._expire()
        size = len(value.encode())
        if size > self.max_bytes:
            logger.warning("response %s not stored: %d bytes exceed the store's %d", key, size, self.max_bytes)
            self._drop(key)
            return
        self._drop(key)
        expires = self.clock() + self.ttl_s
        self._entries[key] = (value, size, expires)
        self._expiries.append((expires, key))
        self.num_bytes += size
        while len(self._entries) > self.max_entries or self.num_bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
            self.num_evicted += 1
        if len(self._expiries) > 2 * self.max_entries:   # evicted and deleted keys still queued: compact
            self._expiries = deque(e for e in self._expiries if self._is_live(*e))

    async def get(self, key: str) -> str | None:
        self._expire()
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    async def delete(self, key: str) -> bool:
        self._expire()
        return self._drop(key)

    def stats(self) -> dict:
        return {"entries": len(self._entries), "bytes": self.num_bytes, "evicted": self.num_evicted,
                "expired": self.num_expired}

    def _drop(self, key: str) -> bool:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.num_bytes -= entry[1]
        return entry is not None

    def _expire(self) -> None:
        now = self.clock()
        while self._expiries and self._expiries[0][0] <= now:
            expires, key = self._expiries.popleft()
            if self._is_live(expires, key):
                self._drop(key)
                self.num_expired += 1

    def _is_live(self, expires: float, key: str) -> bool:
        """Whether this queued expiry is the key's current one (not evicted, deleted or put again since)."""
        entry = self._entries.get(key)
        return entry is not None and entry[2] == expires
