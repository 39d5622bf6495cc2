"""Request fields for structured outputs: OpenAI's `response_format` (chat, completions) and Responses `text.format`,
vLLM's `structured_outputs` and legacy `guided_*` extras. Shapes and ranges only; what they mean for generation is
deploy/openai/structured_outputs.py.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

FORMAT_NAME = r"^[A-Za-z0-9_-]{1,64}$"     # OpenAI's rule for json_schema names
GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
BACKENDS = ("auto", "xgrammar")


class _Strict(BaseModel):
    """Unknown keys are 400s here: a typo in a structured-output option must not be ignored silently."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class JsonSchemaFormat(_Strict):
    name: str = Field("response", pattern=FORMAT_NAME)
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """Chat / completions: {"type": "json_schema", "json_schema": {"name", "schema", "strict", ...}}."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type 'json_schema' needs a 'json_schema' object")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f"'json_schema' is only allowed with type 'json_schema', not {self.type!r}")
        return self


class TextFormat(_Strict):
    """Responses `text.format`: {"type": "json_schema", "name", "schema", "strict", "description"} flattened."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, pattern=FORMAT_NAME)
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.type == "json_schema" and (self.name is None or self.schema_ is None):
            raise ValueError("text.format of type 'json_schema' needs 'name' and 'schema'")
        return self

    def as_response_format(self) -> ResponseFormat:
        if self.type != "json_schema":
            return ResponseFormat(type=self.type)
        return ResponseFormat(type="json_schema", json_schema=JsonSchemaFormat(
            name=self.name, description=self.description, schema=self.schema_, strict=self.strict))


class TextConfig(_Strict):
    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = None     # gpt-oss has no verbosity control: only the default is honest


class StructuredOutputsParam(_Strict):
    """vLLM's `structured_outputs` (exactly one of json, regex, choice, grammar, json_object)."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_fallback: bool = False          # there is no fallback backend: always "disabled"
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None   # 400: the engine bounds blanks its own way
    structural_tag: Any = None              # 400: harmony's structure is built by the server
    backend: Literal["auto", "xgrammar"] | None = Field(None, alias="_backend")

    @model_validator(mode="after")
    def _one_kind(self):
        for name in ("whitespace_pattern", "structural_tag"):
            if getattr(self, name) is not None:
                raise ValueError(f"{name} is not supported (the server builds the output structure itself)")
        given = [k for k in ("json_", "regex", "choice", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            names = [k.rstrip("_") for k in given]
            raise ValueError(f"structured_outputs needs exactly one of json, regex, choice, grammar, json_object; "
                             f"got {names or 'none'}")
        return self


class StructuredFields(BaseModel):
    """Mixed into the chat and completion request bodies."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsParam | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = None
    guided_decoding_backend: Literal["auto", "xgrammar"] | None = None
    guided_whitespace_pattern: str | None = None

    @model_validator(mode="after")
    def _check_structured(self):
        self.structured_outputs_param()
        return self

    def structured_outputs_param(self) -> StructuredOutputsParam | None:
        """vLLM's structured_outputs, or the legacy guided_* fields as one (at most one of all of them)."""
        if self.guided_whitespace_pattern is not None:
            raise ValueError("guided_whitespace_pattern is not supported (the engine bounds blanks its own way)")
        legacy = {f.removeprefix("guided_"): getattr(self, f) for f in GUIDED_FIELDS if getattr(self, f) is not None}
        if self.structured_outputs is not None and legacy:
            raise ValueError("use structured_outputs or the guided_* fields, not both")
        if len(legacy) > 1:
            raise ValueError(f"at most one of {list(GUIDED_FIELDS)} may be given, got {sorted(legacy)}")
        return self.structured_outputs or (StructuredOutputsParam(**legacy) if legacy else None)
