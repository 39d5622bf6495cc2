"""PrefixSummary: a compact, picklable view of the full blocks a prefix cache holds, for routing outside the engine.

Keys are the engine's own chained block hashes (engine/prefix_cache.py `chain_hash`) cut to 64 bits, so a router
that hashes a prompt with `prompt_block_keys` can never disagree with the engine about which blocks are equal. A
64-bit collision only misroutes a request (the engine still checks the full 128-bit hash), it never serves wrong KV.
"""
from __future__ import annotations

import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.prefix_cache import PrefixCache, chain_hash

DEFAULT_MAX_KEYS = 8192          # per rank, the most recent blocks (64 KiB); see README "Cache-aware routing"


def block_key(block_hash: bytes) -> int:
    """The 64-bit routing key of one chained block hash."""
    return int.from_bytes(block_hash[:8], "little")


def prompt_block_keys(token_ids: list[int], block_size: int, max_blocks: int | None = None) -> list[int]:
    """Keys of the prompt's full blocks that a cache hit can cover (never the block holding the last token,
    which the engine always computes), chained exactly as the engine chains them."""
    num_blocks = max(0, (len(token_ids) - 1) // block_size)
    if max_blocks is not None:
        num_blocks = min(num_blocks, max_blocks)
    keys, parent = [], b""
    for j in range(num_blocks):
        parent = chain_hash(parent, token_ids[j * block_size:(j + 1) * block_size])
        keys.append(block_key(parent))
    return keys


def leading_blocks(keys: list[int], holds: Callable[[int], bool], start: int = 0) -> int:
    """How many leading blocks of a prompt (its `prompt_block_keys`) `holds` has, counting on from `start` blocks
    already known to be held: a prefix cache hit stops at the first missing block."""
    n = start
    while n < len(keys) and holds(keys[n]):
        n += 1
    return n


@dataclass(frozen=True)
class PrefixSummary:
    """Routing keys of the cached full blocks of one engine (or of every rank of a replica, merged)."""
    block_size: int
    keys: frozenset[int] = field(default_factory=frozenset)
    made_at: float = 0.0          # time.time() when read from the engine(s)

    def cached_blocks(self, keys: list[int]) -> int:
        """How many leading blocks of a prompt (its `prompt_block_keys`) this cache holds."""
        return leading_blocks(keys, self.keys.__contains__)

    def to_wire(self) -> dict:
        """A small dict for Serve's routing stats: the keys packed as unsigned 64-bit integers."""
        return {"block_size": self.block_size, "keys": array("Q", sorted(self.keys)).tobytes(),
                "made_at": self.made_at}

    @classmethod
    def from_wire(cls, wire: dict) -> "PrefixSummary":
        keys = array("Q")
        keys.frombytes(wire["keys"])
        return cls(int(wire["block_size"]), frozenset(keys), float(wire.get("made_at", 0.0)))

    @classmethod
    def merge(cls, summaries: list["PrefixSummary"]) -> "PrefixSummary | None":
        """One summary for a replica's ranks (all of one block size); None when there is none."""
        if not summaries:
            return None
        keys = frozenset().union(*(s.keys for s in summaries))
        return cls(summaries[0].block_size, keys, min(s.made_at for s in summaries))


def summarize(cache: PrefixCache | None, max_keys: int = DEFAULT_MAX_KEYS) -> PrefixSummary | None:
    """The summary of one engine's prefix cache (None when prefix caching is off)."""
    if cache is None:
        return None
    return PrefixSummary(cache.block_size, frozenset(block_key(h) for h in cache.cached_hashes(max_keys)),
                         time.time())


def prefix_report(engine, max_keys: int = DEFAULT_MAX_KEYS) -> tuple[PrefixSummary | None, int, int]:
    """(summary, prompt tokens queried, of which hit) of an engine's prefix cache; an EP rank answers it as
    EPWorker.prefix_report."""
    cache = getattr(getattr(engine, "block_manager", None), "prefix_cache", None)
    if cache is None:
        return None, 0, 0
    return summarize(cache, max_keys), cache.num_queried_tokens, cache.num_hit_tokens
