"""The Responses API's routes: POST /v1/responses, GET and DELETE /v1/responses/{id}, GET
/v1/responses/{id}/input_items (OpenAI's list object: `limit`, `order`, `after`, `before`) and POST
/v1/responses/{id}/cancel (400: only background responses can be cancelled, and none run here). Stored responses
come from the gateway's ResponseStore, so any gateway replica answers for any response; each answer names the
replica that gave it in `x-epserve-gateway`. Query parameters OpenAI defines that change nothing here are refused
with 400 when given a value this server cannot honour.
"""
from __future__ import annotations

import json

from fastapi import FastAPI, Request
from starlette.responses import Response

from deploy.openai.errors import BadRequestError
from deploy.openai.routes import _generate, _guard, _json, request_owner
from deploy.openai.openapi_schema import json_body, query_parameters
from deploy.openai.response_store import StoredResponse, response_not_found_error
from deploy.openai.responses_protocol import DeletedResponse, InputItemList, ResponsesRequest
from deploy.openai.responses_service import plan_response
from deploy.serving_context import ServingContext
from monitoring.recorders import current_replica_id

GATEWAY_HEADER = "x-epserve-gateway"
DEFAULT_LIMIT, MAX_LIMIT = 20, 100
INCLUDE = {"type": "array", "items": {"type": "string"}}   # OpenAI's; any value is refused here (stored items are whole)
NO_BACKGROUND = "this server runs no background responses (background: true is refused)"


def register_responses_routes(api: FastAPI) -> None:
    api.add_api_route("/v1/responses", create_response, methods=["POST"], openapi_extra=json_body(ResponsesRequest))
    api.add_api_route("/v1/responses/{response_id}", retrieve_response, methods=["GET"], openapi_extra=query_parameters(
        stream={"type": "boolean"}, starting_after={"type": "integer"}, include=INCLUDE))
    api.add_api_route("/v1/responses/{response_id}", delete_response, methods=["DELETE"])
    api.add_api_route("/v1/responses/{response_id}/input_items", list_input_items, methods=["GET"],
                      openapi_extra=query_parameters(limit={"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
                                                     order={"enum": ["asc", "desc"]}, after={"type": "string"},
                                                     before={"type": "string"}, include=INCLUDE))
    api.add_api_route("/v1/responses/{response_id}/cancel", cancel_response, methods=["POST"])


def served_by(response: Response) -> Response:
    response.headers[GATEWAY_HEADER] = current_replica_id()
    return response


async def create_response(request: Request) -> Response:
    async def plan(ctx: ServingContext, req: ResponsesRequest):
        return await plan_response(ctx, req, owner=request_owner(request, ctx))
    return served_by(await _generate(request, ResponsesRequest, plan))


async def retrieve_response(request: Request, response_id: str) -> Response:
    async def handle(ctx: ServingContext) -> Response:
        query = request.query_params
        if query.get("stream", "false").lower() != "false" or query.get("starting_after") is not None:
            raise BadRequestError(f"stream and starting_after replay a background response's events; "
                                  f"{NO_BACKGROUND}.", param="stream")
        _check_include(request)
        record = await _stored(request, ctx, response_id)
        return Response(json.dumps(record.response), media_type="application/json")
    return served_by(await _guard(request, handle))


async def delete_response(request: Request, response_id: str) -> Response:
    async def handle(ctx: ServingContext) -> Response:
        await _stored(request, ctx, response_id)                # 404 unless the caller's
        if not await ctx.response_store.remove(response_id):
            raise response_not_found_error(response_id)
        return _json(DeletedResponse(id=response_id))
    return served_by(await _guard(request, handle))


async def list_input_items(request: Request, response_id: str) -> Response:
    async def handle(ctx: ServingContext) -> Response:
        query = request.query_params
        limit, order = _limit(query.get("limit")), query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise BadRequestError(f"order must be 'asc' or 'desc', got {order!r}", param="order")
        _check_include(request)
        items = (await _stored(request, ctx, response_id)).input_items
        return _json(page(items if order == "asc" else items[::-1], limit, query.get("after"), query.get("before")))
    return served_by(await _guard(request, handle))


async def cancel_response(request: Request, response_id: str) -> Response:
    async def handle(ctx: ServingContext) -> Response:
        await _stored(request, ctx, response_id)
        raise BadRequestError(f"Only responses created with background=true can be cancelled; {NO_BACKGROUND}.")
    return served_by(await _guard(request, handle))


def page(items: list[dict], limit: int, after: str | None, before: str | None) -> InputItemList:
    """`limit` items of `items` (already in the asked order): the first ones after the item `after`, or the last ones
    before the item `before` (both: the first ones between them); has_more when the cut left some out."""
    ids = [item.get("id") for item in items]
    start = _position(ids, after, "after") + 1 if after else 0
    stop = _position(ids, before, "before") if before else len(items)
    window = items[start:stop]
    chosen = window[-limit:] if before and not after else window[:limit]
    return InputItemList(data=chosen, first_id=chosen[0]["id"] if chosen else None,
                         last_id=chosen[-1]["id"] if chosen else None, has_more=len(window) > len(chosen))


def _position(ids: list, item_id: str, param: str) -> int:
    if item_id not in ids:
        raise BadRequestError(f"{param}: no item with id {item_id!r} among this response's input items", param=param)
    return ids.index(item_id)


def _limit(text: str | None) -> int:
    try:
        limit = DEFAULT_LIMIT if text is None else int(text)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIMIT:
        raise BadRequestError(f"limit must be an integer from 1 to {MAX_LIMIT}, got {text!r}", param="limit")
    return limit


def _check_include(request: Request) -> None:
    include = request.query_params.getlist("include") + request.query_params.getlist("include[]")
    if include:
        raise BadRequestError(f"include={include!r} is not supported: stored items are returned whole", param="include")


async def _stored(request: Request, ctx: ServingContext, response_id: str) -> StoredResponse:
    """The stored response, if the caller's API key may see it (routes.request_owner); else OpenAI's 404."""
    owner = request_owner(request, ctx)
    record = None if ctx.response_store is None else await ctx.response_store.load(response_id, owner)
    if record is None:
        raise response_not_found_error(response_id)
    return record
