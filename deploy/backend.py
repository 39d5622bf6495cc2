"""Where the gateway's GenerateRequests go: a Serve ModelServer handle, or an in-process engine (tests, tools).

Owns the mapping of transport failures onto OpenAI errors: a full replica queue -> 429 with Retry-After, no
healthy replica -> 503; and moving a stream whose replica was lost onto another one (a continuation). Never
renders, parses or validates requests (the gateway does).
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Protocol

from deploy.openai.errors import (APIError, BadRequestError, ServiceUnavailableError, no_healthy_replica_error,
                               queue_full_error)
from engine.generate_request import GenerateRequest
from deploy.token_channel import ChannelListener
from engine.token_output import TokenOutput, coalesce

logger = logging.getLogger(__name__)
RETRY_AFTER_S = 1.0
FINAL_OUTPUTS_GRACE_S = 10.0   # a finished request's last outputs arrive this long after its call returned, at most
MIGRATION_BACKOFF_S = 0.25     # before the k-th resend of a request whose replica was lost: this x 2^(k-1)


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
        async for out in self.engine.stream(request.request_id, request.prompt_token_ids, request.params,
                                            request.resume_output_ids):
            yield out


class ReplicaLost(Exception):
    """The replica running a request died or failed (not the request's fault): the request can move elsewhere.
    `reason` says how (replica_died, replica_unhealthy, channel_lost, queue_full); `error` is the APIError the
    client gets if it cannot move."""

    def __init__(self, reason: str, error: APIError):
        super().__init__(str(error))
        self.reason, self.error = reason, error


class ServeBackend:
    """The ModelServer deployment through a Serve DeploymentHandle (Serve's router picks the replica, counts the
    request as ongoing, queues it or answers 429). The outputs do not come back through Serve: the replica sends
    them to this gateway's token channel, one message per step for all of this gateway's requests on it.

    A request whose replica is lost (its actor died, its EP group failed, its token channel broke) is resent to
    another replica as a continuation of the tokens this stream already yielded, at most `max_migrations` times
    (n == 1 only; seeded sampling resumes at the right offset), after a short backoff while Serve's router learns
    the replica is gone; `on_migrate(reason)` counts each. Refused requests (400) and client cancels never move."""

    def __init__(self, handle, host: str | None = None, max_migrations: int = 3,
                 on_migrate: Callable[[str], None] | None = None):
        self.handle, self.host = handle, host             # host: where the channel listens (default: this node)
        self.max_migrations, self.on_migrate = max_migrations, on_migrate
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
        attempt, delivered = request, list(request.resume_output_ids)
        for moves in itertools.count():                     # resends so far
            try:
                async with aclosing(self._attempt(channel, attempt, moved=moves > 0)) as outputs:
                    async for out in outputs:
                        delivered += out.new_token_ids
                        yield out if moves == 0 else dataclasses.replace(out, request_id=request.request_id)
                return
            except ReplicaLost as lost:
                if request.params.n != 1 or moves >= self.max_migrations:
                    raise lost.error from None
                logger.warning("request %s: replica lost (%s); continuing it elsewhere after %d tokens (migration "
                               "%d of %d)", request.request_id, lost, len(delivered), moves + 1, self.max_migrations)
                if self.on_migrate is not None:
                    self.on_migrate(lost.reason)
                await asyncio.sleep(MIGRATION_BACKOFF_S * 2 ** moves)
                attempt = dataclasses.replace(request, request_id=f"{request.request_id}~{moves + 1}",
                                              resume_output_ids=tuple(delivered))

    async def _attempt(self, channel: ChannelListener, request: GenerateRequest,
                       moved: bool) -> AsyncIterator[TokenOutput]:
        """One replica's run of the request (`moved`: a resend after a lost replica): its outputs as they arrive."""
        mailbox = channel.open(request.request_id)
        call = asyncio.ensure_future(self._call(request, channel.address, moved))
        call.add_done_callback(lambda _: mailbox.wake())       # one await per chunk: the mailbox, nothing else
        remaining = request.params.n
        try:
            while remaining:
                if call.done():
                    call.result()                          # raises what ended the request (400 / 429 / lost)
                    # Finished: its last outputs were sent before the call returned; they are on their way.
                    try:
                        outputs = await asyncio.wait_for(mailbox.take(), FINAL_OUTPUTS_GRACE_S)
                    except asyncio.TimeoutError:
                        raise ReplicaLost("channel_lost", no_healthy_replica_error()) from None
                else:
                    outputs = await mailbox.take()
                for out in coalesce(outputs):
                    remaining -= out.finished
                    yield out
        finally:
            channel.close(request.request_id)
            if not call.done():                           # the client left: cancel, which frees its KV blocks
                call.cancel()
                await asyncio.gather(call, return_exceptions=True)

    async def _call(self, request: GenerateRequest, reply_to, moved: bool = False) -> None:
        """The ModelServer call: a refused request -> 400, a full queue -> 429 (a moved request's -> ReplicaLost: it
        waits and tries again), a dead or failed replica -> ReplicaLost."""
        from ray.exceptions import RayTaskError
        from ray.serve.exceptions import BackPressureError

        from cluster.replica_unhealthy import ReplicaUnhealthy
        try:
            await self.handle.generate_to.remote(request, reply_to)
        except BackPressureError:
            if moved:
                raise ReplicaLost("queue_full", queue_full_error(RETRY_AFTER_S)) from None
            raise queue_full_error(RETRY_AFTER_S) from None
        except RayTaskError as e:
            if isinstance(e.cause, ValueError):    # the replica refused the request (e.g. a token id out of range)
                raise BadRequestError(str(e.cause)) from None
            if isinstance(e.cause, _unavailable_errors()):
                raise ReplicaLost("replica_died", no_healthy_replica_error()) from None
            if not isinstance(e.cause, ReplicaUnhealthy):
                raise
            logger.warning("request %s: replica unhealthy (%s)", request.request_id, e.cause)
            raise ReplicaLost("replica_unhealthy", ServiceUnavailableError(
                f"The model replica failed ({e.cause}); retry later.")) from None
        except (ReplicaUnhealthy, *_unavailable_errors()) as e:   # a nested tuple would be a TypeError here
            logger.warning("request %s: no healthy replica (%s)", request.request_id, e)
            raise ReplicaLost("replica_died", no_healthy_replica_error()) from None


def _unavailable_errors() -> tuple[type[BaseException], ...]:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError
    return (RayActorError, ActorDiedError, ActorUnavailableError, DeploymentUnavailableError)
