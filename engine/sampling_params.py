"""Per-request sampling and stopping parameters, validated once when the request arrives.

Owns the meaning of each knob (OpenAI/vLLM semantics); it does no sampling and knows no tokenizer.
"""
from __future__ import annotations

from dataclasses import dataclass

MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit
GREEDY_TEMPERATURE = 1e-5  # temperatures below this are greedy (dividing logits by them overflows); as in vLLM


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature: 0 (or below 1e-5) means greedy argmax; otherwise logits are divided by it.
    top_k: keep the k most likely tokens; 0 turns it off (the one "off" value; -1 is rejected).
    top_p: nucleus sampling, keep the smallest set of tokens whose probability reaches top_p (1.0 = off).
    seed: None draws from the engine's shared generator; an int makes this request's tokens reproducible
        whatever else is in the batch.
    max_tokens: generated tokens at most (finish reason "length").
    stop_token_ids: sampled ids that end the request (finish reason "stop"); the id is kept in the output ids.
    stop: strings that end the request; the text is cut before the match unless include_stop_str_in_output.
    logprobs: None for none; k in 0..20 returns the sampled token's logprob plus the top k logprobs
        (log-softmax of the raw logits, before temperature/top-k/top-p: OpenAI's and vLLM's "raw" logprobs).
    n: completions per prompt; the engine runs n sequences under one request id.
    ignore_eos: keep generating after the model's end-of-sequence ids (stop_token_ids still apply).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    n: int = 1
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and frozen into tuples so params stay hashable and immutable.
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        self._validate_sampling()
        self._validate_stopping()

    def _validate_sampling(self) -> None:
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 (disable) or at least 1, got {self.top_k}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}] or None, got {self.logprobs}")
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")

    def _validate_stopping(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {list(self.stop_token_ids)}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {list(self.stop)}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE
