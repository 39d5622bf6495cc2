"""Function tools -> harmony's TypeScript-like `namespace functions { ... }` block for the developer message.

Owns the JSON-schema -> TypeScript rendering only (harmony `docs/format.md`, "Defining available tools"); it knows
nothing of tokens, messages or HTTP. Accepts both OpenAI tool shapes: Chat's {"type": "function", "function": {...}}
and the Responses API's flat {"type": "function", "name": ..., "parameters": ...}.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

NAMESPACE = "functions"
NESTED_INDENT = "    "  # each nested object level indents its fields by four spaces, like harmony's renderer


class ToolDefinitionError(ValueError):
    """A tool definition that cannot be rendered (no name, or a name harmony cannot address)."""


@dataclass(frozen=True)
class FunctionTool:
    name: str
    description: str
    parameters: dict | None


def function_tool(tool: Any) -> FunctionTool:
    """Normalise one OpenAI tool definition (dict or pydantic model, Chat or Responses shape)."""
    data = tool.model_dump(exclude_none=True) if hasattr(tool, "model_dump") else dict(tool)
    if data.get("type", "function") != "function":
        raise ToolDefinitionError(f"tool type {data.get('type')!r} is not supported; only 'function' tools are")
    spec = data.get("function", data)
    name = spec.get("name")
    if not isinstance(name, str) or not name or any(c.isspace() or c in ".<>|" for c in name):
        # The name becomes the recipient `functions.NAME` in a harmony header: no dots, spaces or token syntax.
        raise ToolDefinitionError(f"tool name {name!r} must be a non-empty identifier without dots or spaces")
    parameters = spec.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise ToolDefinitionError(f"tool {name!r}: parameters must be a JSON schema object")
    return FunctionTool(name, spec.get("description") or "", parameters)


def render_functions_namespace(tools: list[Any]) -> str:
    """`## functions` ... `} // namespace functions` for the given tools (no leading `# Tools`)."""
    lines = [f"## {NAMESPACE}", "", f"namespace {NAMESPACE} {{", ""]
    for tool in map(function_tool, tools):
        lines += _comment_lines(tool.description, "")
        params = tool.parameters or {}
        if params.get("properties"):
            lines.append(f"type {tool.name} = (_: {render_type(params, '')}) => any;")
        else:
            lines.append(f"type {tool.name} = () => any;")  # format.md: functions without arguments
        lines.append("")
    lines.append(f"}} // namespace {NAMESPACE}")
    return "\n".join(lines)


def render_type(schema: Any, indent: str) -> str:
    """One JSON schema as a TypeScript-like type; `indent` prefixes the fields when it is an object."""
    if not isinstance(schema, dict):
        return "any"
    rendered = _render_type(schema, indent)
    if schema.get("nullable") and "null" not in rendered.split(" | "):
        rendered += " | null"
    return rendered


def _render_type(schema: dict, indent: str) -> str:
    if "const" in schema:
        return json.dumps(schema["const"])
    variants = schema.get("anyOf") or schema.get("oneOf")
    if isinstance(variants, list) and variants:
        return " | ".join(render_type(v, indent) for v in variants)
    kind = schema.get("type")
    if isinstance(kind, list):
        return " | ".join("number" if k == "integer" else str(k) for k in kind) or "any"
    enum = schema.get("enum")
    if isinstance(enum, list) and enum and kind in (None, "string", "number", "integer", "boolean"):
        return " | ".join(json.dumps(v) for v in enum)
    if kind == "string":
        return "string"
    if kind in ("number", "integer"):
        return "number"
    if kind == "boolean":
        return "boolean"
    if kind == "null":
        return "null"
    if kind == "array":
        items = schema.get("items")
        return f"{_array_item(render_type(items, indent))}[]" if isinstance(items, dict) else "Array<any>"
    if kind == "object" or "properties" in schema:
        return _render_object(schema, indent) if schema.get("properties") else "object"
    return "any"


def _array_item(rendered: str) -> str:
    return f"({rendered})" if " | " in rendered else rendered  # (a | b)[] keeps the union inside the array


def _render_object(schema: dict, indent: str) -> str:
    """`{\\n// description\\nfield?: type, // default: x\\n}` with fields at `indent`; nested objects go deeper."""
    required = set(schema.get("required") or ())
    lines = ["{"]
    for key, prop in schema["properties"].items():
        prop = prop if isinstance(prop, dict) else {}
        lines += _comment_lines(prop.get("description", ""), indent)
        optional = "" if key in required else "?"
        line = f"{indent}{key}{optional}: {render_type(prop, indent + NESTED_INDENT)},"
        if "default" in prop:
            line += f" // default: {_default_text(prop)}"
        lines.append(line)
    lines.append(f"{indent}}}")
    return "\n".join(lines)


def _default_text(prop: dict) -> str:
    default = prop["default"]
    if isinstance(default, str) and prop.get("enum"):
        return default  # format.md: `format?: "celsius" | "fahrenheit", // default: celsius`
    return json.dumps(default)


def _comment_lines(text: str, indent: str) -> list[str]:
    return [f"{indent}// {line}" for line in str(text).splitlines() if line.strip()]
