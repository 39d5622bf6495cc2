"""vLLM's tokenizer routes on the gateway: POST /tokenize (a completion prompt, or chat messages rendered exactly as
/v1/chat/completions renders them), POST /detokenize, and GET /version. Same request and response shapes as vLLM;
errors in OpenAI's body. Pure gateway work: nothing reaches the model replicas.
"""
from __future__ import annotations

from importlib import metadata

from fastapi import FastAPI, Request
from pydantic import BaseModel, Field
from starlette.responses import Response

from deploy.openai.errors import BadRequestError
from deploy.harmony.render import HarmonyRenderError, RenderOptions, render_chat
from deploy.openai.json_body import read_json_object
from deploy.openai.openapi_schema import json_body
from deploy.openai.protocol import ChatCompletionRequest, RequestModel
from deploy.serving_context import ServingContext


class TokenizeCompletionRequest(RequestModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True          # the harmony tokenizer adds none; kept for vLLM's shape
    return_token_strs: bool = False


class TokenizeChatRequest(ChatCompletionRequest):
    add_generation_prompt: bool = True       # end with `<|start|>assistant`, as a chat request is rendered
    add_special_tokens: bool = False
    return_token_strs: bool = False


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[int] = Field(min_length=0)


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


def register_tokenize_routes(api: FastAPI) -> None:
    api.add_api_route("/tokenize", tokenize, methods=["POST"],
                      openapi_extra=json_body(TokenizeCompletionRequest, TokenizeChatRequest))
    api.add_api_route("/detokenize", detokenize, methods=["POST"], openapi_extra=json_body(DetokenizeRequest))
    api.add_api_route("/version", version, methods=["GET"])


async def tokenize(request: Request) -> Response:
    from deploy.openai.routes import _guard, _json, parse_request

    async def run(ctx: ServingContext) -> Response:
        body = await read_json_object(request, ctx.max_request_bytes)
        schema = TokenizeChatRequest if "messages" in body else TokenizeCompletionRequest
        req = parse_request(schema, body, ctx)
        ids = _chat_ids(ctx, req) if isinstance(req, TokenizeChatRequest) else ctx.tokenizer.encode(req.prompt)
        strs = [ctx.tokenizer.decode([t]) for t in ids] if req.return_token_strs else None
        return _json(TokenizeResponse(count=len(ids), max_model_len=ctx.max_model_len, tokens=ids, token_strs=strs))
    return await _guard(request, run)


async def detokenize(request: Request) -> Response:
    from deploy.openai.routes import _guard, _json, parse_request

    async def run(ctx: ServingContext) -> Response:
        req = parse_request(DetokenizeRequest, await read_json_object(request, ctx.max_request_bytes), ctx)
        vocab = ctx.tokenizer.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise BadRequestError(f"token id {bad[0]} is out of range [0, {vocab})", param="tokens")
        return _json(DetokenizeResponse(prompt=ctx.tokenizer.decode(req.tokens)))
    return await _guard(request, run)


async def version(request: Request) -> Response:
    from deploy.openai.routes import _guard, _json
    return await _guard(request, lambda ctx: _json(VersionResponse(version=metadata.version("epserve"))))


def _chat_ids(ctx: ServingContext, req: TokenizeChatRequest) -> list[int]:
    """The ids /v1/chat/completions would feed the model for these messages (and tools, reasoning effort)."""
    try:
        options = RenderOptions(reasoning_effort=req.reasoning_effort or "medium", tools=req.effective_tools)
        ids = list(render_chat(ctx.tokenizer, req.messages, options).token_ids)
    except HarmonyRenderError as e:
        raise BadRequestError(str(e), param="messages") from None
    if not req.add_generation_prompt:
        suffix = [ctx.tokenizer.token_id("<|start|>"), *ctx.tokenizer.encode("assistant")]
        if ids[-len(suffix):] == suffix:
            ids = ids[:-len(suffix)]
    return ids
