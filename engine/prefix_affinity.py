"""Cache-aware choice among serving targets (replicas, or the data-parallel ranks of one replica): the most prompt
tokens already cached, unless that target is overloaded; a session key pins a conversation; otherwise no choice
(the caller's load balancing decides). Pure functions, so Serve's router and a replica's rank placement share them.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

AFFINITY, SESSION, FALLBACK, LOAD = "affinity", "session", "fallback", "load"
REASONS = (AFFINITY, SESSION, FALLBACK, LOAD)
MIN_CACHED_SHARE = 0.25      # of the prompt, for affinity (SGLang's router: 0.5 of the characters; Ray's: 0.1)


@dataclass(frozen=True)
class Candidate:
    key: str                 # the target's stable id (replica id, rank)
    cached_tokens: int       # prompt tokens of this request the target's prefix cache holds
    load: float              # ongoing requests (queued + running) on the target


@dataclass(frozen=True)
class Choice:
    key: str | None          # None: no preference, balance load (power of two)
    reason: str              # one of REASONS


def session_owner(session: str, keys: list[str]) -> str:
    """Rendezvous (highest random weight) hashing: a session keeps its target while that target lives; when targets
    come or go, only the sessions of those targets move."""
    def weight(key: str) -> bytes:
        return hashlib.blake2b(f"{session}\x00{key}".encode(), digest_size=8).digest()
    return max(keys, key=weight)


def choose(candidates: list[Candidate], session: str | None = None, load_bound: float = 8,
           min_cached_tokens: int = 1, prompt_tokens: int = 0, min_cached_share: float = MIN_CACHED_SHARE) -> Choice:
    """The target for one request. A target whose load exceeds the least loaded one's by more than `load_bound`
    loses affinity (reason `load` when that is what moved the request); among the rest, the session's owner when a
    session key is given, else the one with the most cached tokens (ties: the less loaded) if it holds at least
    `min_cached_tokens` and, when `prompt_tokens` is given, at least `min_cached_share` of the prompt; else no
    preference (`fallback`). The share keeps a preamble every request shares (the chat template's system message)
    from drawing all new conversations onto the one target that happened to serve the first."""
    if not candidates:
        return Choice(None, FALLBACK)
    least = min(c.load for c in candidates)
    within = [c for c in candidates if c.load <= least + load_bound]
    if session:
        owner = session_owner(session, sorted(c.key for c in candidates))
        if any(c.key == owner for c in within):
            return Choice(owner, SESSION)
    enough = max(min_cached_tokens, min_cached_share * prompt_tokens)
    best = max(within, key=lambda c: (c.cached_tokens, -c.load))
    if best.cached_tokens >= enough:
        return Choice(best.key, AFFINITY)
    overloaded_hit = any(c.cached_tokens >= enough for c in candidates if c not in within)
    return Choice(None, LOAD if overloaded_hit or (session and len(within) < len(candidates)) else FALLBACK)
