"""Where the gateway's GenerateRequests go: a Serve ModelServer handle, or an in-process engine (tests, tools).

Owns the mapping of transport failures onto OpenAI errors: a full replica queue -> 429 with Retry-After, no
healthy replica -> 503. Never renders, parses or validates requests (the gateway does).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Protocol

from deploy.api_errors import (BadRequestError, ServiceUnavailableError, no_healthy_replica_error,
                               queue_full_error)
from engine.generate_request import GenerateRequest
from deploy.token_channel import ChannelListener
from engine.token_output import TokenOutput, coalesce

logger = logging.getLogger(__name__)
RETRY_AFTER_S = 1.0
FINAL_OUTPUTS_GRACE_S = 10.0   # a finished request's last outputs arrive this long after its call returned, at most


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
    """The ModelServer deployment through a Serve DeploymentHandle (Serve's router picks the replica, counts the
    request as ongoing, queues it or answers 429). The outputs do not come back through Serve: the replica sends
    them to this gateway's token channel, one message per step for all of this gateway's requests on it."""

    def __init__(self, handle, host: str | None = None):
        self.handle, self.host = handle, host             # host: where the channel listens (default: this node)
        self._channel: ChannelListener | None = None
        self._starting = asyncio.Lock()

    async def channel(self) -> ChannelListener:
        async with self._starting:
            if self._channel is None:
                import ray
                channel = ChannelListener()
                await channel.start(self.host or ray.util.get_node_ip_address())
                self._channel = channel
        return self._channel

    async def model_info(self) -> dict:
        return await self.handle.model_info.remote()

    async def stream(self, request: GenerateRequest) -> AsyncIterator[TokenOutput]:
        channel = await self.channel()
        mailbox = channel.open(request.request_id)
        call = asyncio.ensure_future(self._call(request, channel.address))
        call.add_done_callback(lambda _: mailbox.wake())       # one await per chunk: the mailbox, nothing else
        remaining = request.params.n
        try:
            while remaining:
                if call.done():
                    call.result()                          # raises what ended the request (400 / 429 / 503)
                    # Finished: its last outputs were sent before the call returned; they are on their way.
                    outputs = await asyncio.wait_for(mailbox.take(), FINAL_OUTPUTS_GRACE_S)
                else:
                    outputs = await mailbox.take()
                for out in coalesce(outputs):
                    remaining -= out.finished
                    yield out
        except asyncio.TimeoutError:
            raise no_healthy_replica_error() from None
        finally:
            channel.close(request.request_id)
            if not call.done():                           # the client left: cancel, which frees its KV blocks
                call.cancel()
                await asyncio.gather(call, return_exceptions=True)

    async def _call(self, request: GenerateRequest, reply_to) -> None:
        """The ModelServer call, its failures mapped onto OpenAI errors."""
        from ray.exceptions import RayTaskError
        from ray.serve.exceptions import BackPressureError

        from cluster.replica_unhealthy import ReplicaUnhealthy
        try:
            await self.handle.generate_to.remote(request, reply_to)
        except BackPressureError:
            raise queue_full_error(RETRY_AFTER_S) from None
        except RayTaskError as e:
            if isinstance(e.cause, ValueError):    # the replica refused the request (e.g. a token id out of range)
                raise BadRequestError(str(e.cause)) from None
            if not isinstance(e.cause, ReplicaUnhealthy):
                raise
            logger.warning("request %s: replica unhealthy (%s)", request.request_id, e.cause)
            raise ServiceUnavailableError(f"The model replica failed ({e.cause}); retry later.") from None
        except (ReplicaUnhealthy, _unavailable_errors()) as e:
            logger.warning("request %s: no healthy replica (%s)", request.request_id, e)
            raise no_healthy_replica_error() from None


def _unavailable_errors() -> tuple[type[BaseException], ...]:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError
    return (RayActorError, ActorDiedError, ActorUnavailableError, DeploymentUnavailableError)
