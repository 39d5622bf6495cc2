"""The conversation a Responses request continues: its own input as items with ids (what input_items lists), after
the stored items of its `previous_response_id` (that response's input items, then its output items).

Rendering it is harmony's business (deploy/harmony/render.py): earlier turns' reasoning items become analysis messages only
while no final answer follows them, as gpt-oss expects (gpt-oss-spec.md §4.2, "History"). Instructions, tools and
settings are not carried over from the previous response, as OpenAI does.
"""
from __future__ import annotations

from deploy.openai.protocol_outputs import random_id
from deploy.openai.response_store import previous_response_not_found_error
from deploy.openai.responses_protocol import ResponsesRequest
from deploy.serving_context import ServingContext

ITEM_ID_PREFIXES = {"message": "msg", "reasoning": "rs", "function_call": "fc", "function_call_output": "fco"}


def input_items(input: str | list[dict]) -> list[dict]:
    """`input` as OpenAI lists it back: a string is one user message; every item gets a type and an id, and a
    message's string content becomes one input_text (output_text for the assistant) part."""
    items = []
    for given in [{"role": "user", "content": input}] if isinstance(input, str) else input:
        item = dict(given)
        kind = item["type"] = item.get("type") or "message"     # the request's validator allowed only these types
        if kind == "message":
            if isinstance(item.get("content"), str):
                part = "output_text" if item.get("role") == "assistant" else "input_text"
                item["content"] = [{"type": part, "text": item["content"]}]
            item.setdefault("status", "completed")
        item["id"] = item.get("id") or random_id(ITEM_ID_PREFIXES[kind])
        items.append(item)
    return items


async def conversation(ctx: ServingContext, req: ResponsesRequest, owner: str | None = None) -> list[dict]:
    """Every item the response is generated from, oldest first; 400 for a previous response the store lacks (or
    that another API key created)."""
    own = input_items(req.input)
    if req.previous_response_id is None:
        return own
    store = ctx.response_store
    previous = None if store is None else await store.load(req.previous_response_id, owner)
    if previous is None:
        raise previous_response_not_found_error(req.previous_response_id)
    return previous.input_items + previous.response["output"] + own
