"""/v1/completions: raw text or token-id prompts (no harmony), one backend request per prompt, text choices; with
response_format or vLLM's structured outputs the whole generated text matches the constraint.

Owns prompt tokenization, the completions-shaped logprobs and incremental detokenization for streaming. Stops on
the model's end-of-sequence ids (ServingContext.eos_token_ids) plus the request's; the matched stop id is never
part of the text. Knows no HTTP (routes.py runs the plan) and never imports Ray.
"""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing

from engine.generate_request import GenerateRequest
from deploy.openai.session_key import session_key
from deploy.openai.chat_service import DONE, GenerationPlan, SequenceResult, StopHoldback, ends_with_stop_id, sse, sse_error
from deploy.openai.protocol import CompletionRequest, to_sampling_params
from deploy.openai.protocol_outputs import CompletionChoice, CompletionLogprobs, CompletionResponse, UsageInfo, now, random_id
from deploy.serving_context import ServingContext
from deploy.openai.structured_outputs import completion_structure, final_constraint
from engine.token_output import TokenOutput

logger = logging.getLogger(__name__)


def plan_completion(ctx: ServingContext, req: CompletionRequest) -> GenerationPlan:
    """Choice index = prompt index * n + completion index, as OpenAI and vLLM number them."""
    prompts = [ctx.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in req.prompts()]
    stop_ids = () if req.ignore_eos else ctx.eos_token_ids
    final, _ = final_constraint(req.response_format, req.structured_outputs_param(), "response_format")
    structured = completion_structure(ctx.tokenizer, final, stop_ids)      # the raw text itself is constrained
    params = [to_sampling_params(req, ctx.max_model_len, len(ids), stop_token_ids=stop_ids, structured=structured)
              for ids in prompts]
    response_id, n = random_id("cmpl"), params[0].n
    requests = [GenerateRequest(response_id if len(prompts) == 1 else f"{response_id}-{p}", ids, prm,
                                routing_key=session_key(req))
                for p, (ids, prm) in enumerate(zip(prompts, params))]
    num_prompt_tokens = sum(len(ids) for ids in prompts)

    def body(results: dict[tuple[int, int], SequenceResult]) -> CompletionResponse:
        choices = [_choice(ctx.tokenizer, req, p * n + i, results[(p, i)])
                   for p in range(len(prompts)) for i in range(n)]
        usage = UsageInfo.of(num_prompt_tokens, sum(len(r.token_ids) for r in results.values()),
                             sum(results[(p, 0)].num_cached_tokens for p in range(len(prompts))))
        return CompletionResponse(id=response_id, model=ctx.model_name, choices=choices, usage=usage)
    return GenerationPlan(requests, bool(req.stream),
                          lambda outputs: _completion_events(ctx, req, response_id, n, num_prompt_tokens, outputs),
                          body)


def _choice(tokenizer, req: CompletionRequest, index: int, seq: SequenceResult) -> CompletionChoice:
    ids = seq.text_token_ids()
    if isinstance(seq.stop_reason, str) and seq.output_text is not None:
        text = seq.output_text     # the engine cut it at the stop string
    else:
        text = tokenizer.decode(ids)
    logprobs = None
    if req.logprobs is not None:
        logprobs = completion_logprobs(tokenizer, ids, seq.logprobs, seq.top_logprobs)
    return CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=seq.finish_reason,
                            stop_reason=seq.stop_reason)


def completion_logprobs(tokenizer, ids: list[int], logprobs: list[float], top: list[list[tuple[int, float]]],
                        offset: int = 0) -> CompletionLogprobs:
    """OpenAI's legacy shape: parallel lists of token strings, their logprobs, {token: logprob} alternatives and
    character offsets (counted from `offset`, the text already sent)."""
    tokens = [tokenizer.decode([t]) for t in ids]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    alternatives = [{tokenizer.decode([t]): lp for t, lp in alts} for alts in top[:len(ids)]]
    return CompletionLogprobs(text_offset=offsets, token_logprobs=list(logprobs[:len(ids)]), tokens=tokens,
                              top_logprobs=alternatives + [None] * (len(ids) - len(alternatives)))


class IncrementalText:
    """Token ids in, new text out, never splitting a UTF-8 character across tokens (a byte-level BPE token can end
    inside one): text is released once the ids decode without a trailing replacement character."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0   # ids[prefix:read] were decoded already; they give context to the next decode
        self.read = 0

    def push(self, ids: list[int], final: bool = False) -> str:
        self.ids += ids
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]


class _SequenceStream:
    """Streaming state of one sequence: its text so far, the stop-string holdback, the logprob offset."""

    def __init__(self, tokenizer, req: CompletionRequest):
        self.tokenizer, self.want_logprobs = tokenizer, req.logprobs is not None
        self.text = IncrementalText(tokenizer)
        self.holdback = StopHoldback(req.stop, req.include_stop_str_in_output)
        self.offset = 0
        self.num_tokens = self.num_cached_tokens = 0

    def update(self, index: int, out: TokenOutput) -> CompletionChoice | None:
        self.num_tokens, self.num_cached_tokens = out.num_output_tokens, out.num_cached_tokens
        ids = out.new_token_ids
        if out.finished and ends_with_stop_id(out.output_token_ids, out.finish_reason, out.stop_reason):
            ids = ids[:-1]
        stop = out.stop_reason if out.finished and isinstance(out.stop_reason, str) else None
        text = self.holdback.push(self.text.push(ids, final=out.finished), out.finished, stop)
        if not text and not out.finished:
            return None
        logprobs = None
        if self.want_logprobs:
            logprobs = completion_logprobs(self.tokenizer, ids, out.logprobs, out.top_logprobs, self.offset)
            self.offset += sum(len(t) for t in logprobs.tokens)
        return CompletionChoice(index=index, text=text, logprobs=logprobs,
                                finish_reason=out.finish_reason if out.finished else None,
                                stop_reason=out.stop_reason if out.finished else None)


def _usage(num_prompt_tokens: int, states: dict, n: int) -> UsageInfo:
    """Usage so far: every choice's tokens; cached prompt tokens once per prompt (its first choice's)."""
    return UsageInfo.of(num_prompt_tokens, sum(s.num_tokens for s in states.values()),
                        sum(s.num_cached_tokens for i, s in states.items() if i % n == 0))


async def _completion_events(ctx: ServingContext, req: CompletionRequest, response_id: str, n: int,
                             num_prompt_tokens: int, outputs: AsyncIterator[tuple[int, TokenOutput]]
                             ) -> AsyncIterator[str]:
    """SSE: `text_completion` chunks with text deltas (the last one of each choice carries its finish_reason),
    a usage chunk with no choices when stream_options.include_usage, then `data: [DONE]`."""
    created = now()
    states: dict[int, _SequenceStream] = {}

    def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
        return sse(CompletionResponse(id=response_id, created=created, model=ctx.model_name, choices=choices,
                                      usage=usage).model_dump_json(exclude_none=True))
    try:
        async with aclosing(outputs):
            continuous = bool(req.stream_options and req.stream_options.every_chunk())
            async for prompt_index, out in outputs:
                index = prompt_index * n + out.index
                choice = states.setdefault(index, _SequenceStream(ctx.tokenizer, req)).update(index, out)
                if choice is not None:
                    yield chunk([choice], _usage(num_prompt_tokens, states, n) if continuous else None)
        if req.stream_options and req.stream_options.include_usage:
            yield chunk([], _usage(num_prompt_tokens, states, n))
    except Exception as e:
        yield sse_error(e)
    yield DONE
