"""Which JSON Schemas structured outputs can enforce: a 400 naming the first part that the grammar engine
(xgrammar) would silently not enforce, so a request never gets output that merely looks constrained.

Owns the list of unsupported keywords and formats (checked against xgrammar in tests/deploy/test_json_schema_support.py,
which asserts that everything allowed here is enforced). Annotations (title, description, default, examples, ...)
and unknown keywords, which JSON Schema itself ignores, are fine.
"""
from __future__ import annotations

from typing import Any

from deploy.openai.errors import BadRequestError

# Validation keywords the engine does not enforce.
UNSUPPORTED_KEYWORDS = (
    "not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies", "contains", "minContains",
    "maxContains", "patternProperties", "unevaluatedProperties", "unevaluatedItems", "contentEncoding",
    "contentMediaType", "contentSchema", "$dynamicRef", "$recursiveRef",
)
SUPPORTED_FORMATS = ("date", "time", "date-time", "duration", "email", "hostname", "ipv4", "ipv6", "uri",
                     "uri-reference", "uuid")
JSON_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMAS = ("items", "additionalProperties", "propertyNames")


def check_enforceable(schema: Any, param: str) -> None:
    """Raise BadRequestError (param: the path of the offending part) unless every part of `schema` is enforced."""
    if not isinstance(schema, (dict, bool)):
        raise BadRequestError(f"{param}: a JSON schema must be an object (or a boolean)", param=param)
    root = schema if isinstance(schema, dict) else {}
    stack: list[tuple[Any, str]] = [(schema, param)]
    while stack:
        node, path = stack.pop()
        if isinstance(node, bool):
            continue
        if not isinstance(node, dict):
            raise BadRequestError(f"{path}: expected a JSON schema (an object), got {type(node).__name__}",
                                  param=path)
        _check_node(node, path, root)
        for key in _SUBSCHEMA_MAPS:
            if isinstance(node.get(key), dict):
                stack += [(sub, f"{path}.{key}.{name}") for name, sub in node[key].items()]
        for key in _SUBSCHEMA_LISTS:
            if isinstance(node.get(key), list):
                stack += [(sub, f"{path}.{key}[{i}]") for i, sub in enumerate(node[key])]
        for key in _SUBSCHEMAS:
            if key in node and not isinstance(node[key], bool):
                stack.append((node[key], f"{path}.{key}"))


def _unsupported(path: str, what: str) -> BadRequestError:
    return BadRequestError(f"{path}: {what} is not supported by structured outputs (the engine cannot enforce it)",
                           param=path)


def _check_node(node: dict, path: str, root: dict) -> None:
    for key in UNSUPPORTED_KEYWORDS:
        if key in node:
            raise _unsupported(f"{path}.{key}", f"'{key}'")
    if node.get("uniqueItems") is True:
        raise _unsupported(f"{path}.uniqueItems", "'uniqueItems': true")
    kinds = node.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds] if kinds is not None else []
    if any(k not in JSON_TYPES for k in kinds):
        raise BadRequestError(f"{path}.type: {node['type']!r} is not a JSON type; use one of {list(JSON_TYPES)}",
                              param=f"{path}.type")
    if "format" in node and node["format"] not in SUPPORTED_FORMATS:
        raise _unsupported(f"{path}.format", f"format {node['format']!r} (supported: {', '.join(SUPPORTED_FORMATS)})")
    if "multipleOf" in node and kinds != ["integer"]:
        raise _unsupported(f"{path}.multipleOf", "'multipleOf' on anything but a lone integer type")
    if isinstance(node.get("allOf"), list) and len(node["allOf"]) > 1:
        raise _unsupported(f"{path}.allOf", "'allOf' with more than one schema")
    ref = node.get("$ref")
    if ref is not None and (not isinstance(ref, str) or not ref.startswith("#")):
        raise _unsupported(f"{path}.$ref", f"the non-local reference {ref!r}")
    if isinstance(node.get("oneOf"), list) and not _disjoint([_resolve(b, root) for b in node["oneOf"]]):
        raise _unsupported(f"{path}.oneOf", "'oneOf' whose branches may overlap (use 'anyOf', or branches of "
                                            "different types or with distinct 'const' values of a shared property)")


def _resolve(schema: Any, root: dict, depth: int = 0) -> Any:
    """Follow a local `#/...` reference (a few levels) to the schema it names."""
    while isinstance(schema, dict) and isinstance(schema.get("$ref"), str) and depth < 8:
        target: Any = root
        for part in schema["$ref"].lstrip("#").strip("/").split("/"):
            target = target.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(target, dict) else None
        schema, depth = target, depth + 1
    return schema


def _disjoint(branches: list) -> bool:
    """Whether no JSON value can match two branches: distinct single types, or a shared required property whose
    const/enum values differ in every branch (a discriminated union, as pydantic writes them)."""
    if not all(isinstance(b, dict) for b in branches):
        return False
    kinds = [b.get("type") for b in branches]
    if all(isinstance(k, str) for k in kinds):
        numeric = sum(k in ("integer", "number") for k in kinds)
        if len(set(kinds)) == len(kinds) and numeric <= 1:
            return True
    shared = set.intersection(*(set(b.get("required") or ()) for b in branches)) if branches else set()
    for name in shared:
        values = [_literal_values((b.get("properties") or {}).get(name)) for b in branches]
        if all(v is not None for v in values) and sum(len(v) for v in values) == len(set().union(*values)):
            return True
    return False


def _literal_values(prop: Any) -> set | None:
    if not isinstance(prop, dict):
        return None
    if "const" in prop:
        return {repr(prop["const"])}
    if isinstance(prop.get("enum"), list):
        return {repr(v) for v in prop["enum"]}
    return None
