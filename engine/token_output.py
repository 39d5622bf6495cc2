"""TokenOutput: what the engine hands back per sequence per step (the contract replica -> gateway)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TokenOutput:
    request_id: str
    index: int                                    # which of the request's n completions
    new_token_ids: list[int]                      # generated this step (one token per step today)
    output_token_ids: list[int]                   # every generated token, on the finished output only ([] before:
                                                  # a stream accumulates new_token_ids; O(1) per step, not O(output))
    num_prompt_tokens: int
    finished: bool = False
    finish_reason: str | None = None              # "stop" | "length" | "abort" once finished
    stop_reason: int | str | None = None          # the stop token id or stop string that matched
    output_text: str | None = None                # finished by a stop string: the text cut there (StopChecker)
    queue_time_s: float | None = None             # on the first token: arrival -> first scheduled
    logprobs: list[float] = field(default_factory=list)                 # one per new token, when asked
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    num_output_tokens: int = 0                    # generated so far (len(output_token_ids) once finished)
    num_cached_tokens: int = 0                    # prompt tokens the prefix cache served (usage.cached_tokens)


def coalesce(outputs: list[TokenOutput]) -> list[TokenOutput]:
    """Outputs of one request that arrived together, one per completion index (first-seen order): new tokens and
    logprobs concatenated in order, the rest from the latest (so a finished output stays finished). A stream that
    fell behind sends one chunk with every token it has instead of a queue of chunks."""
    merged: dict[int, TokenOutput] = {}
    for out in outputs:
        prev = merged.get(out.index)
        merged[out.index] = out if prev is None else dataclasses.replace(
            out, new_token_ids=prev.new_token_ids + out.new_token_ids, logprobs=prev.logprobs + out.logprobs,
            top_logprobs=prev.top_logprobs + out.top_logprobs,
            queue_time_s=prev.queue_time_s if prev.queue_time_s is not None else out.queue_time_s)
    return list(merged.values())
