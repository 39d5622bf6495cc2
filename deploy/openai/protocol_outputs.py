"""OpenAI response bodies: chat completions (whole and SSE chunks), text completions, usage, logprobs, model list.

Owns the shapes clients parse; builds nothing from engine outputs itself except the one-line bridges from harmony
parser results (`ChatMessage.from_parsed`, `DeltaMessage.from_harmony`). Chat messages carry `reasoning_content`
(analysis channel) beside `content` (final channel), as vLLM's gpt-oss support does.
"""
from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, Field

from deploy.harmony.output import HarmonyDelta, ParsedCompletion


def random_id(prefix: str) -> str:
    """`chatcmpl-...`, `cmpl-...`; Responses ids use `resp_`, `msg_`, `rs_`, `fc_` prefixes (OpenAI's)."""
    sep = "_" if prefix in ("resp", "msg", "rs", "fc", "call") else "-"
    return f"{prefix}{sep}{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> "UsageInfo":
        details = PromptTokensDetails(cached_tokens=cached_tokens) if cached_tokens is not None else None
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens, prompt_tokens_details=details)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatCompletionTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatCompletionLogprobs(BaseModel):
    content: list[ChatCompletionTokenLogprob] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)

    @classmethod
    def from_parsed(cls, parsed: ParsedCompletion) -> "ChatMessage":
        calls = [ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
                 for c in parsed.tool_calls]
        return cls(content=parsed.content, reasoning_content=parsed.reasoning_content, tool_calls=calls)


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChatCompletionLogprobs | None = None
    finish_reason: str | None = None         # "stop" | "length" | "tool_calls" | "abort"
    stop_reason: int | str | None = None     # vLLM extension: the stop token id or string that matched


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @classmethod
    def from_harmony(cls, delta: HarmonyDelta, role: bool = False) -> "DeltaMessage":
        """The chunk delta for what the harmony parser emitted; the first call of a tool carries id, type, name."""
        calls = [DeltaToolCall(index=c.index, id=c.id, type="function" if c.id else None,
                               function=DeltaFunctionCall(name=c.name, arguments=c.arguments))
                 for c in delta.tool_calls]
        return cls(role="assistant" if role else None, content=delta.content or None,
                   reasoning_content=delta.reasoning_content or None, tool_calls=calls or None)


class ChatCompletionChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatCompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    """One SSE `data:` event; with stream_options.include_usage the last chunk has no choices and the usage."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatCompletionChunkChoice] = Field(default_factory=list)
    usage: UsageInfo | None = None


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    """Both the whole response and each streamed chunk (OpenAI streams `text_completion` objects too)."""

    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice] = Field(default_factory=list)
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "epserve"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)
