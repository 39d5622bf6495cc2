"""Harmony rendering: OpenAI chat messages / Responses input -> the gpt-oss prompt, ending with `<|start|>assistant`.

Owns the prompt text and its token ids (gpt-oss-spec.md §4.2, harmony `docs/format.md`). Special tokens are resolved
by name through deploy.tokenizer.Tokenizer, never by number; parsing the model's output lives in parser.py.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from deploy.harmony.tools import ToolDefinitionError, render_functions_namespace

DEFAULT_MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
DEFAULT_KNOWLEDGE_CUTOFF = "2024-06"
REASONING_EFFORTS = ("low", "medium", "high")
VALID_CHANNELS_LINE = "# Valid channels: analysis, commentary, final. Channel must be included for every message."
TOOLS_CHANNEL_LINE = "Calls to these tools must go to the commentary channel: 'functions'."
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_SPECIAL_START = re.compile(r"(?<=<)(?=\|)")  # between "<" and "|": every special token starts with "<|"


class HarmonyRenderError(ValueError):
    """The conversation cannot be rendered (unknown role, tool result without a call, ...): a 400 for the client."""


@dataclass(frozen=True)
class RenderOptions:
    """What the system and developer messages say besides the conversation itself.

    reasoning_effort: `Reasoning: low|medium|high` in the system message (harmony's default is medium).
    tools: OpenAI function tool definitions (Chat or Responses shape); rendered into the developer message.
    current_date: "YYYY-MM-DD" or None. None omits the line, so the prompt (and the prefix cache) does not change
        at midnight; HF's chat template always writes today's date.
    instructions: developer instructions placed before any taken from leading system/developer messages
        (the Responses API's `instructions`).
    response_format: the answer's JSON schema (deploy.openai.structured_outputs.ResponseFormatSection: name, description,
        schema), shown in the developer message's `# Response Formats` section as gpt-oss was trained to read it.
    """

    reasoning_effort: str = "medium"
    tools: tuple = ()
    model_identity: str = DEFAULT_MODEL_IDENTITY
    knowledge_cutoff: str = DEFAULT_KNOWLEDGE_CUTOFF
    current_date: str | None = None
    instructions: str | None = None
    response_format: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "tools", tuple(self.tools or ()))
        if self.reasoning_effort not in REASONING_EFFORTS:
            raise HarmonyRenderError(f"reasoning_effort must be one of {list(REASONING_EFFORTS)}, "
                                     f"got {self.reasoning_effort!r}")
        if self.current_date is not None and not _DATE.fullmatch(self.current_date):
            raise HarmonyRenderError(f"current_date must look like 2025-06-28, got {self.current_date!r}")


@dataclass(frozen=True)
class RenderedPrompt:
    text: str              # the prompt with special tokens written out (logs, debugging, /v1/completions parity)
    token_ids: list[int]   # what the engine gets; equals tokenizer.encode(text) unless user text contains "<|"


def system_message_text(options: RenderOptions, has_function_tools: bool) -> str:
    """The system message body exactly as gpt-oss-spec.md §4.2 (the channels line is always present)."""
    head = [options.model_identity, f"Knowledge cutoff: {options.knowledge_cutoff}"]
    if options.current_date:
        head.append(f"Current date: {options.current_date}")
    channels = VALID_CHANNELS_LINE + (f"\n{TOOLS_CHANNEL_LINE}" if has_function_tools else "")
    return "\n".join(head) + f"\n\nReasoning: {options.reasoning_effort}\n\n" + channels


def developer_message_text(instructions: str | None, tools: tuple | list, response_format: Any = None) -> str | None:
    """`# Instructions\\n\\n...`, `# Tools\\n\\n## functions ...`, `# Response Formats\\n\\n## name ...`; None when
    there is none of them."""
    sections = []
    if instructions:
        sections.append(f"# Instructions\n\n{instructions}")
    if tools:
        try:
            sections.append("# Tools\n\n" + render_functions_namespace(list(tools)))
        except ToolDefinitionError as e:
            raise HarmonyRenderError(str(e)) from None
    if response_format is not None:
        sections.append(response_formats_section(response_format))
    return "\n\n".join(sections) if sections else None


def response_formats_section(fmt: Any) -> str:
    """harmony's structured-output section: `# Response Formats`, `## {name}`, an optional `// {description}` line,
    then the schema as compact JSON (the OpenAI cookbook's "Structured output")."""
    comment = "".join(f"// {line}\n" for line in str(fmt.description or "").splitlines() if line.strip())
    schema = json.dumps(fmt.schema, separators=(",", ":"), ensure_ascii=False)
    return f"# Response Formats\n\n## {fmt.name}\n\n{comment}{schema}"


class _PromptBuilder:
    """Accumulates special tokens and text; text runs are encoded so user text can never become a special token."""

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer
        self._parts: list[tuple[bool, str]] = []  # (is_special, text)

    def special(self, name: str) -> None:
        self._parts.append((True, name))

    def text(self, text: str) -> None:
        if text:
            self._parts.append((False, text))

    def message(self, header: str, content: str, channel: str | None = None, constrain: str | None = None,
                end: str = "<|end|>") -> None:
        """`<|start|>{header}[<|channel|>{channel}][ <|constrain|>{constrain}]<|message|>{content}{end}`."""
        self.special("<|start|>")
        self.text(header)
        if channel is not None:
            self.special("<|channel|>")
            self.text(channel)
        if constrain is not None:
            self.text(" ")
            self.special("<|constrain|>")
            self.text(constrain)
        self.special("<|message|>")
        self.text(content)
        self.special(end)

    def build(self) -> RenderedPrompt:
        ids: list[int] = []
        run: list[str] = []
        for is_special, text in self._parts + [(True, "")]:
            if not is_special:
                run.append(text)
                continue
            ids += self._encode_text("".join(run))
            run = []
            if text:
                ids.append(self._tok.token_id(text))
        return RenderedPrompt("".join(t for _, t in self._parts), ids)

    def _encode_text(self, text: str) -> list[int]:
        # tokenizers matches added tokens anywhere in the text, so "<|start|>" typed by a user would become the
        # real token (prompt injection). Cutting after every "<" that precedes "|" leaves no "<|" in any piece.
        return [i for piece in _SPECIAL_START.split(text) if piece for i in self._tok.encode(piece)]


def render_chat(tokenizer, messages: list[Any], options: RenderOptions = RenderOptions()) -> RenderedPrompt:
    """OpenAI chat messages -> the harmony prompt for the assistant's next turn.

    Leading system/developer messages become the developer message's `# Instructions`; later ones become developer
    messages of their own. Assistant history: reasoning (`reasoning_content`, `reasoning` or `thinking`) is rendered as
    an analysis message only while no final answer follows it (format.md, "Handling reasoning output"); `content`
    of an assistant message with tool calls is a commentary preamble; tool results are addressed from
    `functions.NAME`, the name taken from the message, else from the call its `tool_call_id` answers.
    """
    msgs = [_as_dict(m) for m in messages]
    if not msgs:
        raise HarmonyRenderError("messages must contain at least one message")
    instructions = [options.instructions] if options.instructions else []
    start = 0
    while start < len(msgs) and msgs[start].get("role") in ("system", "developer"):
        instructions.append(_text(msgs[start]))
        start += 1
    prompt = _PromptBuilder(tokenizer)
    prompt.message("system", system_message_text(options, bool(options.tools)))
    developer = developer_message_text("\n\n".join(i for i in instructions if i), options.tools,
                                       options.response_format)
    if developer is not None:
        prompt.message("developer", developer)
    _render_history(prompt, msgs[start:])
    prompt.special("<|start|>")
    prompt.text("assistant")
    return prompt.build()


def render_responses(tokenizer, input: str | list[Any], options: RenderOptions = RenderOptions()) -> RenderedPrompt:
    """A Responses API `input` (a string, or message / reasoning / function_call / function_call_output items)
    rendered like the equivalent chat; `instructions` travel in `options.instructions`."""
    return render_chat(tokenizer, responses_input_to_messages(input), options)


def responses_input_to_messages(input: str | list[Any]) -> list[dict]:
    """Responses input items -> chat messages; a reasoning item attaches to the assistant item that follows it."""
    if isinstance(input, str):
        return [{"role": "user", "content": input}]
    messages: list[dict] = []
    reasoning: list[str] = []
    for n, item in enumerate(input):
        item = _as_dict(item)
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            reasoning.append("".join(_as_dict(p).get("text") or "" for p in parts))
        elif kind == "message" and item.get("role") == "assistant":
            messages.append({"role": "assistant", "content": _text(item), "reasoning_content": "".join(reasoning)})
            reasoning = []
        elif kind == "message":
            messages.append({"role": item.get("role"), "content": _text(item)})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "")}}
            messages.append({"role": "assistant", "tool_calls": [call], "reasoning_content": "".join(reasoning)})
            reasoning = []
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else json.dumps(output)})
        else:
            raise HarmonyRenderError(f"input[{n}]: item type {kind!r} is not supported; expected message, "
                                     f"reasoning, function_call or function_call_output")
    if reasoning:
        messages.append({"role": "assistant", "reasoning_content": "".join(reasoning)})
    return messages


def _render_history(prompt: _PromptBuilder, msgs: list[dict]) -> None:
    finals = [i for i, m in enumerate(msgs) if m.get("role") == "assistant" and _is_final(m)]
    last_final = finals[-1] if finals else -1
    call_names: dict[str, str] = {}
    last_call_name: str | None = None
    for i, m in enumerate(msgs):
        role = m.get("role")
        if role == "user":
            prompt.message("user", _text(m))
        elif role in ("system", "developer"):
            prompt.message("developer", f"# Instructions\n\n{_text(m)}")
        elif role == "assistant":
            reasoning = m.get("reasoning_content") or m.get("reasoning") or m.get("thinking")
            if reasoning and i > last_final:  # an answered turn's chain of thought is dropped
                prompt.message("assistant", reasoning, channel="analysis")
            tool_calls = m.get("tool_calls") or []
            if tool_calls:
                if _text(m):
                    prompt.message("assistant", _text(m), channel="commentary")
                for call in tool_calls:
                    name, arguments, call_id = _tool_call(call)
                    prompt.message("assistant", arguments, channel=f"commentary to=functions.{name}",
                                   constrain="json", end="<|call|>")
                    call_names[call_id] = last_call_name = name
            elif _text(m):
                prompt.message("assistant", _text(m), channel="final")
        elif role == "tool":
            name = m.get("name") or call_names.get(m.get("tool_call_id") or "") or last_call_name
            if not name:
                raise HarmonyRenderError(f"messages[{i}]: tool message answers no earlier assistant tool call "
                                         f"(tool_call_id={m.get('tool_call_id')!r}) and has no name")
            prompt.message(f"functions.{name} to=assistant", _text(m), channel="commentary")
        else:
            raise HarmonyRenderError(f"messages[{i}]: unknown role {role!r}; expected system, developer, user, "
                                     f"assistant or tool")


def _is_final(m: dict) -> bool:
    return bool(_text(m)) and not m.get("tool_calls")


def _tool_call(call: Any) -> tuple[str, str, str]:
    call = _as_dict(call)
    function = call.get("function") or {}
    name = function.get("name")
    if not name:
        raise HarmonyRenderError("an assistant tool call has no function name")
    arguments = function.get("arguments", "")
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments)
    return name, arguments, call.get("id") or ""


def _text(m: dict) -> str:
    """A message's content as one string: a plain string, or the text of its content parts joined."""
    content = m.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        part = _as_dict(part)
        if part.get("type") not in ("text", "input_text", "output_text"):
            raise HarmonyRenderError(f"content part type {part.get('type')!r} is not supported; only text is")
        parts.append(part.get("text") or "")
    return "".join(parts)


def _as_dict(obj: Any) -> dict:
    if hasattr(obj, "model_dump"):
        return obj.model_dump(exclude_none=True)
    if isinstance(obj, dict):
        return obj
    raise HarmonyRenderError(f"expected a JSON object, got {type(obj).__name__}")
