"""The OpenAI Responses API (/v1/responses): request, response object, output items and streaming events.

Owns the shapes only; reasoning streams as `response.reasoning_text.delta` (OpenAI's current event name).
"""
from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from deploy.openai.protocol import OpenAIModel, RequestModel
from deploy.openai.protocol_outputs import now, random_id
from deploy.openai.request_fields import RESPONSES_FIELDS
from deploy.openai.structured_protocol import TextConfig

# Stored responses live in a store every gateway replica shares (deploy/openai/response_store.py), so any replica answers
# any `previous_response_id` (ANCHORS §4 #10: vLLM's per-replica store breaks behind a balancer).
INPUT_ITEM_TYPES = ("message", "reasoning", "function_call", "function_call_output")


class ReasoningConfig(OpenAIModel):
    effort: Literal["low", "medium", "high"] | None = None
    summary: str | None = None


class FunctionTool(OpenAIModel):
    type: Literal["function"] = "function"
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponsesRequest(RequestModel):
    KNOWN_FIELDS: ClassVar[dict[str, tuple | None]] = RESPONSES_FIELDS
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    reasoning: ReasoningConfig | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool | None = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict | None = None       # checked with the tools (deploy/openai/structured_outputs.py)
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    store: bool | None = None                   # None: True, as OpenAI
    previous_response_id: str | None = Field(None, min_length=1)
    background: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _check_input(cls, value):
        if isinstance(value, str):
            return value
        if not value:
            raise ValueError("input must be a non-empty string or list of items")
        for n, item in enumerate(value):
            kind = item.get("type") or ("message" if "role" in item else None)
            if kind not in INPUT_ITEM_TYPES:
                raise ValueError(f"input[{n}]: item type {kind!r} is not supported; use one of {INPUT_ITEM_TYPES}")
        return value

    @field_validator("tools")
    @classmethod
    def _check_tools(cls, tools):
        for tool in tools or []:
            if tool.get("type") != "function":
                raise ValueError(f"tool type {tool.get('type')!r} is not supported; only function tools are")
        return [FunctionTool.model_validate(t).model_dump(exclude_none=True) for t in tools] if tools else tools

    @model_validator(mode="after")
    def _check_background(self):
        if self.background:
            raise ValueError("background responses are not supported")
        return self

    @property
    def reasoning_effort(self) -> str:
        return (self.reasoning.effort if self.reasoning else None) or "medium"

    @property
    def effective_tools(self) -> list[dict]:
        return [] if self.tool_choice == "none" else list(self.tools or [])

    def requested_max_tokens(self) -> int | None:
        return self.max_output_tokens

    def sampling_kwargs(self) -> dict:
        return {k: getattr(self, k) for k in ("temperature", "top_p") if getattr(self, k) is not None}


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list = Field(default_factory=list)
    logprobs: list = Field(default_factory=list)


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str = Field(default_factory=lambda: random_id("msg"))
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"] = "completed"
    content: list[OutputText] = Field(default_factory=list)


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class ReasoningItem(BaseModel):
    type: Literal["reasoning"] = "reasoning"
    id: str = Field(default_factory=lambda: random_id("rs"))
    summary: list = Field(default_factory=list)
    content: list[ReasoningText] = Field(default_factory=list)
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallItem(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str = Field(default_factory=lambda: random_id("fc"))
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


OutputItem = Annotated[ReasoningItem | OutputMessage | FunctionCallItem, Field(discriminator="type")]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)

    @classmethod
    def of(cls, input_tokens: int, output_tokens: int, reasoning_tokens: int = 0, cached_tokens: int = 0):
        return cls(input_tokens=input_tokens, output_tokens=output_tokens, total_tokens=input_tokens + output_tokens,
                   input_tokens_details=InputTokensDetails(cached_tokens=cached_tokens),
                   output_tokens_details=OutputTokensDetails(reasoning_tokens=reasoning_tokens))


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseObject(BaseModel):
    id: str = Field(default_factory=lambda: random_id("resp"))
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=now)
    status: Literal["completed", "failed", "in_progress", "incomplete", "cancelled"] = "completed"
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    usage: ResponseUsage | None = None
    error: dict | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    reasoning: ReasoningConfig | None = None
    tools: list[dict] = Field(default_factory=list)
    tool_choice: str | dict = "auto"
    text: dict = Field(default_factory=lambda: {"format": {"type": "text"}})
    parallel_tool_calls: bool = False    # gpt-oss calls one tool per turn (it stops at <|call|>)
    previous_response_id: str | None = None
    store: bool = False                  # whether it was stored (asked for, and the server has a store)
    background: bool = False
    metadata: dict[str, str] | None = None

    @property
    def output_text(self) -> str:
        """The final answer text, like the OpenAI SDK's `response.output_text`."""
        return "".join(part.text for item in self.output if isinstance(item, OutputMessage) for part in item.content)


class ResponseEvent(BaseModel):
    """Base of every streamed event: `event: {type}` / `data: {json}`; sequence_number counts from 0 per response."""

    type: str
    sequence_number: int


class ResponseLifecycleEvent(ResponseEvent):
    type: Literal["response.created", "response.in_progress", "response.completed", "response.incomplete",
                  "response.failed"]
    response: ResponseObject


class OutputItemEvent(ResponseEvent):
    type: Literal["response.output_item.added", "response.output_item.done"]
    output_index: int
    item: OutputItem


class ContentPartEvent(ResponseEvent):
    type: Literal["response.content_part.added", "response.content_part.done"]
    item_id: str
    output_index: int
    content_index: int = 0
    part: OutputText | ReasoningText


class TextDeltaEvent(ResponseEvent):
    type: Literal["response.output_text.delta", "response.reasoning_text.delta"]
    item_id: str
    output_index: int
    content_index: int = 0
    delta: str
    logprobs: list | None = None


class TextDoneEvent(ResponseEvent):
    type: Literal["response.output_text.done", "response.reasoning_text.done"]
    item_id: str
    output_index: int
    content_index: int = 0
    text: str
    logprobs: list | None = None


class FunctionCallArgumentsDeltaEvent(ResponseEvent):
    type: Literal["response.function_call_arguments.delta"] = "response.function_call_arguments.delta"
    item_id: str
    output_index: int
    delta: str


class FunctionCallArgumentsDoneEvent(ResponseEvent):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    item_id: str
    output_index: int
    name: str | None = None
    arguments: str


class ErrorEvent(ResponseEvent):
    type: Literal["error"] = "error"
    code: str | None = None
    message: str
    param: str | None = None


class InputItemList(BaseModel):
    """GET /v1/responses/{id}/input_items: OpenAI's list object, one page of a response's input items."""
    object: Literal["list"] = "list"
    data: list[dict]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: bool = True
