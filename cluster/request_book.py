"""RequestBook: an EP group's requests in flight: the rank actor each runs on (by worker id, stable across regroups),
the work each still adds to its rank (to place new requests on the least-loaded rank), and what is needed to continue
it on another rank: its prompt, parameters and the output tokens already handed out (the continuation's resumed
tokens). Plain data; the caller (EPGroup) holds the lock.
"""
from __future__ import annotations

import dataclasses

from engine.sampling_params import SamplingParams
from engine.token_output import TokenOutput


@dataclasses.dataclass
class BookedRequest:
    prompt: list[int]
    params: SamplingParams
    worker: int
    cost: int                    # prompt + output tokens it adds to its rank's load
    left: int                    # completions not finished
    delivered: list[int]         # n == 1: output tokens handed out so far (resumed ones included)
    any_delivered: bool = False  # n > 1: whether any token was handed out (it then cannot continue elsewhere)
    aborted: bool = False        # its client left: an abort is on its way to its rank


@dataclasses.dataclass(frozen=True)
class Continuation:
    """A request of a lost rank, to run again on a survivor: its prompt plus the tokens it already handed out."""
    request_id: str
    prompt: list[int]
    params: SamplingParams
    resume: tuple[int, ...]


class RequestBook:
    def __init__(self):
        self._requests: dict[str, BookedRequest] = {}
        self.load: dict[int, int] = {}               # worker id -> tokens its requests still prefill and decode
        self._count: dict[int, int] = {}             # worker id -> requests booked on it

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def __len__(self) -> int:
        return len(self._requests)

    def add_worker(self, worker: int) -> None:
        self.load.setdefault(worker, 0)
        self._count.setdefault(worker, 0)

    def least_loaded(self, workers: list[int]) -> int:
        """The worker with the least outstanding work (ties: the first in `workers`, i.e. the lowest rank)."""
        return min(workers, key=lambda w: self.load[w])

    def requests_on(self, workers: list[int]) -> dict[int, int]:
        """Requests booked on each of `workers` (unfinished)."""
        return {w: self._count.get(w, 0) for w in workers}

    def add(self, request_id: str, prompt: list[int], params: SamplingParams, resume, worker: int) -> None:
        self.release(request_id)                     # booked again (never twice at once)
        cost = len(prompt) + params.n * params.max_tokens
        self._requests[request_id] = BookedRequest(list(prompt), params, worker, cost, params.n, list(resume))
        self.load[worker] += cost
        self._count[worker] = self._count.get(worker, 0) + 1

    def aborted(self, request_id: str) -> int | None:
        """The request's client left; returns its worker (None: not booked)."""
        request = self._requests.get(request_id)
        if request is None:
            return None
        request.aborted = True
        return request.worker

    def worker_of(self, request_id: str) -> int | None:
        request = self._requests.get(request_id)
        return None if request is None else request.worker

    def on_outputs(self, outputs: list[TokenOutput]) -> None:
        """Outputs handed out: their tokens are delivered; a request whose completions all finished leaves."""
        for out in outputs:
            request = self._requests.get(out.request_id)
            if request is None:
                continue
            if request.params.n == 1:
                request.delivered.extend(out.new_token_ids)
            request.any_delivered = request.any_delivered or bool(out.new_token_ids)
            if out.finished:
                request.left -= 1
                if request.left == 0:
                    self.release(out.request_id)

    def release(self, request_id: str) -> None:
        request = self._requests.pop(request_id, None)
        if request is not None and request.worker in self.load:
            self.load[request.worker] -= request.cost
            self._count[request.worker] -= 1

    def take_lost(self, workers: set[int]) -> tuple[list[Continuation], list[str]]:
        """Remove the requests of lost `workers` (and the workers): continuations for those that can continue
        (n == 1, or nothing handed out yet), and the ids of those that cannot (n > 1 with tokens out). Requests
        whose client left are dropped."""
        continuations, lost = [], []
        for request_id, r in list(self._requests.items()):
            if r.worker not in workers:
                continue
            del self._requests[request_id]
            if r.aborted:
                continue
            if r.params.n == 1 or not r.any_delivered:
                continuations.append(Continuation(request_id, r.prompt, r.params, tuple(r.delivered)))
            else:
                lost.append(request_id)
        for w in workers:
            self.load.pop(w, None)
            self._count.pop(w, None)
        return continuations, lost
