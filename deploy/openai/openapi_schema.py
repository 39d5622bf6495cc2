"""The gateway's OpenAPI document (GET /openapi.json).

The routes read their bodies themselves (deploy/openai/json_body.py), so FastAPI sees no body parameter; each route names
its pydantic request model(s) with `json_body(...)` as `openapi_extra`, and the document is built from those very
models: each becomes `components/schemas/<Name>` (its `$defs` beside it), exactly as `model_json_schema()` writes it
(added after FastAPI's encoding, which would turn integer bounds into floats), and the operation refers to it. Every
operation also lists the error statuses the gateway answers, in OpenAI's body (deploy/openai/errors.py ErrorResponse);
FastAPI's 422 is dropped, since a bad request is answered 400 here.
"""
from __future__ import annotations

import copy
from importlib import metadata

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from deploy.openai.errors import ErrorResponse

SCHEMAS = "#/components/schemas/"
ERRORS = {400: "Bad request: the message names the field (param) to fix", 401: "Missing or invalid API key",
          404: "Unknown model, route or stored response", 413: "Request body over the size limit",
          429: "Request queue full (Retry-After)", 503: "No model replica ready (or the response store unreachable)"}
FASTAPI_VALIDATION = ("HTTPValidationError", "ValidationError")
_body_models: dict[str, type[BaseModel]] = {ErrorResponse.__name__: ErrorResponse}   # by name, as json_body met them


def json_body(*models: type[BaseModel]) -> dict:
    """`openapi_extra` for a route whose JSON body is one of `models` (several: the first that fits)."""
    for model in models:
        if _body_models.setdefault(model.__name__, model) is not model:
            raise ValueError(f"two request models are named {model.__name__!r}; the OpenAPI document needs one")
    refs = [{"$ref": SCHEMAS + model.__name__} for model in models]
    schema = refs[0] if len(refs) == 1 else {"anyOf": refs}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def query_parameters(**schemas: dict) -> dict:
    """`openapi_extra` for query parameters a route reads from `request.query_params` itself."""
    return {"parameters": [{"name": name, "in": "query", "required": False, "schema": schema}
                           for name, schema in schemas.items()]}


def install_openapi(api: FastAPI) -> None:
    """Serve `openapi_document(api)` at the app's openapi_url."""
    api.openapi = lambda: openapi_document(api)


def openapi_document(api: FastAPI) -> dict:
    """FastAPI's document for the app's routes, with the request models in components and OpenAI's errors."""
    if api.openapi_schema is None:
        doc = copy.deepcopy(get_openapi(title=api.title, version=metadata.version("epserve"), routes=api.routes))
        components = doc.setdefault("components", {}).setdefault("schemas", {})
        for name in FASTAPI_VALIDATION:
            components.pop(name, None)
        used = {ErrorResponse.__name__}
        for operations in doc["paths"].values():
            for operation in operations.values():
                used.update(_body_models_named(operation))
                _add_errors(operation, "requestBody" in operation)
        for name in sorted(used):
            _add_component(components, _body_models[name])
        api.openapi_schema = doc
    return api.openapi_schema


def _body_models_named(operation: dict) -> list[str]:
    media = operation.get("requestBody", {}).get("content", {}).get("application/json")
    if media is None:
        return []
    return [ref["$ref"].removeprefix(SCHEMAS) for ref in media["schema"].get("anyOf", [media["schema"]])]


def _add_component(components: dict, model: type[BaseModel]) -> None:
    """`model`'s JSON schema (and its `$defs`) under components/schemas by name."""
    schema = model.model_json_schema(ref_template=SCHEMAS + "{model}")
    for name, definition in {**schema.pop("$defs", {}), model.__name__: schema}.items():
        if components.setdefault(name, definition) != definition:
            raise ValueError(f"two different schemas are both named {name!r}; the OpenAPI document needs one")


def _add_errors(operation: dict, has_body: bool) -> None:
    responses = operation.setdefault("responses", {})
    responses.pop("422", None)
    error = {"content": {"application/json": {"schema": {"$ref": SCHEMAS + ErrorResponse.__name__}}}}
    for status, description in ERRORS.items():
        if status != 413 or has_body:
            responses.setdefault(str(status), {"description": description, **error})
