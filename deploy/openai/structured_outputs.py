"""What a request requires of its output: the answer's format (response_format, Responses text.format, vLLM's
structured_outputs / guided_*) and its tool calls (tools' `strict`, tool_choice) -> OutputRequirements.

Owns the meaning of those fields and the 400s for what cannot be enforced: unsupported schema parts
(json_schema_support.py), unknown tool names, and anything xgrammar cannot compile -- each constraint is compiled
here over the served tokenizer (once per process, cached) before anything is queued. harmony_grammar.py turns
requirements into the engine's token automaton; /v1/completions constrains its raw text with `completion_structure`.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from deploy.openai.errors import BadRequestError
from deploy.harmony.tools import function_tool
from deploy.openai.json_schema_support import check_enforceable
from deploy.openai.structured_protocol import ResponseFormat, StructuredOutputsParam
from engine.grammar_vocabulary import GrammarCompileError, GrammarVocabulary
from engine.structured_output import Constraint, Matches, StructuredOutput

NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}
TOOL_MODES = ("none", "auto", "required")


@dataclass(frozen=True)
class ResponseFormatSection:
    """What harmony's `# Response Formats` section of the developer message shows."""
    name: str
    description: str | None
    schema: Any


@dataclass(frozen=True)
class OutputRequirements:
    """final: the answer's constraint (None: free text). calls: the tools the model may call and their arguments'
    constraint; must_call: it must call one (tool_choice required or a named function). active: whether the output
    needs the structure enforced at all (plain requests do not)."""

    final: Constraint | None = None
    calls: tuple[tuple[str, Constraint], ...] = ()
    must_call: bool = False
    active: bool = False
    response_format: ResponseFormatSection | None = None


def tool_choice_mode(choice: Any, tool_names: list[str], responses: bool = False) -> tuple[str, list[str]]:
    """(mode, names the model may call) for a tool_choice in Chat's or (responses=True) the Responses API's shape."""
    if choice is None:
        return ("auto", tool_names)
    if isinstance(choice, str):
        if choice not in TOOL_MODES:
            raise BadRequestError(f"tool_choice must be one of {list(TOOL_MODES)} or an object, got {choice!r}",
                                  param="tool_choice")
        return (choice, [] if choice == "none" else tool_names)
    if not isinstance(choice, dict):
        raise BadRequestError("tool_choice must be a string or an object", param="tool_choice")
    kind = choice.get("type")
    if kind == "function":
        name = choice.get("name") if responses else (choice.get("function") or {}).get("name")
        return ("required", [_known(name, tool_names, "tool_choice")])
    if kind == "allowed_tools":
        spec = choice if responses else choice.get("allowed_tools") or {}
        mode = spec.get("mode", "auto")
        if mode not in ("auto", "required"):
            raise BadRequestError(f"tool_choice.allowed_tools mode must be 'auto' or 'required', got {mode!r}",
                                  param="tool_choice")
        names = [_known(t.get("name") if responses else (t.get("function") or {}).get("name"), tool_names,
                        "tool_choice") for t in spec.get("tools") or [] if isinstance(t, dict)]
        if not names:
            raise BadRequestError("tool_choice.allowed_tools needs at least one function tool", param="tool_choice")
        return (mode, names)
    raise BadRequestError(f"tool_choice of type {kind!r} is not supported; use 'none', 'auto', 'required', a "
                          f"function or allowed_tools (only function tools exist here)", param="tool_choice")


def _known(name: Any, tool_names: list[str], param: str) -> str:
    if name not in tool_names:
        raise BadRequestError(f"{param}: no function named {name!r} among the request's tools {tool_names}",
                              param=param)
    return name


def final_constraint(fmt: ResponseFormat | None, structured: StructuredOutputsParam | None, param: str
                     ) -> tuple[Constraint | None, ResponseFormatSection | None]:
    """The answer's constraint from response_format (or text.format) or vLLM's structured outputs (not both)."""
    if fmt is not None and fmt.type != "text" and structured is not None:
        raise BadRequestError(f"use {param} or structured_outputs (guided_*), not both", param=param)
    if structured is not None:
        return _vllm_constraint(structured), None
    if fmt is None or fmt.type == "text":
        return None, None
    if fmt.type == "json_object":
        return Constraint("json_object"), None
    spec = fmt.json_schema
    schema_param = f"{param}.json_schema.schema" if param == "response_format" else f"{param}.schema"
    schema = spec.schema_ if spec.schema_ is not None else {}
    check_enforceable(schema, schema_param)
    return (Constraint("json_schema", _schema_text(schema)),
            ResponseFormatSection(spec.name, spec.description, schema))


def _vllm_constraint(s: StructuredOutputsParam) -> Constraint:
    whitespace = not s.disable_any_whitespace
    if s.json_object:
        return Constraint("json_object", any_whitespace=whitespace)
    if s.regex is not None:
        return Constraint("regex", s.regex)
    if s.choice is not None:
        return Constraint("choice", json.dumps(s.choice))
    if s.grammar is not None:
        return Constraint("grammar", s.grammar)
    schema = s.json_
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise BadRequestError(f"structured_outputs.json is not valid JSON: {e}", param="structured_outputs.json")
    check_enforceable(schema, "structured_outputs.json")
    if s.disable_additional_properties:
        schema = _closed_objects(schema)
    return Constraint("json_schema", _schema_text(schema), any_whitespace=whitespace)


def _schema_text(schema: Any) -> str:
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)     # key order kept: it orders properties


def _closed_objects(schema: Any) -> Any:
    """vLLM's disable_additional_properties: additionalProperties false wherever an object schema leaves it out."""
    schema = copy.deepcopy(schema)
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if (node.get("type") == "object" or "properties" in node) and "additionalProperties" not in node:
                node["additionalProperties"] = False
            stack += list(node.values())
        elif isinstance(node, list):
            stack += node
    return schema


def requirements(tools: list, tool_choice: Any, final: Constraint | None,
                 response_format: ResponseFormatSection | None, responses: bool = False) -> OutputRequirements:
    """Chat or Responses requirements from the request's function tools, tool_choice and answer constraint."""
    defs = [function_tool(t) for t in tools or []]
    names = [d.name for d in defs]
    mode, allowed = tool_choice_mode(tool_choice, names, responses)
    if mode == "required" and not allowed:
        raise BadRequestError("tool_choice 'required' needs at least one tool", param="tool_choice")
    strict = _strict_names(tools, defs)
    forced = mode == "required" or len(allowed) < len(names)
    constrain_calls = forced or bool(strict & set(allowed))
    calls = tuple((d.name, _arguments(d, d.name in strict or forced)) for d in defs if d.name in allowed) \
        if constrain_calls else ()
    active = final is not None or constrain_calls or (mode == "none" and bool(names))
    if active and not constrain_calls and mode != "none":
        calls = tuple((d.name, Constraint("json_object")) for d in defs if d.name in allowed)
    return OutputRequirements(final, calls, mode == "required", active, response_format)


def _strict_names(tools: list, defs: list) -> set[str]:
    def strict(tool: Any) -> bool:
        data = tool.model_dump(exclude_none=True) if hasattr(tool, "model_dump") else dict(tool)
        return bool((data.get("function") or data).get("strict"))
    return {d.name for d, t in zip(defs, tools) if strict(t)}


def _arguments(tool, enforce: bool) -> Constraint:
    """The tool's parameters schema; a non-strict tool whose schema cannot be enforced gets any JSON object."""
    schema = tool.parameters if tool.parameters is not None else NO_ARGUMENTS
    param = f"tools[{tool.name}].parameters"
    try:
        check_enforceable(schema, param)
    except BadRequestError:
        if enforce:
            raise
        return Constraint("json_object")
    return Constraint("json_schema", _schema_text(schema))


def check_compiles(tokenizer, constraints: list[Constraint], param: str) -> None:
    """Compile each constraint over the served tokenizer (cached per process): a 400 for one xgrammar refuses."""
    if not constraints:
        return
    vocabulary = GrammarVocabulary.get(str(tokenizer.path), tokenizer.vocab_size)
    for constraint in constraints:
        try:
            vocabulary.compile(constraint)
        except GrammarCompileError as e:
            raise BadRequestError(f"{param}: {e}", param=param) from None


def completion_structure(tokenizer, final: Constraint | None, end_token_ids: tuple[int, ...]
                         ) -> StructuredOutput | None:
    """/v1/completions: the whole generated text matches `final`, then one of the end ids."""
    if final is None:
        return None
    if not end_token_ids:
        raise BadRequestError("structured outputs need an end-of-sequence token; do not set ignore_eos with them",
                              param="ignore_eos")
    check_compiles(tokenizer, [final], "response_format")
    return StructuredOutput(str(tokenizer.path), (Matches(final, tuple(end_token_ids)),))
