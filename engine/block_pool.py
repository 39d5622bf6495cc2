"""One KV group's physical blocks: reference counts and the free list.

Owns only counting; which sequence uses a block is in its block table (BlockManager), which content a
block holds is in the PrefixCache. A block returns to the free list only at reference count 0.
"""
from __future__ import annotations

from collections import deque

from engine.prefix_cache import PrefixCache


class BlockPool:
    """Blocks 0..num_blocks-1 of one KV group.

    "Free" means reference count 0: either never cached (the free list, handed out first) or cached and
    parked in the prefix cache (handed out by evicting the least recently parked one).
    """

    def __init__(self, group: str, num_blocks: int, prefix_cache: PrefixCache | None = None) -> None:
        self.group = group
        self.num_blocks = num_blocks
        self._prefix_cache = prefix_cache
        self._ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        parked = self._prefix_cache.num_parked(self.group) if self._prefix_cache else 0
        return len(self._free) + parked

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def allocate(self) -> int:
        """A block with no content, reference count 1."""
        if self._free:
            block_id = self._free.popleft()
        else:
            evicted = self._prefix_cache.evict(self.group) if self._prefix_cache else None
            if evicted is None:
                raise RuntimeError(f"{self.group} KV pool is out of blocks; check can_allocate() first")
            block_id = evicted
        assert self._ref_counts[block_id] == 0, f"{self.group} block {block_id} handed out while in use"
        self._ref_counts[block_id] = 1
        return block_id

    def take(self, block_id: int) -> None:
        """One more reference to a cached block (a prefix hit); a parked block comes back into use."""
        if self._ref_counts[block_id] == 0:
            assert self._prefix_cache is not None, "only cached blocks can be shared"
            self._prefix_cache.unpark(self.group, block_id)
        self._ref_counts[block_id] += 1

    def release(self, block_id: int, evict_first: bool = False) -> None:
        """Drop one reference; at 0 the block is parked if cached (first in line for eviction with `evict_first`),
        else returned to the free list."""
        assert self._ref_counts[block_id] > 0, f"{self.group} block {block_id} released more than taken"
        self._ref_counts[block_id] -= 1
        if self._ref_counts[block_id] == 0:
            if self._prefix_cache is not None and self._prefix_cache.is_cached(self.group, block_id):
                self._prefix_cache.park(self.group, block_id, evict_first)
            else:
                self._free.append(block_id)
