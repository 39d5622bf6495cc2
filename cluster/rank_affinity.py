"""RankAffinity: which data-parallel rank of a replica already holds a prompt's prefix in its KV cache.

Inside a replica every request lives on one rank, and a rank's prefix cache only helps requests placed on it. The
replica remembers the block keys (engine/prefix_summary.py, chained exactly as the prefix cache chains them) of the
prompts it placed on each rank, most recent last, up to `max_blocks` per rank: the rank registers those blocks as it
prefills them, so the memory is what that rank's cache holds unless it evicted them (then the rank merely recomputes).
The choice itself is engine/prefix_affinity.choose, the one Serve's replica router uses: a session's worker, else the
most cached tokens, within a load bound; else no preference (the caller balances load).
"""
from __future__ import annotations

import collections

from engine.prefix_affinity import Candidate, choose
from engine.prefix_summary import leading_blocks, prompt_block_keys


class RankAffinity:
    def __init__(self, block_size: int, load_bound: float = 8, max_blocks: int = 65536):
        self.block_size, self.load_bound, self.max_blocks = block_size, load_bound, max_blocks
        self._blocks: dict[int, collections.OrderedDict] = {}          # worker -> block key -> None (LRU order)
        self.decisions: collections.Counter = collections.Counter()   # reason -> count (affinity, fallback, load)

    def choose(self, prompt: list[int], loads: dict[int, float], session: str | None = None) -> int | None:
        """The worker holding most of `prompt`'s prefix among `loads` (worker -> requests on it) within the load
        bound, or the session's worker when `session` (prompt_cache_key / user) is given; None: no preference
        (nothing cached, or only on overloaded workers): balance by load."""
        keys = prompt_block_keys(prompt, self.block_size)
        candidates = [Candidate(str(w), self._cached_blocks(w, keys) * self.block_size, load)
                      for w, load in loads.items()]
        choice = choose(candidates, session, self.load_bound, prompt_tokens=len(prompt))
        self.decisions[choice.reason] += 1
        return None if choice.key is None else int(choice.key)

    def placed(self, worker: int, prompt: list[int]) -> None:
        """`prompt` was placed on `worker`: its full blocks will be in that rank's cache."""
        blocks = self._blocks.setdefault(worker, collections.OrderedDict())
        for key in prompt_block_keys(prompt, self.block_size):
            blocks[key] = None
            blocks.move_to_end(key)
        while len(blocks) > self.max_blocks:
            blocks.popitem(last=False)

    def forget(self, worker: int) -> None:
        """The worker left the group (its cache went with it)."""
        self._blocks.pop(worker, None)

    def _cached_blocks(self, worker: int, keys: list[int]) -> int:
        return leading_blocks(keys, self._blocks.get(worker, {}).__contains__)
