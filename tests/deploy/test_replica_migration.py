"""ServeBackend moving a stream whose replica is lost: scripted replicas behind a fake Serve handle send their outputs
through the real token channel; a replica "dies" (ActorDiedError) after some tokens. The continuation resumes from
exactly the tokens the stream yielded; refused requests, cancels, n > 1 and exhausted migrations never move."""
import asyncio
from contextlib import aclosing

import pytest
from ray.exceptions import ActorDiedError, RayTaskError
from ray.serve.exceptions import BackPressureError

import deploy.backend as backend_module
from cluster.replica_unhealthy import ReplicaUnhealthy
from deploy.openai.errors import BadRequestError, RateLimitError, ServiceUnavailableError
from deploy.backend import ServeBackend
from deploy.token_channel import ChannelSender
from engine.generate_request import GenerateRequest
from engine.sampling_params import SamplingParams
from engine.token_output import TokenOutput

MAX_TOKENS = 12


def token_at(request: GenerateRequest, index: int) -> int:
    """The scripted model: the index-th output token depends on the prompt, the seed and the index only."""
    return (sum(request.prompt_token_ids) + 7 * index + (request.params.seed or 0)) % 97


class FakeHandle:
    """Stands in for the ModelServer DeploymentHandle: `generate_to.remote(request, reply_to)` runs replica number
    len(calls), which sends one TokenOutput per token over a ChannelSender and fails as scripted in `fail_after`
    (replica index -> (tokens sent first, exception)); later replicas run to the end."""

    def __init__(self, fail_after: dict[int, tuple[int, BaseException]] | None = None, delay_s: float = 0.001):
        self.fail_after, self.delay_s = fail_after or {}, delay_s
        self.calls: list[GenerateRequest] = []
        self.cancelled = 0
        self.generate_to = self

    def remote(self, request: GenerateRequest, reply_to):
        self.calls.append(request)
        return self._run(len(self.calls) - 1, request, reply_to)

    async def _run(self, replica: int, request: GenerateRequest, reply_to) -> None:
        sender = ChannelSender(tuple(reply_to), lambda e: None)
        limit, error = self.fail_after.get(replica, (None, None))
        resumed = len(request.resume_output_ids)
        tokens = list(request.resume_output_ids)
        try:
            for i in range(resumed, request.params.max_tokens):
                if i - resumed == limit:
                    raise error
                tokens.append(token_at(request, i))
                done = i + 1 == request.params.max_tokens
                sender.add([TokenOutput(request.request_id, 0, [tokens[-1]], list(tokens) if done else [],
                                        len(request.prompt_token_ids), finished=done,
                                        finish_reason="length" if done else None, num_output_tokens=i + 1)])
                sender.flush()
                await asyncio.sleep(self.delay_s)
            if limit == request.params.max_tokens - resumed:
                raise error
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            sender.close()


def collect(backend: ServeBackend, request: GenerateRequest, stop_after: int | None = None) -> list[TokenOutput]:
    async def main():
        outs = []
        async with aclosing(backend.stream(request)) as stream:
            async for out in stream:
                outs.append(out)
                if len(outs) == stop_after:
                    break
        await asyncio.sleep(0.05)
        return outs
    return asyncio.run(main())


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    monkeypatch.setattr(backend_module, "MIGRATION_BACKOFF_S", 0.0)


def request(**params) -> GenerateRequest:
    return GenerateRequest("req-1", [3, 1, 4, 1, 5], SamplingParams(max_tokens=MAX_TOKENS, **params))


def backend(handle, max_migrations=3):
    reasons = []
    b = ServeBackend(handle, host="127.0.0.1", max_migrations=max_migrations, on_migrate=reasons.append)
    return b, reasons


@pytest.mark.parametrize("seed", [None, 5])
def test_a_lost_replica_continues_on_another_from_the_tokens_yielded(seed):
    req = request(seed=seed)
    died = ActorDiedError()
    handle = FakeHandle({0: (4, died), 1: (3, RayTaskError("generate_to", "", ReplicaUnhealthy("rank 1 died")))})
    b, reasons = backend(handle)
    outs = collect(b, req)
    expected = [token_at(req, i) for i in range(MAX_TOKENS)]
    assert [t for o in outs for t in o.new_token_ids] == expected          # each token once, in order
    assert outs[-1].finished and outs[-1].output_token_ids == expected
    counts = [len([t for o in outs[:i + 1] for t in o.new_token_ids]) for i in range(len(outs))]
    assert [o.num_output_tokens for o in outs] == counts                 # usage counts every token, resumed too
    assert {o.request_id for o in outs} == {"req-1"}
    # Each resend carries exactly the tokens the stream had yielded: at most what the lost replica sent (outputs
    # still in flight when its call failed are generated again, never yielded twice).
    resumed = [c.resume_output_ids for c in handle.calls]
    assert resumed[0] == () and len(resumed[1]) <= 4 and len(resumed[1]) <= len(resumed[2]) <= len(resumed[1]) + 3
    assert all(list(r) == expected[:len(r)] for r in resumed)
    assert len({c.request_id for c in handle.calls}) == 3                   # each attempt its own id and mailbox
    assert reasons == ["replica_died", "replica_unhealthy"]


def test_migrations_are_bounded_then_503():
    handle = FakeHandle({i: (2, ActorDiedError()) for i in range(5)})
    b, reasons = backend(handle, max_migrations=2)
    with pytest.raises(ServiceUnavailableError):
        collect(b, request())
    assert len(handle.calls) == 3 and reasons == ["replica_died"] * 2


def test_no_migration_when_disabled_or_n_above_one():
    for max_migrations, params in ((0, {}), (3, {"n": 2})):
        handle = FakeHandle({0: (2, ActorDiedError())})
        b, reasons = backend(handle, max_migrations)
        with pytest.raises(ServiceUnavailableError):
            collect(b, request(**params))
        assert len(handle.calls) == 1 and reasons == []


def test_a_refused_request_fails_fast_without_moving():
    handle = FakeHandle({0: (0, RayTaskError("generate_to", "", ValueError("token id 5000 is out of range")))})
    b, reasons = backend(handle)
    with pytest.raises(BadRequestError, match="out of range"):
        collect(b, request())
    assert len(handle.calls) == 1 and reasons == []


def test_a_client_cancel_cancels_the_call_and_never_moves():
    handle = FakeHandle(delay_s=0.05)
    b, reasons = backend(handle)
    outs = collect(b, request(), stop_after=3)
    assert len(outs) == 3 and len(handle.calls) == 1 and handle.cancelled == 1 and reasons == []


def test_a_full_queue_is_429_at_first_and_waited_out_once_moved():
    full = BackPressureError(num_queued_requests=3, max_queued_requests=2)
    handle = FakeHandle({0: (0, full)})
    b, reasons = backend(handle)
    with pytest.raises(RateLimitError):
        collect(b, request())
    assert len(handle.calls) == 1 and reasons == []
    handle = FakeHandle({0: (3, ActorDiedError()), 1: (0, full)})
    b, reasons = backend(handle)
    outs = collect(b, request())
    assert [t for o in outs for t in o.new_token_ids] == [token_at(request(), i) for i in range(MAX_TOKENS)]
    assert reasons == ["replica_died", "queue_full"] and len(handle.calls) == 3
    assert handle.calls[1].resume_output_ids == handle.calls[2].resume_output_ids     # nothing ran in between
