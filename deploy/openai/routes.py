"""The OpenAI HTTP surface of the gateway: routes, API keys, body limit, client disconnects, and OpenAI's error body
`{"error": {"message", "type", "param", "code"}}` on every error, never a stack trace.

Each generation request goes: API key -> body size -> JSON -> pydantic -> model name -> service plan -> backend.
Handlers find the ServingContext at `request.app.state.ctx`; nothing here imports Ray. Each error answered is
counted once in the HTTP-errors metric; a generation request's TTFT and e2e run from its arrival here.
"""
from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import suppress

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response, StreamingResponse

from deploy.openai.errors import (APIError, BadRequestError, ServiceUnavailableError, invalid_api_key_error,
                               model_not_found_error, route_not_found_error, validation_error)
from deploy.openai.chat_service import GenerationPlan, as_api_error, collect, generate_outputs, plan_chat_completion
from deploy.openai.completion_service import plan_completion
from deploy.openai.json_body import read_json_object
from deploy.openai.openapi_schema import json_body
from deploy.openai.protocol import ChatCompletionRequest, CompletionRequest
from deploy.openai.protocol_outputs import ModelCard, ModelList
from deploy.openai.response_store import key_owner
from deploy.serving_context import ServingContext

logger = logging.getLogger(__name__)
CLIENT_CLOSED_REQUEST = 499   # nginx's status for "the client left first"; nobody reads it, logs do


def register_routes(api: FastAPI) -> None:
    """Add the OpenAI routes, /health, and the handlers that give every error OpenAI's body."""
    api.add_api_route("/health", health, methods=["GET"])
    api.add_api_route("/v1/models", list_models, methods=["GET"])
    api.add_api_route("/v1/models/{model_id:path}", retrieve_model, methods=["GET"])
    api.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"],
                      openapi_extra=json_body(ChatCompletionRequest))
    api.add_api_route("/v1/completions", completions, methods=["POST"], openapi_extra=json_body(CompletionRequest))
    from deploy.openai.responses_routes import register_responses_routes   # they import this module's helpers
    from deploy.openai.tokenize_routes import register_tokenize_routes
    register_responses_routes(api)
    register_tokenize_routes(api)
    api.add_exception_handler(HTTPException, _http_exception)
    api.add_exception_handler(RequestValidationError, _request_validation_error)
    api.add_exception_handler(APIError, _api_error)
    api.add_exception_handler(Exception, _api_error)   # a last resort: handlers below catch their own errors


def error_response(err: APIError) -> Response:
    return Response(err.response().model_dump_json(), status_code=err.status_code, headers=err.headers,
                    media_type="application/json")


def _status_error(status: int, message: str, headers: dict | None = None) -> APIError:
    err = APIError(message, headers=headers)
    err.status_code, err.error_type = status, {405: "MethodNotAllowedError"}.get(status, "APIError")
    return err


def _counted(request: Request, err: APIError) -> Response:
    """The error's response, counted in the HTTP-errors metric (errors _guard does not see: routing, last resort)."""
    metrics = getattr(getattr(request.app.state, "ctx", None), "metrics", None)
    if metrics is not None:
        metrics.on_http_error(err.status_code)
    return error_response(err)


async def _api_error(request: Request, exc: Exception) -> Response:
    return _counted(request, as_api_error(exc))


async def _http_exception(request: Request, exc: HTTPException) -> Response:
    if exc.status_code == 404:
        return _counted(request, route_not_found_error(request.url.path))
    if exc.status_code == 405:
        return _counted(request, _status_error(405, f"Method {request.method} is not allowed on "
                                                    f"{request.url.path}.", exc.headers))
    return _counted(request, _status_error(exc.status_code, str(exc.detail), exc.headers))


async def _request_validation_error(request: Request, exc: RequestValidationError) -> Response:
    first = (exc.errors() or [{}])[0]
    param = ".".join(str(p) for p in first.get("loc", ()))
    return _counted(request, BadRequestError(f"{param}: {first.get('msg', 'invalid value')}", param=param or None))


# ---- routes ----------------------------------------------------------------------------------------------------
async def health(request: Request) -> Response:
    """200 `{}` when the context's readiness probe (if any) finds a model replica that can serve, else 503 with
    its reason. Open without an API key (probes); not counted as an HTTP error (a probe polls it while starting)."""
    probe = request.app.state.ctx.readiness
    if probe is None:
        return Response("{}", media_type="application/json")
    try:
        reason = await probe()
    except Exception as e:
        logger.warning("readiness probe failed: %s", e, exc_info=True)
        reason = f"Readiness unknown: the probe failed ({type(e).__name__})."
    if reason is None:
        return Response("{}", media_type="application/json")
    return error_response(ServiceUnavailableError(reason))


async def list_models(request: Request) -> Response:
    return await _guard(request, lambda ctx: _json(ModelList(data=[_model_card(ctx)])))


async def retrieve_model(request: Request, model_id: str) -> Response:
    def card(ctx: ServingContext) -> Response:
        if model_id != ctx.model_name:
            raise model_not_found_error(model_id)
        return _json(_model_card(ctx))
    return await _guard(request, card)


async def chat_completions(request: Request) -> Response:
    return await _generate(request, ChatCompletionRequest, plan_chat_completion)


async def completions(request: Request) -> Response:
    return await _generate(request, CompletionRequest, plan_completion)


def _model_card(ctx: ServingContext) -> ModelCard:
    return ModelCard(id=ctx.model_name, root=ctx.model_name, max_model_len=ctx.max_model_len)


def _json(body: BaseModel) -> Response:
    return Response(body.model_dump_json(), media_type="application/json")


async def _guard(request: Request, handle: Callable, timer=None) -> Response:
    """Authenticate, then run `handle(ctx)`; every failure becomes an OpenAI error body, counted once: by the
    request's `timer` when it has one (which ignores a second report), else directly."""
    ctx: ServingContext = request.app.state.ctx
    try:
        _authenticate(request, ctx)
        result = handle(ctx)
        return await result if asyncio.iscoroutine(result) else result
    except ClientDisconnect:
        logger.info("%s %s: the client disconnected; its request was cancelled", request.method, request.url.path)
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    except Exception as e:
        err = as_api_error(e)
        if timer is not None:
            timer.on_error(err.status_code)
        elif ctx.metrics is not None:
            ctx.metrics.on_http_error(err.status_code)
        return error_response(err)


async def _generate(request: Request, schema: type[BaseModel], plan: Callable) -> Response:
    metrics = request.app.state.ctx.metrics
    timer = metrics.start() if metrics is not None else None   # arrival: TTFT/e2e include parsing, rendering, queue

    async def run(ctx: ServingContext) -> Response:
        req = parse_request(schema, await read_json_object(request, ctx.max_request_bytes), ctx)
        # Rendering a long conversation and compiling a new schema's grammar (seconds over a 200k vocabulary) run
        # in a worker thread: the event loop keeps streaming every other request's tokens meanwhile.
        planned = await (plan(ctx, req) if inspect.iscoroutinefunction(plan) else asyncio.to_thread(plan, ctx, req))
        return await run_plan(request, ctx, planned, timer)
    return await _guard(request, run, timer)


def parse_request(schema: type[BaseModel], body: dict, ctx: ServingContext):
    """The body as `schema` (400 naming the first bad field), for this gateway's model (404 for another)."""
    try:
        req = schema.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None
    if req.model is not None and req.model != ctx.model_name:
        raise model_not_found_error(req.model)
    return req


def request_owner(request: Request, ctx: ServingContext) -> str | None:
    """Whose stored responses this request may see: its (already authenticated) API key's digest; None when the
    server has no API keys."""
    return key_owner(_bearer(request)[1]) if ctx.api_keys else None


def _bearer(request: Request) -> tuple[str, str]:
    """(scheme, key) of the Authorization header."""
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    return scheme, key.strip()


def _authenticate(request: Request, ctx: ServingContext) -> None:
    if not ctx.api_keys:
        return
    scheme, key = _bearer(request)
    # compare_digest against every key: the time taken does not tell how much of a guess was right
    if scheme.lower() != "bearer" or not any([hmac.compare_digest(key.encode(), k.encode()) for k in ctx.api_keys]):
        raise invalid_api_key_error()


# ---- running a plan: disconnects and the event stream ----------------------------------------------------------
async def run_plan(request: Request, ctx: ServingContext, plan: GenerationPlan, timer=None) -> Response:
    """Run the plan's requests; `timer` (monitoring.recorders.RequestTimer, started at arrival) times them."""
    outputs = generate_outputs(ctx.backend, plan.requests)
    if timer is not None:
        outputs = _metered(outputs, timer)
    if not plan.stream:
        body = plan.body(await until_disconnected(request, collect(outputs)))
        return _json(await body if inspect.isawaitable(body) else body)
    # Wait for the first output before answering, so 400/429/503 from the backend are real HTTP statuses.
    first = await until_disconnected(request, anext(outputs))

    async def replay() -> AsyncIterator:
        yield first
        async for item in outputs:
            yield item
    return SSEResponse(plan.events(replay()), on_close=outputs.aclose)


async def _metered(outputs: AsyncIterator, timer) -> AsyncIterator:
    """Pass outputs through, timing tokens as the client gets them (TTFT, ITL, e2e, finish reason). An error is
    reported to the timer here, also one after the response started (which _guard never sees)."""
    reason = "stop"
    try:
        async for index, out in outputs:
            timer.on_tokens(len(out.new_token_ids))
            if out.finished:
                reason = out.finish_reason or reason
            yield index, out
    except (GeneratorExit, asyncio.CancelledError):
        timer.on_finish("abort")
        raise
    except Exception as e:
        timer.on_error(as_api_error(e).status_code)
        raise
    finally:
        await outputs.aclose()
    timer.on_finish(reason)


async def until_disconnected(request: Request, awaitable):
    """Await `awaitable` unless the client disconnects first (vLLM's with_cancellation): then cancel it, which
    closes the backend streams it iterates (aborting the request), and raise ClientDisconnect."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
    if work.cancelled():
        raise ClientDisconnect()
    return work.result()


async def wait_for_disconnect(receive) -> None:
    """Return when the client has gone. A server whose `receive` fails cannot tell: then wait forever (the caller
    cancels this when its work is done) rather than report a disconnect that did not happen."""
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except Exception as e:
        logger.debug("receive() failed (%s); disconnects go unnoticed for this request", e)
        await asyncio.Future()


class SSEResponse(StreamingResponse):
    """An event stream that watches for the client leaving whatever the ASGI spec version (Starlette only does for
    < 2.4) and, however it ends, closes its body and the backend streams under it: the request is cancelled.

    Cancellation is asyncio's Task.cancel, not an anyio cancel scope: anyio skips a task whose awaited future is
    already done, and a busy engine always has the next token ready, so a scope's cancel could starve forever."""

    def __init__(self, body: AsyncIterator[str], on_close: Callable):
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        streaming = asyncio.ensure_future(self._stream(send))
        listening = asyncio.ensure_future(wait_for_disconnect(receive))
        try:
            await asyncio.wait({streaming, listening}, return_when=asyncio.FIRST_COMPLETED)
            if streaming.done():
                streaming.result()       # an unexpected error propagates to the server's error handling
            else:
                logger.info("client disconnected mid-stream; cancelling its request")
        finally:
            with anyio.CancelScope(shield=True):
                for task in (streaming, listening):
                    task.cancel()
                await asyncio.gather(streaming, listening, return_exceptions=True)
                await self.body_iterator.aclose()
                await self._on_close()

    async def _stream(self, send) -> None:
        with suppress(OSError):          # ASGI 2.4 servers raise it on send when the client has gone
            await self.stream_response(send)
