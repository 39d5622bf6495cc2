"""/v1/chat/completions over harmony, and the generation plumbing the completion and Responses services reuse.

Owns: request -> GenerationPlan (harmony render, GenerateRequests, how outputs become a body or SSE events); merged
backend streams that close (cancelling the request, freeing its KV blocks) when their consumer stops. Knows no HTTP
(routes.py runs the plan, watches for disconnects, writes errors) and never imports Ray.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

from pydantic import BaseModel

from engine.generate_request import GenerateRequest
from deploy.openai.session_key import session_key
from deploy.openai.errors import APIError, BadRequestError
from deploy.harmony.render import HarmonyRenderError, RenderOptions, render_chat
from deploy.harmony.grammar import harmony_structure
from deploy.harmony.parser import HarmonyStreamParser, parse_completion
from deploy.openai.protocol import ChatCompletionRequest, to_sampling_params
from deploy.openai.protocol_outputs import (ChatCompletionChoice, ChatCompletionChunk, ChatCompletionChunkChoice,
                                     ChatCompletionLogprobs, ChatCompletionResponse, ChatCompletionTokenLogprob,
                                     ChatMessage, DeltaMessage, TopLogprob, UsageInfo, now, random_id)
from deploy.serving_context import ServingContext
from deploy.openai.structured_outputs import final_constraint, requirements
from engine.token_output import TokenOutput

logger = logging.getLogger(__name__)
DONE = "data: [DONE]\n\n"


# ---- plumbing shared by the three generation routes ------------------------------------------------------------
def as_api_error(exc: BaseException) -> APIError:
    """An APIError as it is; anything else is logged with its traceback and becomes a generic 500."""
    if isinstance(exc, APIError):
        return exc
    logger.error("unexpected error serving a request", exc_info=exc)
    return APIError("The server had an error while processing the request.")


def sse(data: str, event: str | None = None) -> str:
    return (f"event: {event}\n" if event else "") + f"data: {data}\n\n"


def sse_error(exc: BaseException) -> str:
    """An error after the stream started: the OpenAI error body as one `data:` event (the SDK raises on it)."""
    return sse(as_api_error(exc).response().model_dump_json())


async def generate_outputs(backend, requests: list[GenerateRequest]) -> AsyncIterator[tuple[int, TokenOutput]]:
    """(prompt index, TokenOutput) from one backend stream per request. Closing or cancelling this closes every
    backend stream (aborting its request). A ValueError from the backend (a request the engine can never serve,
    e.g. a token id outside the vocabulary) becomes a 400."""
    try:
        if len(requests) == 1:
            async with aclosing(backend.stream(requests[0])) as stream:
                async for out in stream:
                    yield 0, out
            return
        async for item in _merge(backend, requests):
            yield item
    except ValueError as e:
        raise BadRequestError(str(e)) from None


async def _merge(backend, requests: list[GenerateRequest]) -> AsyncIterator[tuple[int, TokenOutput]]:
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, request: GenerateRequest) -> None:
        try:
            async with aclosing(backend.stream(request)) as stream:
                async for out in stream:
                    queue.put_nowait((index, out))
            queue.put_nowait((index, None))
        except Exception as e:   # handed to the consumer, which raises it
            queue.put_nowait((index, e))

    tasks = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(requests)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            remaining -= item is None
            if item is not None:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()   # each pump's stream closes in its own task, on the next loop iteration


@dataclass
class SequenceResult:
    """One completion (one of n, of one prompt) collected from its TokenOutputs."""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    output_text: str | None = None
    num_cached_tokens: int = 0

    def add(self, out: TokenOutput) -> None:
        self.num_cached_tokens = out.num_cached_tokens
        if out.finished:
            self.token_ids = list(out.output_token_ids)
        else:
            self.token_ids += out.new_token_ids
        self.logprobs += out.logprobs
        self.top_logprobs += out.top_logprobs
        self.finish_reason, self.stop_reason, self.output_text = out.finish_reason, out.stop_reason, out.output_text

    def text_token_ids(self) -> list[int]:
        """The ids without the matched stop token the engine keeps at the end."""
        return self.token_ids[:-1] if ends_with_stop_id(self.token_ids, self.finish_reason, self.stop_reason) \
            else self.token_ids


def ends_with_stop_id(ids: list[int], finish_reason: str | None, stop_reason) -> bool:
    return finish_reason == "stop" and isinstance(stop_reason, int) and bool(ids) and ids[-1] == stop_reason


async def collect(outputs: AsyncIterator[tuple[int, TokenOutput]]) -> dict[tuple[int, int], SequenceResult]:
    """Every sequence of the request, keyed by (prompt index, completion index)."""
    results: dict[tuple[int, int], SequenceResult] = {}
    async with aclosing(outputs):
        async for prompt_index, out in outputs:
            results.setdefault((prompt_index, out.index), SequenceResult()).add(out)
    return results


def cut_at_stop(text: str, stop: str | None, include_stop: bool) -> str:
    """The text before the first `stop` (through it with include_stop), as the engine's StopChecker cuts."""
    at = text.find(stop) if stop else -1
    return text if at < 0 else text[:at + len(stop) if include_stop else at]


class StopHoldback:
    """Holds back the last len(longest stop string) - 1 characters of streamed text, so text that turns out to be
    part of a stop string is never sent; the final push cuts at the matched stop string like the engine does."""

    def __init__(self, stops: list[str] | None, include_stop: bool):
        self.keep = max((len(s) for s in stops or ()), default=1) - 1
        self.include_stop = include_stop
        self.pending = ""

    def push(self, text: str, finished: bool = False, stop: str | None = None) -> str:
        self.pending += text
        if finished:
            out, self.pending = self.pending, ""
            return cut_at_stop(out, stop, self.include_stop)
        split = max(0, len(self.pending) - self.keep)
        out, self.pending = self.pending[:split], self.pending[split:]
        return out


@dataclass(frozen=True)
class GenerationPlan:
    """What a route runs for one request: `requests` on the backend, then either `events` (SSE text) made from the
    merged outputs, or `body` (the JSON response) made from the collected sequences."""
    requests: list[GenerateRequest]
    stream: bool
    events: Callable[[AsyncIterator[tuple[int, TokenOutput]]], AsyncIterator[str]]
    body: Callable[[dict[tuple[int, int], SequenceResult]], BaseModel]


# ---- chat completions ------------------------------------------------------------------------------------------
def plan_chat_completion(ctx: ServingContext, req: ChatCompletionRequest) -> GenerationPlan:
    final, section = final_constraint(req.response_format, req.structured_outputs_param(), "response_format")
    output = requirements(req.tools or [], req.tool_choice, final, section)
    try:
        options = RenderOptions(reasoning_effort=req.reasoning_effort or "medium", tools=req.effective_tools,
                                response_format=section)
        prompt_ids = render_chat(ctx.tokenizer, req.messages, options).token_ids
    except HarmonyRenderError as e:
        raise BadRequestError(str(e), param="messages") from None
    stop_ids = () if req.ignore_eos else ctx.tokenizer.harmony_stop_ids()
    params = to_sampling_params(req, ctx.max_model_len, len(prompt_ids), stop_token_ids=stop_ids,
                                structured=harmony_structure(ctx.tokenizer, output))
    response_id = random_id("chatcmpl")

    def body(results: dict[tuple[int, int], SequenceResult]) -> ChatCompletionResponse:
        choices = [_choice(ctx, req, i, results[(0, i)]) for i in range(params.n)]
        usage = UsageInfo.of(len(prompt_ids), sum(len(r.token_ids) for r in results.values()),
                             results[(0, 0)].num_cached_tokens)
        return ChatCompletionResponse(id=response_id, model=ctx.model_name, choices=choices, usage=usage)
    return GenerationPlan([GenerateRequest(response_id, prompt_ids, params, routing_key=session_key(req))],
                          bool(req.stream), lambda outputs: _chat_events(ctx, req, response_id, len(prompt_ids), outputs), body)


def _choice(ctx: ServingContext, req: ChatCompletionRequest, index: int, seq: SequenceResult) -> ChatCompletionChoice:
    parsed = parse_completion(ctx.tokenizer, seq.token_ids, seq.finish_reason)
    message = ChatMessage.from_parsed(parsed)
    if isinstance(seq.stop_reason, str):    # a stop string ended it: cut the text where it matched
        stop, include = seq.stop_reason, req.include_stop_str_in_output
        if message.reasoning_content and stop in message.reasoning_content:
            message.reasoning_content, message.content = cut_at_stop(message.reasoning_content, stop, include), None
        elif message.content:
            message.content = cut_at_stop(message.content, stop, include)
    logprobs = chat_logprobs(ctx.tokenizer, seq.token_ids, seq.logprobs, seq.top_logprobs) if req.logprobs else None
    return ChatCompletionChoice(index=index, message=message, logprobs=logprobs, finish_reason=parsed.finish_reason,
                                stop_reason=seq.stop_reason)


def chat_logprobs(tokenizer, ids: list[int], logprobs: list[float], top: list[list[tuple[int, float]]]
                  ) -> ChatCompletionLogprobs:
    """Chat-shaped logprobs of every generated token (harmony structure tokens included)."""
    def entry(token_id: int, logprob: float) -> dict:
        token = tokenizer.decode([token_id])
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}
    content = [ChatCompletionTokenLogprob(**entry(t, lp), top_logprobs=[TopLogprob(**entry(a, alp)) for a, alp in alts])
               for t, lp, alts in zip(ids, logprobs, top + [[]] * (len(logprobs) - len(top)))]
    return ChatCompletionLogprobs(content=content)


class _ChoiceStream:
    """Streaming state of one of the n choices: harmony parser, stop-string holdback, logprobs not yet sent."""

    def __init__(self, ctx: ServingContext, req: ChatCompletionRequest):
        self.tokenizer, self.want_logprobs = ctx.tokenizer, bool(req.logprobs)
        self.parser = HarmonyStreamParser(ctx.tokenizer)
        self.content = StopHoldback(req.stop, req.include_stop_str_in_output)
        self.reasoning = StopHoldback(req.stop, req.include_stop_str_in_output)
        self.logprobs: list[ChatCompletionTokenLogprob] = []
        self.num_tokens = self.num_cached_tokens = 0

    def update(self, out: TokenOutput) -> list[ChatCompletionChunkChoice]:
        self.num_tokens, self.num_cached_tokens = out.num_output_tokens, out.num_cached_tokens
        delta = self.parser.feed(out.new_token_ids)
        if out.finished:
            delta.merge(self.parser.finish())
        stop = out.stop_reason if out.finished and isinstance(out.stop_reason, str) else None
        delta.content = self.content.push(delta.content, out.finished, stop)
        delta.reasoning_content = self.reasoning.push(delta.reasoning_content, out.finished, stop)
        if self.want_logprobs:
            self.logprobs += chat_logprobs(self.tokenizer, out.new_token_ids, out.logprobs, out.top_logprobs).content
        choices = []
        if delta:
            choices.append(ChatCompletionChunkChoice(index=out.index, delta=DeltaMessage.from_harmony(delta),
                                                     logprobs=self._take_logprobs()))
        if out.finished:
            choices.append(ChatCompletionChunkChoice(
                index=out.index, delta=DeltaMessage(), logprobs=self._take_logprobs(),
                finish_reason=self.parser.finish_reason(out.finish_reason), stop_reason=out.stop_reason))
        return choices

    def _take_logprobs(self) -> ChatCompletionLogprobs | None:
        if not self.logprobs:
            return None
        taken, self.logprobs = self.logprobs, []
        return ChatCompletionLogprobs(content=taken)


async def _chat_events(ctx: ServingContext, req: ChatCompletionRequest, response_id: str, num_prompt_tokens: int,
                       outputs: AsyncIterator[tuple[int, TokenOutput]]) -> AsyncIterator[str]:
    """SSE: a role chunk per choice, content / reasoning_content / tool_calls deltas, a finish chunk per choice,
    the usage chunk when asked, `data: [DONE]`. An error mid-stream is a `data: {"error": ...}` event."""
    created, n = now(), req.n or 1
    states = [_ChoiceStream(ctx, req) for _ in range(n)]

    def chunk(choices: list, usage: UsageInfo | None = None) -> str:
        return sse(ChatCompletionChunk(id=response_id, created=created, model=ctx.model_name, choices=choices,
                                       usage=usage).model_dump_json(exclude_none=True))
    try:
        async with aclosing(outputs):
            continuous = bool(req.stream_options and req.stream_options.every_chunk())

            def usage_so_far() -> UsageInfo | None:      # vLLM's continuous_usage_stats: on every chunk
                return UsageInfo.of(num_prompt_tokens, sum(s.num_tokens for s in states),
                                    states[0].num_cached_tokens) if continuous else None
            for i in range(n):
                yield chunk([ChatCompletionChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))],
                            usage_so_far())
            async for _, out in outputs:
                for choice in states[out.index].update(out):
                    yield chunk([choice], usage_so_far())
        if req.stream_options and req.stream_options.include_usage:
            yield chunk([], UsageInfo.of(num_prompt_tokens, sum(s.num_tokens for s in states),
                                         states[0].num_cached_tokens))
    except Exception as e:
        yield sse_error(e)
    yield DONE
