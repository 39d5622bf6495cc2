"""Where the gateway's GenerateRequests go: a Serve ModelServer handle, or an in-process engine (tests, tools).

Owns the mapping of transport failures onto OpenAI errors: a full replica queue -> 429 with Retry-After, no
healthy replica -> 503. Never renders, parses or validates requests (the gateway does).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Protocol

from deploy.api_errors import BadRequestError, no_healthy_replica_error, queue_full_error
from engine.generate_request import GenerateRequest
from engine.token_output import TokenOutput

logger = logging.getLogger(__name__)
RETRY_AFTER_S = 1.0


class GenerationBackend(Protocol):
    def stream(self, request: GenerateRequest) -> AsyncIterator[TokenOutput]:
        """TokenOutputs of the request as produced; raises APIError (429/503) when it cannot be served.
        Closing the iterator early cancels the request and frees its KV cache."""
        ...


class LocalBackend:
    """An LLMEngine in this process (its async `stream`); no Ray."""

    def __init__(self, engine):
        self.engine = engine

    async def stream(self, request: GenerateRequest) -> AsyncIterator[TokenOutput]:
        async for out in self.engine.stream(request.request_id, request.prompt_token_ids, request.params):
            yield out


class ServeBackend:
    """The ModelServer deployment through a Serve DeploymentHandle (Serve's router picks the replica)."""

    def __init__(self, handle):
        self.handle = handle.options(stream=True)

    async def stream(self, request: GenerateRequest) -> AsyncIterator[TokenOutput]:
        from ray.exceptions import RayTaskError
        from ray.serve.exceptions import BackPressureError

        from cluster.replica import ReplicaUnhealthy
        responses = self.handle.generate.remote(request)
        try:
            async for out in responses:
                yield out
        except (GeneratorExit, asyncio.CancelledError):
            with contextlib.suppress(Exception):   # the client left: cancel, which frees its KV blocks
                responses.cancel()
            raise
        except BackPressureError:
            raise queue_full_error(RETRY_AFTER_S) from None
        except RayTaskError as e:
            if isinstance(e.cause, ValueError):    # the replica refused the request (e.g. a token id out of range)
                raise BadRequestError(str(e.cause)) from None
            if not isinstance(e.cause, ReplicaUnhealthy):
                raise
            logger.warning("request %s: replica unhealthy (%s)", request.request_id, e.cause)
            raise no_healthy_replica_error() from None
        except (ReplicaUnhealthy, _unavailable_errors()) as e:
            logger.warning("request %s: no healthy replica (%s)", request.request_id, e)
            raise no_healthy_replica_error() from None


def _unavailable_errors() -> tuple[type[BaseException], ...]:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError
    return (RayActorError, ActorDiedError, ActorUnavailableError, DeploymentUnavailableError)
