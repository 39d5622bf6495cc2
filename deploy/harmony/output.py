"""What harmony parsing produces: streamed deltas, parsed messages and completions, and where each message goes.

Owns the result types and the routing rule (`classify`) shared by the streaming parser and the gateway.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field

REASONING, CONTENT, TOOL = "reasoning", "content", "tool"


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCallDelta:
    index: int                  # which tool call of this completion (0, 1, ...)
    id: str | None = None       # set on the call's first delta, with the name
    name: str | None = None
    arguments: str = ""


@dataclass
class HarmonyDelta:
    """What one token (or a step's tokens) added; fields map onto a chat chunk's delta."""

    reasoning_content: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning_content or self.content or self.tool_calls)

    def merge(self, other: "HarmonyDelta") -> None:
        self.reasoning_content += other.reasoning_content
        self.content += other.content
        for call in other.tool_calls:
            last = self.tool_calls[-1] if self.tool_calls else None
            if last is not None and last.index == call.index and call.id is None:
                last.arguments += call.arguments
            else:
                self.tool_calls.append(ToolCallDelta(call.index, call.id, call.name, call.arguments))


@dataclass(frozen=True)
class HarmonyMessage:
    role: str
    channel: str | None
    recipient: str | None
    content_type: str | None
    kind: str                   # REASONING | CONTENT | TOOL
    text: str                   # decoded in one piece from the message's ids
    end: str | None             # "<|end|>", "<|return|>", "<|call|>", or None when generation stopped inside it
    tool_call_id: str | None = None

    @property
    def tool_name(self) -> str | None:
        return self.recipient.removeprefix("functions.") if self.kind == TOOL and self.recipient else None


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ParsedCompletion:
    content: str | None
    reasoning_content: str | None
    tool_calls: list[ToolCall]
    finish_reason: str | None
    messages: list[HarmonyMessage]


def adjust_finish_reason(finish_reason: str | None, has_tool_calls: bool) -> str | None:
    """A completion that called a tool finishes with "tool_calls" (OpenAI); "length"/"abort" stay as they are."""
    return "tool_calls" if has_tool_calls and finish_reason in (None, "stop") else finish_reason


def classify(channel: str | None, recipient: str | None) -> str:
    """Where a message's text goes: recipient `functions.NAME` (role or channel part of the header) -> a tool call;
    `analysis` -> reasoning; `final` -> content; `commentary` without a recipient -> content (a preamble is written
    for the user, format.md "Preambles"); any other recipient (built-in tools we do not run, `assistant`) ->
    reasoning; no channel or an unknown one -> content (the fallback for malformed output)."""
    if recipient and recipient.startswith("functions.") and len(recipient) > len("functions."):
        return TOOL
    if recipient or channel == "analysis":
        return REASONING
    return CONTENT
