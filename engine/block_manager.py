"""Paged KV block allocator: per-sequence block tables over a full pool and a sliding-window pool.

Owns which physical blocks each sequence holds. It never decides what runs (Scheduler) and never
touches KV tensors (the model runner turns block tables into slot mappings with `slot_mapping`).
"""
from __future__ import annotations

import logging

from engine.block_pool import BlockPool
from engine.config import NULL_BLOCK, SLIDING, CacheConfig
from engine.prefix_cache import NO_PREFIX, CachedPrefix, PrefixCache
from engine.sequence import Sequence

logger = logging.getLogger(__name__)


def slot_mapping(block_table: list[int], start: int, num_tokens: int, block_size: int) -> list[int]:
    """Cache slot of positions start .. start+num_tokens-1: block_id * block_size + position % block_size."""
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, start + num_tokens)]


class BlockManager:
    """Allocates, recycles and frees the KV blocks of sequences.

    Contract with the scheduler, per step and sequence (c = num_computed_tokens, n = tokens this step):
      can_allocate / allocate(seq, n): blocks cover positions [0, c+n) in the full group and
          [max(0, c-W+1), c+n) in the sliding group (the chunk's queries read the W-1 keys before them);
          with a CachedPrefix, the hit blocks are shared first and c becomes prefix.num_tokens.
      commit_computed(seq): after the step advanced c, offer newly computed full blocks to the prefix
          cache and recycle sliding blocks that no later query reads (last position < c-W+1), leaving
          NULL_BLOCK in their table entries so tables stay indexed by position.
      free(seq): drop every block at once (finish, abort, preemption).
    """

    def __init__(self, config: CacheConfig) -> None:
        self.config = config
        self.block_size = config.block_size
        self.sliding_window = config.sliding_window
        self.groups = config.groups
        self.prefix_cache = (PrefixCache(config.block_size, config.sliding_window)
                             if config.enable_prefix_caching else None)
        self._pools = {g: BlockPool(g, config.num_blocks(g), self.prefix_cache) for g in self.groups}
        self._num_registered: dict[int, int] = {}  # seq_id -> full blocks already offered to the prefix cache

    # --- accounting --------------------------------------------------------------------------------------
    def num_free_blocks(self, group: str) -> int:
        """Blocks at reference count 0 (never cached or parked in the prefix cache)."""
        return self._pools[group].num_free

    def num_total_blocks(self, group: str) -> int:
        return self._pools[group].num_blocks

    def ref_count(self, group: str, block_id: int) -> int:
        return self._pools[group].ref_count(block_id)

    def usage(self) -> float:
        """Fraction of all KV blocks (both pools) in use: the KV-cache-usage metric, in [0, 1]."""
        total = sum(p.num_blocks for p in self._pools.values())
        used = sum(p.num_blocks - p.num_free for p in self._pools.values())
        return used / total if total else 0.0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- allocation --------------------------------------------------------------------------------------
    def find_cached_prefix(self, seq: Sequence) -> CachedPrefix:
        """The prefix cache's usable hit for a sequence holding no KV yet (NO_PREFIX when disabled)."""
        if self.prefix_cache is None or seq.num_computed_tokens > 0:
            return NO_PREFIX
        return self.prefix_cache.find(seq)

    def can_allocate(self, seq: Sequence, num_new_tokens: int, prefix: CachedPrefix = NO_PREFIX) -> bool:
        return all(self._blocks_needed(seq, num_new_tokens, prefix, g) <= self._pools[g].num_free
                   for g in self.groups)

    def _blocks_needed(self, seq: Sequence, num_new_tokens: int, prefix: CachedPrefix, group: str) -> int:
        """Free blocks the allocation consumes in `group`: new blocks plus parked blocks of a cache hit."""
        pool = self._pools[group]
        if prefix.num_tokens:
            hits = prefix.block_ids[group]
            parked_hits = sum(1 for b in hits if b != NULL_BLOCK and pool.ref_count(b) == 0)
            end, have = prefix.num_tokens + num_new_tokens, len(hits)
        else:
            parked_hits = 0
            end, have = seq.num_computed_tokens + num_new_tokens, len(seq.block_tables.get(group, ()))
        return max(0, self.blocks_for(end) - have) + parked_hits

    def allocate(self, seq: Sequence, num_new_tokens: int, prefix: CachedPrefix = NO_PREFIX) -> None:
        """Give `seq` blocks for its next num_new_tokens positions (after installing `prefix`, if any)."""
        if not self.can_allocate(seq, num_new_tokens, prefix):
            raise RuntimeError(f"not enough free KV blocks for {num_new_tokens} tokens of {seq}")
        if self.prefix_cache is not None and seq.num_computed_tokens == 0:  # an admission: hit-rate metric
            self.prefix_cache.num_queried_tokens += seq.num_tokens
            self.prefix_cache.num_hit_tokens += prefix.num_tokens
        if prefix.num_tokens:
            self._install_prefix(seq, prefix)
        else:
            self.free_out_of_window(seq)
        num_blocks = self.blocks_for(seq.num_computed_tokens + num_new_tokens)
        for group in self.groups:
            table, pool = seq.block_tables.setdefault(group, []), self._pools[group]
            while len(table) < num_blocks:
                table.append(pool.allocate())

    def _install_prefix(self, seq: Sequence, prefix: CachedPrefix) -> None:
        assert seq.num_computed_tokens == 0 and not any(seq.block_tables.values()), "prefix on a fresh sequence"
        assert self.prefix_cache is not None
        for group in self.groups:
            seq.block_tables[group] = list(prefix.block_ids[group])
            for block_id in prefix.block_ids[group]:
                if block_id != NULL_BLOCK:
                    self._pools[group].take(block_id)
        seq.num_computed_tokens = prefix.num_tokens
        self._num_registered[seq.seq_id] = prefix.num_tokens // self.block_size
        logger.debug("prefix cache hit of %d tokens for %s", prefix.num_tokens, seq)

    # --- after a step ------------------------------------------------------------------------------------
    def commit_computed(self, seq: Sequence) -> None:
        """Call after seq.num_computed_tokens advanced: cache newly full blocks, recycle out-of-window ones."""
        if self.prefix_cache is not None:
            num_full = seq.num_computed_tokens // self.block_size
            first = self._num_registered.get(seq.seq_id, 0)
            if num_full > first:
                hashes = self.prefix_cache.block_hashes(seq, num_full)
                for j in range(first, num_full):
                    for group in self.groups:
                        block_id = seq.block_tables[group][j]
                        if block_id != NULL_BLOCK:
                            self.prefix_cache.register(group, block_id, hashes[j])
                self._num_registered[seq.seq_id] = num_full
        self.free_out_of_window(seq)

    def free_out_of_window(self, seq: Sequence) -> None:
        """Release sliding blocks whose last position is before the window of the next query.

        The next query is position c = num_computed_tokens; it reads keys c-W+1 .. c, so block j is dead
        once (j+1)*block_size - 1 < c-W+1. Dead entries form a prefix of the table, so only the newly dead
        ones (after the last NULL_BLOCK) are visited.
        """
        if SLIDING not in self.groups:
            return
        assert self.sliding_window is not None
        table = seq.block_tables.get(SLIDING)
        if not table:
            return
        keep_from = min(len(table), max(0, seq.num_computed_tokens - self.sliding_window + 1) // self.block_size)
        first = keep_from
        while first > 0 and table[first - 1] != NULL_BLOCK:
            first -= 1
        for j in range(first, keep_from):
            self._pools[SLIDING].release(table[j], evict_first=not self._serves_next_turn(seq, j))
            table[j] = NULL_BLOCK

    def _serves_next_turn(self, seq: Sequence, j: int) -> bool:
        """Whether sliding block j lies in the window before the end of the prompt: where the next turn of a
        conversation (the same prompt, then more) gets its cache hit, so the blocks its sliding layers read there.

        The sliding pool only holds the windows of running sequences: a long prefill cycles through it many times
        over. Parked in release order, each prefill's passed-over blocks would evict every finished conversation's
        prompt end (with 8 conversations in flight, no next turn hit the cache); so the blocks a prefill leaves
        behind mid-prompt go first, and those ending a prompt are kept longest. A mid-prompt hit (a system prompt
        shared by new conversations) is given up for it on sliding layers."""
        assert self.sliding_window is not None
        end = seq.num_prompt_tokens
        return (j + 1) * self.block_size > end - self.sliding_window - self.block_size and j * self.block_size < end

    def free(self, seq: Sequence) -> None:
        """Release every block of the sequence; shared blocks survive while others still reference them."""
        for group, table in seq.block_tables.items():
            # Tail first: with prefix caching the head of a prompt is the most shareable, so park it last.
            for block_id in reversed(table):
                if block_id != NULL_BLOCK:
                    self._pools[group].release(block_id)
        seq.block_tables = {}
        self._num_registered.pop(seq.seq_id, None)
