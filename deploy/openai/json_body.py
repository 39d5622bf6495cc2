"""Reading a request body as a JSON object at the gateway's edge: the size limit (413), valid JSON, a bounded nesting
depth and valid Unicode (400), so nothing past the edge meets a body it cannot handle.

Why the last two: `json.loads` raises RecursionError (not ValueError) on ~1,000 nested arrays, and deep values that
do parse can still exhaust the stack later (pydantic, json.dumps of a tool schema). A `"\\ud800"` escape decodes to
a lone surrogate, a str the tokenizer refuses (TypeError) and pydantic cannot serialise back (UnicodeEncodeError).
Both used to surface as 500s. The body must be UTF-8 (RFC 8259), decoded strictly here: json.loads(bytes) would also
take UTF-16/32 and encoded surrogates. Knows no routes; errors are APIErrors.
"""
from __future__ import annotations

import json
import re

from starlette.requests import Request

from deploy.openai.errors import BadRequestError, request_too_large_error

MAX_JSON_DEPTH = 64                     # arrays/objects inside each other; real tool schemas nest ~10 deep
_SURROGATE = re.compile("[\ud800-\udfff]")
# In strictly decoded UTF-8 only a `\uD800`-`\uDFFF` escape can make a surrogate; a match is a hint, the walk decides
_MAYBE_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


async def read_json_object(request: Request, limit: int) -> dict:
    """The body as a JSON object; 413 past `limit` bytes, judged by Content-Length and by what actually arrives."""
    declared = request.headers.get("content-length")
    if declared is not None and not declared.isdigit():
        raise BadRequestError(f"Invalid Content-Length header {declared!r}.")
    if declared is not None and int(declared) > limit:
        raise request_too_large_error(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise request_too_large_error(limit)
    return parse_json_object(bytes(body))


def parse_json_object(body: bytes) -> dict:
    """A JSON object of at most MAX_JSON_DEPTH levels whose strings are valid Unicode, or a 400 saying why not."""
    try:
        text = body.decode("utf-8-sig")           # strict; a leading BOM is allowed (RFC 8259 lets parsers skip it)
    except UnicodeDecodeError as e:
        raise BadRequestError(f"The request body is not valid UTF-8: {e}") from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise too_deep_error() from None
    except ValueError as e:   # JSONDecodeError
        raise BadRequestError(f"The request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise BadRequestError("The request body must be a JSON object.")
    maybe_deep = text.count("[") + text.count("{") > MAX_JSON_DEPTH      # fewer brackets: cannot be too deep
    maybe_surrogate = _MAYBE_SURROGATE.search(text) is not None
    if maybe_deep or maybe_surrogate:
        check_json_value(data, check_strings=maybe_surrogate)
    return data


def check_json_value(data: dict | list, check_strings: bool = True) -> None:
    """Walk the parsed body (iteratively: no recursion to exhaust) for depth and, if asked, lone surrogates."""
    stack: list[tuple[dict | list, tuple]] = [(data, ())]
    while stack:
        node, path = stack.pop()
        if len(path) >= MAX_JSON_DEPTH:
            raise too_deep_error()
        for key, value in (node.items() if isinstance(node, dict) else enumerate(node)):
            if check_strings and isinstance(key, str) and _SURROGATE.search(key):
                raise surrogate_error(path + (key,), "key")
            if isinstance(value, (dict, list)):
                stack.append((value, path + (key,)))
            elif check_strings and isinstance(value, str) and _SURROGATE.search(value):
                raise surrogate_error(path + (key,), "string")


def too_deep_error() -> BadRequestError:
    return BadRequestError(f"The request body nests JSON arrays/objects more than {MAX_JSON_DEPTH} levels deep.")


def surrogate_error(path: tuple, what: str) -> BadRequestError:
    param = ".".join(str(p) for p in path).encode("utf-8", "backslashreplace").decode()   # a key may hold one
    return BadRequestError(f"{param}: the {what} contains a lone UTF-16 surrogate (such as \\ud800), which is not "
                           f"valid Unicode; send text as valid UTF-8 or as escaped surrogate pairs.", param=param)
