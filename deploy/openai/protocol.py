"""OpenAI request bodies (/v1/chat/completions, /v1/completions) and their mapping onto engine SamplingParams.

Owns what a request may say and the 400s for what it may not; responses are in protocol_outputs.py, the Responses
API in responses_protocol.py, error bodies in errors.py.
"""
from __future__ import annotations

import logging
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from deploy.openai.errors import BadRequestError, context_length_error, prompt_too_long_error
from deploy.openai.request_fields import CHAT_FIELDS, COMPLETION_FIELDS, check_known_fields
from deploy.openai.structured_protocol import StructuredFields
from engine.sampling_params import MAX_LOGPROBS, SamplingParams
from engine.structured_output import StructuredOutput

logger = logging.getLogger(__name__)

# Decisions, documented for users:
# - Fields OpenAI or vLLM define that are not modelled here are 400s unless their value means what this server does
#   anyway (deploy/openai/request_fields.py); fields nobody defines are accepted and ignored with a warning, as vLLM does.
# - At most 8 stop strings (Ray Serve LLM's limit; OpenAI's own is 4, so every OpenAI-valid request passes); n <= 128.
# - Sampling controls: presence/frequency penalties and logit_bias (OpenAI), repetition_penalty, min_p, min_tokens
#   (vLLM extras), applied on the engine's device (engine/logits_shaper.py).
# - Structured outputs (response_format, vLLM's structured_outputs / guided_*) and tool_choice none / auto /
#   required / a function / allowed_tools: deploy/openai/structured_outputs.py, enforced by the sampler's token masks.
MAX_STOP_SEQUENCES = 8
MAX_N = 128
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


class OpenAIModel(BaseModel):
    """Nested request objects: unknown keys are kept (harmony reads e.g. an assistant message's `thinking`)."""

    model_config = ConfigDict(extra="allow")


class RequestModel(OpenAIModel):
    """Top-level request bodies: known fields not modelled are checked against `KNOWN_FIELDS`; unknown ones are
    accepted, logged and ignored."""

    KNOWN_FIELDS: ClassVar[dict[str, tuple | None]] = {}

    @model_validator(mode="after")
    def _warn_ignored(self):
        unknown = check_known_fields(self.KNOWN_FIELDS, self.model_extra or {})
        if unknown:
            logger.warning("%s: ignoring unknown fields %s", type(self).__name__, unknown)
        return self

    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class StreamOptions(OpenAIModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False     # vLLM: every chunk carries the usage so far

    def every_chunk(self) -> bool:
        return self.include_usage and self.continuous_usage_stats


class ContentPart(OpenAIModel):
    type: Literal["text"]
    text: str


def _text_parts_only(value: Any) -> Any:
    # Checked before the str | list union so the client reads this rather than "Input should be a valid string".
    for part in value if isinstance(value, list) else ():
        kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
        if kind != "text":
            raise ValueError(f"content part type {kind!r} is not supported: this model reads text parts only")
    return value


Content = Annotated[str | list[ContentPart], BeforeValidator(_text_parts_only)]


class FunctionCallInput(OpenAIModel):
    name: str
    arguments: str = ""


class ToolCallInput(OpenAIModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallInput


class SystemMessage(OpenAIModel):
    role: Literal["system"]
    content: Content
    name: str | None = None


class DeveloperMessage(OpenAIModel):
    role: Literal["developer"]
    content: Content
    name: str | None = None


class UserMessage(OpenAIModel):
    role: Literal["user"]
    content: Content
    name: str | None = None


class AssistantMessage(OpenAIModel):
    role: Literal["assistant"]
    content: Content | None = None
    reasoning_content: str | None = None   # vLLM's name for the analysis text
    reasoning: str | None = None           # newer clients' name for the same
    tool_calls: list[ToolCallInput] | None = None
    name: str | None = None


class ToolMessage(OpenAIModel):
    role: Literal["tool"]
    content: Content
    tool_call_id: str
    name: str | None = None


ChatMessageInput = Annotated[SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage,
                             Field(discriminator="role")]


class FunctionDefinition(OpenAIModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatCompletionTool(OpenAIModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class SamplingFields(StructuredFields, RequestModel):
    """Fields every generation request shares, with OpenAI's ranges (plus vLLM's extra_body knobs)."""

    model: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    n: int | None = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)        # vLLM extras
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    min_tokens: int | None = Field(None, ge=0)
    user: str | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are supported, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @model_validator(mode="after")
    def _check_unsupported(self):
        if any(not key.lstrip("-").isdigit() for key in self.logit_bias or {}):
            raise ValueError("logit_bias keys must be token ids (integers as strings), e.g. {\"1234\": -100}")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def requested_max_tokens(self) -> int | None:
        raise NotImplementedError

    def num_logprobs(self) -> int | None:
        return None

    def sampling_kwargs(self) -> dict:
        """SamplingParams fields from this request, except max_tokens and the harmony stop ids."""
        kwargs = {"n": self.n or 1, "stop": tuple(self.stop or ()), "seed": self.seed,
                  "logprobs": self.num_logprobs(), "ignore_eos": self.ignore_eos,
                  "include_stop_str_in_output": self.include_stop_str_in_output}
        if self.logit_bias:
            kwargs["logit_bias"] = tuple((int(k), v) for k, v in self.logit_bias.items())
        for name in ("temperature", "top_p", "top_k", "presence_penalty", "frequency_penalty", "repetition_penalty",
                     "min_p", "min_tokens"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        return kwargs


class ChatCompletionRequest(SamplingFields):
    KNOWN_FIELDS: ClassVar[dict[str, tuple | None]] = CHAT_FIELDS
    messages: list[ChatMessageInput] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[ChatCompletionTool] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None

    @model_validator(mode="after")
    def _check_chat(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @property
    def effective_tools(self) -> list[ChatCompletionTool]:
        """Tools to render into the prompt: none when tool_choice is "none" (the model cannot call what it never saw)."""
        return [] if self.tool_choice == "none" else list(self.tools or [])

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingFields):
    KNOWN_FIELDS: ClassVar[dict[str, tuple | None]] = COMPLETION_FIELDS
    prompt: Prompt
    max_tokens: int | None = Field(16, ge=1)   # OpenAI's and vLLM's default; null = whatever context is left
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, prompt):
        items = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
        if not items or any(len(p) == 0 for p in items):
            raise ValueError("prompt must be non-empty (a string, a list of strings, or token ids)")
        if any(isinstance(t, int) and t < 0 for p in items if not isinstance(p, str) for t in p):
            raise ValueError("prompt token ids must be non-negative")
        return prompt

    @model_validator(mode="after")
    def _check_completion(self):
        if self.echo:
            raise ValueError("echo is not supported by this server")
        if self.suffix is not None:
            raise ValueError("suffix is not supported by this server")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise ValueError("best_of is not supported by this server (other than best_of == n)")
        return self

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text or token ids."""
        p = self.prompt
        return [p] if isinstance(p, str) or isinstance(p[0], int) else list(p)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def num_logprobs(self) -> int | None:
        return self.logprobs


def to_sampling_params(request: Any, max_model_len: int, prompt_len: int,
                       stop_token_ids: tuple[int, ...] | list[int] = (),
                       structured: StructuredOutput | None = None) -> SamplingParams:
    """Engine parameters for one prompt of `request` (chat, completion or Responses), or a BadRequestError (400).

    max_completion_tokens wins over max_tokens; without either, generation may fill the context the prompt leaves.
    stop_token_ids (e.g. tokenizer.harmony_stop_ids() for chat) join any the request names itself. `structured`:
    the token automaton the output must follow (deploy/harmony/grammar.py, structured_outputs.py).
    """
    if prompt_len < 1:
        raise BadRequestError("the prompt is empty", param="messages")
    requested = request.requested_max_tokens()
    if requested is None:
        if prompt_len >= max_model_len:
            raise prompt_too_long_error(max_model_len, prompt_len)
        max_tokens = max_model_len - prompt_len
    elif prompt_len + requested > max_model_len:
        raise context_length_error(max_model_len, prompt_len, requested)
    else:
        max_tokens = requested
    ids = tuple(dict.fromkeys([*stop_token_ids, *(getattr(request, "stop_token_ids", None) or ())]))
    try:
        return SamplingParams(max_tokens=max_tokens, stop_token_ids=ids, structured=structured,
                              **request.sampling_kwargs())
    except ValueError as e:   # SamplingParams owns the invariants; a violation is the client's to fix
        raise BadRequestError(str(e)) from None
