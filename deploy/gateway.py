"""Gateway: the Serve ingress deployment. A FastAPI app with the OpenAI routes (deploy/openai/routes.py) whose
ServingContext talks to the ModelServer deployment through its handle (Serve's router picks the replica) and keeps
stored Responses in the app's ResponseStore deployment (its handle) or in Redis; /health is ready once a ModelServer
replica runs (deploy/serve_readiness.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os

from fastapi import FastAPI
from ray import serve

from deploy.app_config import AppArgs
from deploy.backend import ServeBackend
from deploy.model_paths import resolve_model_dir, served_name
from deploy.openai.routes import register_routes
from deploy.openai.openapi_schema import install_openapi
from deploy.openai.response_store import open_response_store
from deploy.serving_context import ServingContext
from deploy.serve_readiness import ServeReadiness
from deploy.tokenizer import Tokenizer, model_stop_ids
from model.config import ModelConfig
from monitoring.recorders import RequestMetrics, current_replica_id
from model.errors import UserError

logger = logging.getLogger(__name__)

_context: ServingContext | None = None   # handed from Gateway.__init__ to build_api in the replica's process


def build_api() -> FastAPI:
    """Serve calls this in the replica right after Gateway.__init__ (the FastAPI factory form of serve.ingress),
    so the app is built inside the replica process and carries that replica's ServingContext. GET /openapi.json
    describes the routes' real request models (deploy/openai/openapi_schema.py); like /health it needs no API key."""
    api = FastAPI(title="epserve", docs_url=None, redoc_url=None, openapi_url="/openapi.json", lifespan=_lifespan)
    register_routes(api)
    install_openapi(api)
    api.state.ctx = _context
    return api


@contextlib.asynccontextmanager
async def _lifespan(api: FastAPI):
    task = asyncio.get_running_loop().create_task(learn_engine_limits(api))
    yield
    task.cancel()


async def learn_engine_limits(api: FastAPI) -> None:
    """Start the token channel, then ask the ModelServer (once one runs) for the max_model_len its ranks' KV cache
    allows and serve with it; until then the configured limit (capped by the model) holds, and the engine still
    refuses what it cannot fit."""
    ctx: ServingContext = api.state.ctx
    await ctx.backend.channel()
    while True:
        try:
            info = await ctx.backend.model_info()
            break
        except Exception as e:          # noqa: BLE001  no replica yet, or one failed: ask again
            logger.debug("model info not available yet: %s", e)
            await asyncio.sleep(1.0)
    api.state.ctx = dataclasses.replace(ctx, max_model_len=info["max_model_len"])
    logger.info("gateway: the engine allows max_model_len %d", info["max_model_len"])


def api_keys(args: AppArgs) -> frozenset[str]:
    """Keys from the args plus, when `api_keys_env` names one, a comma-separated env var (a k8s Secret)."""
    keys = set(args.api_keys)
    if args.api_keys_env:
        keys.update(k.strip() for k in os.environ.get(args.api_keys_env, "").split(",") if k.strip())
    return frozenset(keys)


@serve.ingress(build_api)
class Gateway:
    def __init__(self, model_server, args: dict, response_store=None):
        app_args = AppArgs.model_validate(args)
        model_dir = resolve_model_dir(app_args.model)
        tokenizer = Tokenizer.from_model_dir(model_dir)
        if tokenizer is None:
            raise UserError(f"{model_dir}: the gateway needs tokenizer.json to render chats")
        config = ModelConfig.from_dir(model_dir)
        metrics = RequestMetrics(served_name(app_args.model, app_args.served_model_name), replica=current_replica_id())
        global _context
        _context = ctx = ServingContext(
            backend=ServeBackend(model_server, max_migrations=app_args.max_migrations,
                                 on_migrate=lambda reason: metrics.on_request_migrated()), tokenizer=tokenizer,
            model_name=served_name(app_args.model, app_args.served_model_name),
            max_model_len=min(app_args.max_model_len or config.max_position_embeddings, config.max_position_embeddings),
            eos_token_ids=model_stop_ids(model_dir, tokenizer), api_keys=api_keys(app_args),
            max_request_bytes=app_args.max_request_bytes, metrics=metrics,
            readiness=ServeReadiness(model_server.app_name, model_server.deployment_name),
            response_store=open_response_store(app_args, response_store))
        logger.info("gateway serving %s (max_model_len %d, auth %s)", ctx.model_name, ctx.max_model_len,
                    "on" if ctx.api_keys else "off")
