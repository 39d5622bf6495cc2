"""Harmony parsing: generated token ids -> reasoning / content / tool-call deltas (streaming) and parsed completions.

Owns the message state machine over the output (gpt-oss-spec.md §4.2); never raises on malformed output (tiny random
models emit anything): text it cannot place becomes content. Routing of each message: harmony_output.classify.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

from deploy.harmony.output import (CONTENT, REASONING, TOOL, HarmonyDelta, HarmonyMessage, ParsedCompletion, ToolCall,
                                   ToolCallDelta, adjust_finish_reason, classify, new_tool_call_id)

logger = logging.getLogger(__name__)

MAX_HEADER_TOKENS = 64   # a longer header is garbage: its text becomes content
MAX_HELD_TOKENS = 8      # tokens held back while they end inside a UTF-8 character
_HEADER_CHARS = re.compile(r"[\w.:=/\- ]*")  # role, channel, to=recipient, content type; anything else is text
_FIRST_ROLE_SUFFIX = re.compile(r"\s*(?:t|to|to=\S*)?\s*")  # what may follow the prompt's `<|start|>assistant`
_END_TOKENS = ("<|end|>", "<|return|>", "<|call|>")


@dataclass
class _OpenMessage:
    role: str
    channel: str | None
    recipient: str | None
    content_type: str | None
    kind: str
    tool_index: int | None = None
    tool_call_id: str | None = None
    ids: list[int] = field(default_factory=list)


class HarmonyStreamParser:
    """Fed generated ids one at a time (`process`) or per engine step (`feed`); returns what each added.

    Starts inside the header of the assistant message the prompt opened (`...<|start|>assistant`). Call `finish()`
    when generation ends to flush text held back for an incomplete UTF-8 character and close an open message.
    """

    def __init__(self, tokenizer, role: str = "assistant",
                 tool_call_id: Callable[[], str] = new_tool_call_id) -> None:
        self._tok = tokenizer
        self._new_call_id = tool_call_id
        names = ("<|start|>", "<|message|>", "<|channel|>", "<|constrain|>") + _END_TOKENS
        self._id = {name: tokenizer.token_id(name) for name in names}
        self._ends = {self._id[name]: name for name in _END_TOKENS}
        self._state = "header"
        self._role_prefix = role
        self._header: list[int] = []
        self._msg: _OpenMessage | None = None
        self._held: list[int] = []
        self._num_tool_calls = 0
        self.messages: list[HarmonyMessage] = []

    # -- public state ----------------------------------------------------------------------------------------------
    @property
    def current_channel(self) -> str | None:
        return self._msg.channel if self._msg else None

    @property
    def current_recipient(self) -> str | None:
        return self._msg.recipient if self._msg else None

    @property
    def current_role(self) -> str | None:
        return self._msg.role if self._msg else None

    @property
    def current_content_type(self) -> str | None:
        return self._msg.content_type if self._msg else None

    @property
    def tool_calls(self) -> list[ToolCall]:
        return [ToolCall(m.tool_call_id or "", m.tool_name or "", m.text) for m in self.messages if m.kind == TOOL]

    def finish_reason(self, engine_finish_reason: str | None) -> str | None:
        return adjust_finish_reason(engine_finish_reason, self._num_tool_calls > 0)

    # -- feeding -----------------------------------------------------------------------------------------------------
    def feed(self, token_ids: Iterable[int]) -> HarmonyDelta:
        delta = HarmonyDelta()
        for token_id in token_ids:
            delta.merge(self.process(token_id))
        return delta

    def process(self, token_id: int) -> HarmonyDelta:
        delta = HarmonyDelta()
        if self._state == "header":
            self._process_header(token_id, delta)
        elif self._state == "content":
            self._process_content(token_id, delta)
        else:
            self._process_between(token_id, delta)
        return delta

    def finish(self) -> HarmonyDelta:
        delta = HarmonyDelta()
        if self._state == "header":
            self._abandon_header(delta)
        elif self._state == "content":
            self._close(None, delta)
        self._state = "between"
        return delta

    # -- states ------------------------------------------------------------------------------------------------------
    def _process_header(self, token_id: int, delta: HarmonyDelta) -> None:
        if token_id == self._id["<|message|>"]:
            self._open(self._parse_header(), delta)
        elif token_id == self._id["<|start|>"]:
            self._abandon_header(delta)
            self._start_header("")
        elif token_id in self._ends:
            self._abandon_header(delta)
            self._state = "between"
        else:
            self._header.append(token_id)
            if not self._header_plausible():
                logger.debug("malformed harmony header %r; treating it as content", self._header)
                ids, self._header = self._header, []
                self._open(_OpenMessage(self._role_prefix or "assistant", None, None, None, CONTENT), delta)
                for i in ids:
                    if i not in (self._id["<|channel|>"], self._id["<|constrain|>"]):
                        self._add_content(i, delta)

    def _process_content(self, token_id: int, delta: HarmonyDelta) -> None:
        if token_id in self._ends:
            self._close(self._ends[token_id], delta)
            self._state = "between"
        elif token_id == self._id["<|start|>"]:
            self._close(None, delta)
            self._start_header("")
        elif token_id in (self._id["<|channel|>"], self._id["<|message|>"], self._id["<|constrain|>"]):
            logger.debug("harmony structure token %d inside content ignored", token_id)
        else:
            self._add_content(token_id, delta)

    def _process_between(self, token_id: int, delta: HarmonyDelta) -> None:
        if token_id == self._id["<|start|>"]:
            self._start_header("")
        elif token_id == self._id["<|channel|>"]:   # `<|start|>assistant` left out: tolerate it
            self._start_header("assistant")
            self._header.append(token_id)
        elif token_id == self._id["<|message|>"]:
            self._open(_OpenMessage("assistant", None, None, None, CONTENT), delta)
        elif token_id not in self._ends and self._tok.decode([token_id], skip_special_tokens=True):
            self._open(_OpenMessage("assistant", None, None, None, CONTENT), delta)   # text outside any message
            self._add_content(token_id, delta)

    # -- helpers -----------------------------------------------------------------------------------------------------
    def _start_header(self, role_prefix: str) -> None:
        self._state, self._role_prefix, self._header, self._msg = "header", role_prefix, [], None

    def _header_segments(self) -> tuple[str, str, str]:
        """(role text, channel text, constrain text) of the header so far, special tokens removed."""
        segments: dict[str, list[int]] = {"role": [], "channel": [], "constrain": []}
        current = "role"
        for i in self._header:
            if i == self._id["<|channel|>"]:
                current = "channel"
            elif i == self._id["<|constrain|>"]:
                current = "constrain"
            else:
                segments[current].append(i)
        role, channel, constrain = (self._tok.decode(segments[k], skip_special_tokens=True)
                                    for k in ("role", "channel", "constrain"))
        return role, channel, constrain

    def _header_plausible(self) -> bool:
        if len(self._header) > MAX_HEADER_TOKENS:
            return False
        role, channel, constrain = self._header_segments()
        if not all(_HEADER_CHARS.fullmatch(part) for part in (role, channel, constrain)):
            return False
        return not self._role_prefix or bool(_FIRST_ROLE_SUFFIX.fullmatch(role))

    def _parse_header(self) -> _OpenMessage:
        role_text, channel_text, constrain = self._header_segments()
        role_words = (self._role_prefix + role_text).split()
        recipients = [w[3:] for w in role_words + channel_text.split() if w.startswith("to=")]
        role = next((w for w in role_words if not w.startswith("to=")), "assistant")
        channel_words = [w for w in channel_text.split() if not w.startswith("to=")]
        channel = channel_words[0] if channel_words else None
        content_type = constrain.strip() or " ".join(channel_words[1:]) or None
        recipient = recipients[0] if recipients else None
        return _OpenMessage(role, channel, recipient, content_type, classify(channel, recipient))

    def _abandon_header(self, delta: HarmonyDelta) -> None:
        """A header that never reached `<|message|>`: plain text in it is the model talking; else it is dropped."""
        ids, self._header = self._header, []
        if ids and self._id["<|channel|>"] not in ids:
            self._open(_OpenMessage(self._role_prefix or "assistant", None, None, None, CONTENT), delta)
            for i in ids:
                self._add_content(i, delta)
            self._close(None, delta)

    def _open(self, msg: _OpenMessage, delta: HarmonyDelta) -> None:
        self._state, self._msg, self._header, self._held = "content", msg, [], []
        if msg.kind == TOOL:
            msg.tool_index, msg.tool_call_id = self._num_tool_calls, self._new_call_id()
            self._num_tool_calls += 1
            delta.tool_calls.append(ToolCallDelta(msg.tool_index, msg.tool_call_id,
                                                  msg.recipient.removeprefix("functions."), ""))

    def _add_content(self, token_id: int, delta: HarmonyDelta) -> None:
        self._msg.ids.append(token_id)
        self._held.append(token_id)
        text = self._tok.decode(self._held, skip_special_tokens=True)
        if text.endswith("\ufffd") and len(self._held) < MAX_HELD_TOKENS:
            return   # the last token ends inside a multi-byte character: wait for the rest
        self._held = []
        self._emit(text, delta)

    def _emit(self, text: str, delta: HarmonyDelta) -> None:
        if not text:
            return
        if self._msg.kind == REASONING:
            delta.reasoning_content += text
        elif self._msg.kind == CONTENT:
            delta.content += text
        else:
            delta.tool_calls.append(ToolCallDelta(self._msg.tool_index, arguments=text))

    def _close(self, end: str | None, delta: HarmonyDelta) -> None:
        msg = self._msg
        if self._held:
            self._emit(self._tok.decode(self._held, skip_special_tokens=True), delta)
        text = self._tok.decode(msg.ids, skip_special_tokens=True)
        self.messages.append(HarmonyMessage(msg.role, msg.channel, msg.recipient, msg.content_type, msg.kind, text,
                                            end, msg.tool_call_id))
        self._msg, self._held = None, []


def parse_completion(tokenizer, token_ids: Iterable[int], finish_reason: str | None = "stop") -> ParsedCompletion:
    """One-shot parse of a whole generation (the ids after the prompt's `<|start|>assistant`, stop token included)."""
    parser = HarmonyStreamParser(tokenizer)
    for token_id in token_ids:
        parser.process(token_id)
    parser.finish()
    content = "".join(m.text for m in parser.messages if m.kind == CONTENT)
    reasoning = "".join(m.text for m in parser.messages if m.kind == REASONING)
    tool_calls = parser.tool_calls
    return ParsedCompletion(content or None, reasoning or None, tool_calls,
                            adjust_finish_reason(finish_reason, bool(tool_calls)), list(parser.messages))
