"""GenerateRequest: the gateway -> replica contract, in token ids (TokenOutput is the way back)."""
from __future__ import annotations

import dataclasses

from engine.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    """`resume_output_ids`: output tokens this request already produced and delivered (a continuation after its
    replica or rank was lost; n == 1 only). The engine recomputes them with the prompt, counts them towards
    max_tokens, min_tokens and stop strings, resumes the seeded random stream after them, and emits only new
    tokens (usage still counts them all). `routing_key`: the conversation's `prompt_cache_key` (else `user`), which
    the cache-aware router pins to one replica; the engine ignores it."""
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    resume_output_ids: tuple[int, ...] = ()
    routing_key: str | None = None
