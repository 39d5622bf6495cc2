"""/v1/responses (OpenAI's Responses API) over harmony: plain and streamed, with real usage, stored for
`previous_response_id` and retrieval unless `store` is false.

Owns the mapping of harmony messages onto output items (analysis -> reasoning item, final -> message item with
output_text, commentary to=functions.* -> function_call item) and the streaming event order. One ResponseBuilder
serves both paths, so a streamed response ends with exactly the object a plain request returns. A response is
stored before its client learns it finished, so the next turn finds it whichever gateway it reaches. Knows no HTTP.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing

from engine.generate_request import GenerateRequest
from deploy.openai.session_key import session_key
from deploy.openai.errors import APIError, BadRequestError
from deploy.openai.chat_service import GenerationPlan, SequenceResult, as_api_error, sse
from deploy.harmony.render import HarmonyRenderError, RenderOptions, render_responses
from deploy.harmony.grammar import harmony_structure
from deploy.harmony.output import REASONING, HarmonyDelta, classify
from deploy.harmony.parser import HarmonyStreamParser
from deploy.openai.protocol import to_sampling_params
from deploy.openai.protocol_outputs import random_id
from deploy.openai.response_conversation import conversation
from deploy.openai.response_store import StoredResponse
from deploy.openai.responses_protocol import (ContentPartEvent, ErrorEvent, FunctionCallArgumentsDeltaEvent,
                                       FunctionCallArgumentsDoneEvent, FunctionCallItem, IncompleteDetails,
                                       OutputItemEvent, OutputMessage, OutputText, ReasoningConfig, ReasoningItem,
                                       ReasoningText, ResponseEvent, ResponseLifecycleEvent, ResponseObject,
                                       ResponsesRequest, ResponseUsage, TextDeltaEvent, TextDoneEvent)
from deploy.serving_context import ServingContext
from deploy.openai.structured_outputs import final_constraint, requirements
from engine.token_output import TokenOutput

logger = logging.getLogger(__name__)


def _render(ctx: ServingContext, items, options: RenderOptions, output):
    try:
        prompt_ids = render_responses(ctx.tokenizer, items, options).token_ids
    except HarmonyRenderError as e:
        raise BadRequestError(str(e), param="input") from None
    return prompt_ids, harmony_structure(ctx.tokenizer, output)


async def plan_response(ctx: ServingContext, req: ResponsesRequest, owner: str | None = None) -> GenerationPlan:
    """`owner`: response_store.key_owner of the caller's API key (None without API keys)."""
    text_format = req.text.format if req.text else None
    final, section = final_constraint(text_format.as_response_format() if text_format else None, None, "text.format")
    output = requirements(req.tools or [], req.tool_choice, final, section, responses=True)
    options = RenderOptions(reasoning_effort=req.reasoning_effort, tools=req.effective_tools,
                            instructions=req.instructions, response_format=section)
    items = await conversation(ctx, req, owner)
    # rendering and a new schema's grammar compile run off the event loop (routes._generate says why)
    prompt_ids, structured = await asyncio.to_thread(_render, ctx, items, options, output)
    params = to_sampling_params(req, ctx.max_model_len, len(prompt_ids),
                                stop_token_ids=ctx.tokenizer.harmony_stop_ids(), structured=structured)
    response_id = random_id("resp")
    store = ctx.response_store if req.store is not False else None

    def builder() -> ResponseBuilder:
        response = ResponseObject(
            id=response_id, model=ctx.model_name, status="in_progress", instructions=req.instructions,
            max_output_tokens=req.max_output_tokens, temperature=req.temperature, top_p=req.top_p,
            reasoning=ReasoningConfig(effort=req.reasoning_effort, summary=req.reasoning and req.reasoning.summary),
            tools=list(req.tools or []), tool_choice=req.tool_choice or "auto", metadata=req.metadata,
            previous_response_id=req.previous_response_id, store=store is not None,
            text={"format": text_format.model_dump(by_alias=True, exclude_none=True) if text_format
                  else {"type": "text"}})
        return ResponseBuilder(ctx.tokenizer, response, len(prompt_ids))

    async def save(response: ResponseObject) -> None:
        if store is not None:
            await store.save(StoredResponse(response=response.model_dump(mode="json"), input_items=items, owner=owner))

    async def body(results: dict[tuple[int, int], SequenceResult]) -> ResponseObject:
        seq, build = results[(0, 0)], builder()
        build.num_cached_tokens = seq.num_cached_tokens
        build.start()
        build.feed(seq.token_ids)
        build.settle(seq.finish_reason)
        await save(build.response)
        return build.response
    return GenerationPlan([GenerateRequest(response_id, prompt_ids, params, routing_key=session_key(req))],
                          bool(req.stream), lambda outputs: _response_events(builder(), outputs, save), body)


class ResponseBuilder:
    """Generated ids -> output items and the events that build them, in OpenAI's order: response.created,
    response.in_progress; per item output_item.added, [content_part.added], deltas, *.done, [content_part.done],
    output_item.done; then response.completed (or .incomplete when max_output_tokens cut it)."""

    def __init__(self, tokenizer, response: ResponseObject, num_prompt_tokens: int):
        self.parser = HarmonyStreamParser(tokenizer)
        self.response = response
        self.num_prompt_tokens = num_prompt_tokens
        self.num_output_tokens = self.num_reasoning_tokens = self.num_cached_tokens = 0
        self.item: ReasoningItem | OutputMessage | FunctionCallItem | None = None
        self.text = ""                 # what the open item has received so far
        self.sequence_number = 0

    def start(self) -> list[ResponseEvent]:
        return [self._lifecycle("response.created"), self._lifecycle("response.in_progress")]

    def feed(self, token_ids: list[int]) -> list[ResponseEvent]:
        """Reasoning tokens: those of analysis messages (and other reasoning-routed ones) from `<|message|>` to
        their end token; the header tokens are not counted."""
        events: list[ResponseEvent] = []
        for token_id in token_ids:
            was_reasoning = self._in_reasoning()
            num_closed = len(self.parser.messages)
            delta = self.parser.process(token_id)
            self.num_output_tokens += 1
            self.num_reasoning_tokens += was_reasoning or self._in_reasoning()
            events += self._on_delta(delta)
            if len(self.parser.messages) > num_closed:
                events += self._close("completed")
        return events

    def settle(self, finish_reason: str | None) -> list[ResponseEvent]:
        """Close the open item and set status and usage: the response is final, its last event not yet made."""
        complete = finish_reason == "stop"
        events = self._on_delta(self.parser.finish()) + self._close("completed" if complete else "incomplete")
        self.response.usage = ResponseUsage.of(self.num_prompt_tokens, self.num_output_tokens,
                                               self.num_reasoning_tokens, self.num_cached_tokens)
        self.response.status = "completed" if complete else "incomplete"
        if not complete:
            self.response.incomplete_details = IncompleteDetails(reason="max_output_tokens")
        return events

    def end(self) -> ResponseEvent:
        """response.completed or response.incomplete, after settle."""
        return self._lifecycle(f"response.{self.response.status}")

    def fail(self, error: APIError) -> list[ResponseEvent]:
        self.response.status = "failed"
        self.response.error = {"code": error.error_type, "message": error.message}
        return [self._event(ErrorEvent, code=error.error_type, message=error.message, param=error.param),
                self._lifecycle("response.failed")]

    # -- items -------------------------------------------------------------------------------------------------------
    def _in_reasoning(self) -> bool:
        p = self.parser
        return p.current_role is not None and classify(p.current_channel, p.current_recipient) == REASONING

    def _on_delta(self, delta: HarmonyDelta) -> list[ResponseEvent]:
        events = []
        if delta.reasoning_content:
            events += self._append(ReasoningItem, delta.reasoning_content)
        if delta.content:
            events += self._append(OutputMessage, delta.content)
        for call in delta.tool_calls:
            if call.id is not None:
                events += self._close("completed")
                events += self._open(FunctionCallItem(call_id=call.id, name=call.name or "", arguments="",
                                                      status="in_progress"))
            if call.arguments and isinstance(self.item, FunctionCallItem):
                events += self._append(FunctionCallItem, call.arguments)
        return events

    def _open(self, item) -> list[ResponseEvent]:
        self.item, self.text = item, ""
        self.response.output.append(item)
        events = [self._event(OutputItemEvent, type="response.output_item.added", output_index=self._index,
                              item=item.model_copy(deep=True))]
        if not isinstance(item, FunctionCallItem):
            part = ReasoningText(text="") if isinstance(item, ReasoningItem) else OutputText(text="")
            events.append(self._event(ContentPartEvent, type="response.content_part.added", item_id=item.id,
                                      output_index=self._index, part=part))
        return events

    def _append(self, kind: type, text: str) -> list[ResponseEvent]:
        events = []
        if not isinstance(self.item, kind):
            events += self._close("completed")
            events += self._open(kind(status="in_progress"))
        self.text += text
        where = {"item_id": self.item.id, "output_index": self._index}
        if kind is FunctionCallItem:
            return events + [self._event(FunctionCallArgumentsDeltaEvent, delta=text, **where)]
        kind_name = "reasoning_text" if kind is ReasoningItem else "output_text"
        extra = {} if kind is ReasoningItem else {"logprobs": []}
        return events + [self._event(TextDeltaEvent, type=f"response.{kind_name}.delta", delta=text, **where, **extra)]

    def _close(self, status: str) -> list[ResponseEvent]:
        item, text = self.item, self.text
        if item is None:
            return []
        self.item, self.text = None, ""
        item.status = status
        where = {"item_id": item.id, "output_index": self._index}   # the open item is always the last one
        if isinstance(item, FunctionCallItem):
            item.arguments = text
            events = [self._event(FunctionCallArgumentsDoneEvent, name=item.name, arguments=text, **where)]
        else:
            reasoning = isinstance(item, ReasoningItem)
            part = ReasoningText(text=text) if reasoning else OutputText(text=text)
            item.content = [part]
            kind_name = "reasoning_text" if reasoning else "output_text"
            events = [self._event(TextDoneEvent, type=f"response.{kind_name}.done", text=text, **where,
                                  **({} if reasoning else {"logprobs": []})),
                      self._event(ContentPartEvent, type="response.content_part.done", part=part, **where)]
        return events + [self._event(OutputItemEvent, type="response.output_item.done",
                                     output_index=where["output_index"], item=item.model_copy(deep=True))]

    @property
    def _index(self) -> int:
        return len(self.response.output) - 1

    def _event(self, cls: type, **fields) -> ResponseEvent:
        event = cls(sequence_number=self.sequence_number, **fields)
        self.sequence_number += 1
        return event

    def _lifecycle(self, kind: str) -> ResponseEvent:
        return self._event(ResponseLifecycleEvent, type=kind, response=self.response.model_copy(deep=True))


async def _response_events(builder: ResponseBuilder, outputs: AsyncIterator[tuple[int, TokenOutput]],
                           save: Callable[[ResponseObject], Awaitable[None]]) -> AsyncIterator[str]:
    """SSE `event: <type>` / `data: <json>` pairs; an error mid-stream (a failed save too) is an `error` event then
    response.failed. The response is saved before its last event. No `data: [DONE]`: OpenAI's Responses stream ends
    with its last event."""
    events = builder.start()
    try:
        async with aclosing(outputs):
            async for _, out in outputs:
                builder.num_cached_tokens = out.num_cached_tokens
                events += builder.feed(out.new_token_ids)
                if out.finished:
                    events += builder.settle(out.finish_reason)
                    await save(builder.response)
                    events.append(builder.end())
                for event in events:
                    yield sse(event.model_dump_json(), event=event.type)
                events = []
    except Exception as e:
        events += builder.fail(as_api_error(e))
    for event in events:
        yield sse(event.model_dump_json(), event=event.type)
