"""Per-request sampling and stopping parameters, validated once when the request arrives.

Owns the meaning of each knob (OpenAI/vLLM semantics); it does no sampling and knows no tokenizer.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.structured_output import StructuredOutput

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
    presence_penalty / frequency_penalty: OpenAI's, over the generated tokens: logits -= presence * [count > 0]
        + frequency * count (in [-2, 2]; 0 = off).
    repetition_penalty: vLLM's (CTRL's), over prompt and generated tokens: a seen token's positive logit is divided
        by it, a negative one multiplied (> 0; 1 = off).
    logit_bias: (token id, bias in [-100, 100]) pairs added to the logits before sampling (OpenAI's).
    min_p: drop tokens whose probability is below min_p x the top token's (after temperature; 0 = off).
    min_tokens: the stop token ids and end-of-sequence ids cannot be sampled, and stop strings do not end the
        request, before this many tokens were generated.
    structured: what the generated tokens must spell (engine/structured_output.py): a token mask per step, applied
        after the controls above; a row they leave without any allowed token follows the structure alone.
    Penalties, bias, min_p and structure change what is sampled (greedy included), never the reported raw logprobs.
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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_p: float = 0.0
    min_tokens: int = 0
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and frozen into tuples so params stay hashable and immutable.
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in bias))
        self._validate_sampling()
        self._validate_controls()
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

    def _validate_controls(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise ValueError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        if any(t < 0 or not -100.0 <= b <= 100.0 for t, b in self.logit_bias):
            raise ValueError("logit_bias maps token ids (>= 0) to biases in [-100, 100], got "
                             f"{dict(self.logit_bias)}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise ValueError(f"structured must be a StructuredOutput or None, got {type(self.structured).__name__}")

    @property
    def shapes_logits(self) -> bool:
        """Whether the sampler must change this row's logits beyond temperature/top-k/top-p (it then needs the
        row's prompt and output ids)."""
        return self.has_controls or self.structured is not None

    @property
    def has_controls(self) -> bool:
        """Penalties, logit_bias, min_p or min_tokens (engine/logits_shaper.py and the sampler's min-p)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_p or self.min_tokens)

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
