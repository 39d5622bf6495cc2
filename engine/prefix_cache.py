"""Prefix caching policy: content hashes of full KV blocks, longest-prefix lookup, LRU of idle cached blocks.

Owns which physical block holds which content; it never allocates blocks nor touches reference counts
(BlockPool does) and never decides what runs (the scheduler does).
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

from engine.config import FULL, NULL_BLOCK, SLIDING
from engine.sequence import Sequence


def chain_hash(parent: bytes, token_ids: list[int]) -> bytes:
    """Hash of one full block: its token ids chained with the hash of everything before it.

    KV at a position depends on every earlier token, so the chain makes equal hashes mean equal KV.
    128-bit BLAKE2b: a collision (silently wrong KV) is astronomically unlikely, unlike Python's hash().
    """
    digest = hashlib.blake2b(parent, digest_size=16)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


@dataclass(frozen=True)
class CachedPrefix:
    """A usable cache hit: the first num_tokens positions, and per KV group the blocks holding them.

    block_ids[group][i] covers positions [i*block_size, (i+1)*block_size); sliding entries before the window
    of the first uncached query are NULL_BLOCK, they are never read.
    """

    num_tokens: int = 0
    block_ids: dict[str, list[int]] = field(default_factory=dict)


NO_PREFIX = CachedPrefix()


class PrefixCache:
    """Index of computed full blocks by content hash, per KV group, with LRU eviction of idle ones.

    A block enters the index once its KV is computed (never at allocation: a block scheduled this step but
    preempted before running would otherwise be served to another sequence with garbage KV). A cached
    block whose reference count drops to 0 is "parked": it counts as free, keeps its content, and is
    evicted least-recently-parked first when a pool runs out of never-cached free blocks.
    """

    def __init__(self, block_size: int, sliding_window: int | None) -> None:
        self.block_size = block_size
        self.sliding_window = sliding_window
        groups = (FULL,) if sliding_window is None else (FULL, SLIDING)
        self._block_of: dict[str, dict[bytes, int]] = {g: {} for g in groups}
        self._hash_of: dict[str, dict[int, bytes]] = {g: {} for g in groups}
        self._parked: dict[str, OrderedDict[int, None]] = {g: OrderedDict() for g in groups}
        self._parked_first: dict[str, OrderedDict[int, None]] = {g: OrderedDict() for g in groups}   # evicted first
        self.num_queried_tokens = 0  # prompt tokens looked up at admission (hit-rate metric)
        self.num_hit_tokens = 0      # of which served from the cache

    # --- hashing and lookup ------------------------------------------------------------------------------
    def block_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """Chained hashes of the sequence's first num_blocks full blocks (memoised on the sequence)."""
        hashes, bs = seq.block_hashes, self.block_size
        while len(hashes) < num_blocks:
            j = len(hashes)
            hashes.append(chain_hash(hashes[-1] if hashes else b"", seq.token_ids(j * bs, (j + 1) * bs)))
        return hashes[:num_blocks]

    def find(self, seq: Sequence) -> CachedPrefix:
        """Longest cached prefix usable by `seq` in every KV group, always leaving its last token to compute.

        Full layers need every block of the prefix; sliding layers need only the blocks the first uncached
        query N reads (positions N-W+1 .. N-1), so a prefix counts only if those are cached too.
        """
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hashes = self.block_hashes(seq, max_blocks)
        full = self._block_of[FULL]
        num_blocks = 0
        while num_blocks < max_blocks and hashes[num_blocks] in full:
            num_blocks += 1
        while num_blocks > 0 and not self._sliding_blocks_cached(hashes, num_blocks):
            num_blocks -= 1
        if num_blocks == 0:
            return NO_PREFIX
        block_ids = {FULL: [full[h] for h in hashes[:num_blocks]]}
        if SLIDING in self._block_of:
            first = self._first_sliding_block(num_blocks)
            sliding = self._block_of[SLIDING]
            block_ids[SLIDING] = [NULL_BLOCK] * first + [sliding[h] for h in hashes[first:num_blocks]]
        return CachedPrefix(num_tokens=num_blocks * self.block_size, block_ids=block_ids)

    def _first_sliding_block(self, num_blocks: int) -> int:
        """First block a query at position num_blocks*block_size reads on sliding layers."""
        assert self.sliding_window is not None
        return max(0, num_blocks * self.block_size - self.sliding_window + 1) // self.block_size

    def _sliding_blocks_cached(self, hashes: list[bytes], num_blocks: int) -> bool:
        if SLIDING not in self._block_of:
            return True
        sliding = self._block_of[SLIDING]
        return all(h in sliding for h in hashes[self._first_sliding_block(num_blocks):num_blocks])

    # --- index maintenance (called by BlockManager / BlockPool) -------------------------------------------
    def register(self, group: str, block_id: int, block_hash: bytes) -> None:
        """Offer a computed full block. A hash already held by another block keeps that block (first wins)."""
        if block_hash in self._block_of[group] or block_id in self._hash_of[group]:
            return
        self._block_of[group][block_hash] = block_id
        self._hash_of[group][block_id] = block_hash

    def cached_hashes(self, limit: int | None = None) -> list[bytes]:
        """Hashes of the full-attention blocks the index holds, most recently registered last; at most `limit`
        (the most recent). Safe to call from another thread while the engine steps (one atomic copy)."""
        for _ in range(3):
            try:
                held = list(self._block_of[FULL])
                break
            except RuntimeError:           # the index changed size during the copy: try again
                continue
        else:
            return []
        return held if limit is None else held[-limit:]

    def lookup(self, group: str, block_hash: bytes) -> int | None:
        """The block holding this content in `group`, or None."""
        return self._block_of[group].get(block_hash)

    def is_cached(self, group: str, block_id: int) -> bool:
        return block_id in self._hash_of[group]

    def park(self, group: str, block_id: int, evict_first: bool = False) -> None:
        """A cached block lost its last reference: keep its content, make it evictable, least recently parked
        first; `evict_first` (content unlikely to be asked for again): before any block parked without it."""
        (self._parked_first if evict_first else self._parked)[group][block_id] = None

    def unpark(self, group: str, block_id: int) -> None:
        """A parked block got a cache hit: it is in use again."""
        (self._parked_first if block_id in self._parked_first[group] else self._parked)[group].pop(block_id)

    def num_parked(self, group: str) -> int:
        return len(self._parked[group]) + len(self._parked_first[group])

    def evict(self, group: str) -> int | None:
        """Drop the next parked block in eviction order from the index and hand it out, or None if none is."""
        queue = self._parked_first[group] or self._parked[group]
        if not queue:
            return None
        block_id, _ = queue.popitem(last=False)
        del self._block_of[group][self._hash_of[group].pop(block_id)]
        return block_id
