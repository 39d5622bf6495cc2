"""ServingContext: what every OpenAI route handler needs, built once per gateway replica."""
from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable

from deploy.backend import GenerationBackend
from deploy.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class ServingContext:
    backend: GenerationBackend
    tokenizer: Tokenizer
    model_name: str                      # the id /v1/models lists and requests must name (or omit)
    max_model_len: int                   # prompt + completion tokens, already capped by the model
    eos_token_ids: tuple[int, ...]       # generation_config eos ids (completions); chat adds harmony's stops
    api_keys: frozenset[str] = frozenset()   # empty: no authentication
    max_request_bytes: int = 1 << 20
    metrics: object | None = None            # monitoring.recorders.RequestMetrics (TTFT/ITL/e2e, HTTP errors)
    # /health's readiness probe: awaits to None when a model replica can serve, else to the reason it cannot
    # (starting, failed to deploy: ...). None: always ready (an in-process backend).
    readiness: Callable[[], Awaitable[str | None]] | None = None
    response_store: object | None = None     # deploy.openai.response_store.ResponseStore; None: nothing is stored
