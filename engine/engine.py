"""LLMEngine: one model replica's state machine. step() = schedule -> run -> sample -> update.

Works in token ids only (tokenizer and harmony live in deploy/) and never imports Ray. `stream()` is the async
per-request view used by servers; `generate()` the synchronous one used by the CLI and tests.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Iterable

import torch

from engine.block_manager import BlockManager
from engine.config import EngineConfig, SchedulerConfig
from engine.kv_budget import gib, plan_kv_budget, profile_cuda_kv_bytes
from engine.model_runner import ModelRunner, profile_forward
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from engine.stop_checker import StopChecker
from engine.token_output import TokenOutput
from model.transformer import GptOssForCausalLM

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, model: GptOssForCausalLM, config: EngineConfig = EngineConfig(),
                 eos_token_ids: Iterable[int] = (), detokenize: Callable[[list[int]], str] | None = None):
        """Sizes the KV cache (engine/kv_budget.py; profiles one peak step on CUDA) and allocates it. Raises
        ValueError when the budget cannot hold it or an explicit max_model_len does not fit (naming what would)."""
        self.model = model
        self.config = config
        eos_token_ids = tuple(eos_token_ids)
        device = next(model.parameters()).device
        self.sampler = Sampler(config.seed, eos_token_ids)
        budget = plan_kv_budget(model.config, model.dtype, config, *self._kv_bytes(device))
        self.max_model_len = budget.max_model_len      # effective prompt + output limit (servers read it)
        sched = SchedulerConfig(max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                                enable_chunked_prefill=config.enable_chunked_prefill, max_model_len=self.max_model_len)
        self.kv_budget = budget
        self.block_manager = BlockManager(budget.cache)
        self.scheduler = Scheduler(sched, self.block_manager,
                                   StopChecker(self.max_model_len, eos_token_ids, detokenize))
        self.runner = ModelRunner(model, budget.cache, device, config.max_num_seqs, self.max_model_len,
                                  config.cuda_graphs)
        self._seq_ids = itertools.count()
        self._index: dict[int, int] = {}                       # seq_id -> index within its request
        self._streams: dict[str, asyncio.Queue] = {}
        self._loop_task: asyncio.Task | None = None
        logger.info("%s", budget.describe())

    def _kv_bytes(self, device: torch.device) -> tuple[int, str]:
        """KV bytes and what set them: kv_cache_bytes, else a CUDA memory profile, else kv_cache_memory (CPU)."""
        c = self.config
        if c.kv_cache_bytes is not None:
            return c.kv_cache_bytes, f"kv_cache_bytes={gib(c.kv_cache_bytes)}"
        if device.type != "cuda":
            return c.kv_cache_memory, f"kv_cache_memory={gib(c.kv_cache_memory)}"
        return profile_cuda_kv_bytes(device, c.gpu_memory_utilization, lambda: self._peak_step(device))

    def _peak_step(self, device: torch.device) -> None:
        """The largest step a config allows: max_num_batched_tokens through the model, max_num_seqs rows sampled with
        top-p (its sort over [rows, V] is the sampler's peak). A throwaway sampler keeps the seeded stream intact."""
        c = self.config
        tokens = min(c.max_num_batched_tokens, c.max_model_len or self.model.config.max_position_embeddings)
        rows = min(c.max_num_seqs, tokens)
        logits = profile_forward(self.model, device, tokens, rows, c.block_size)
        Sampler(0)(logits, [SamplingParams(top_p=0.9, logprobs=1)] * rows, [0] * rows)

    # ---- requests ----
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    resume_output_ids: Iterable[int] = ()) -> None:
        """Queue n sequences under `request_id`; raises ValueError for a request that can never be served.
        `resume_output_ids` (n == 1): output tokens it already produced elsewhere; they are recomputed with the
        prompt, count towards max_tokens, min_tokens and stop strings, and only the tokens after them are emitted."""
        vocab = self.model.config.vocab_size
        resumed = list(resume_output_ids)
        bad = [t for t in [*prompt_token_ids, *resumed] if not 0 <= t < vocab]
        bad += [t for t, _ in params.logit_bias if t >= vocab]
        if bad:
            raise ValueError(f"request {request_id!r}: token id {bad[0]} is out of range [0, {vocab})")
        if resumed and (params.n != 1 or len(resumed) >= params.max_tokens):
            raise ValueError(f"request {request_id!r}: a continuation needs n == 1 and fewer resumed tokens than "
                             f"max_tokens, got n={params.n}, {len(resumed)} of {params.max_tokens}")
        self.sampler.prepare(params, vocab)      # structured output: its grammars compile off the step loop
        for i in range(params.n):
            # n > 1 with a seed: each completion gets its own seed, or all n would be identical.
            p = params if params.seed is None or i == 0 else dataclasses.replace(params, seed=params.seed + i)
            seq = Sequence(next(self._seq_ids), request_id, prompt_token_ids, p, output_token_ids=resumed)
            self.scheduler.add(seq)
            self._index[seq.seq_id] = i

    def abort(self, request_id: str) -> list[TokenOutput]:
        """Finish every sequence of the request and free all its KV blocks now; returns their final outputs."""
        outputs = [self._output(seq, []) for seq in self.scheduler.abort(request_id)]
        for out in outputs:
            self._emit(out)
        return outputs

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one step ----
    def step(self) -> list[TokenOutput]:
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return []
        logits = self.runner.run(batch)                                            # [R, V]
        rows = batch.sampling_seqs
        params = [r.seq.params for r in rows]
        histories = ([(r.seq.prompt_token_ids, r.seq.output_token_ids) for r in rows]
                     if any(p.shapes_logits for p in params) else None)
        sampled = self.sampler(logits, params, [r.seq.num_output_tokens for r in rows], histories)
        row_of = {r.seq.seq_id: i for i, r in enumerate(rows)}
        outputs = []
        for seq in self.scheduler.update(batch, sampled.token_ids):
            i = row_of[seq.seq_id]
            lp = [sampled.logprobs[i]] if sampled.logprobs[i] is not None else []
            top = [sampled.top_logprobs[i]] if sampled.top_logprobs[i] is not None else []
            outputs.append(self._output(seq, [sampled.token_ids[i]], lp, top))
        for out in outputs:
            self._emit(out)
        return outputs

    def _output(self, seq: Sequence, new: list[int], logprobs=(), top=()) -> TokenOutput:
        index = self._index.pop(seq.seq_id) if seq.is_finished else self._index[seq.seq_id]
        done = seq.is_finished                  # the whole output travels once, with the final TokenOutput
        return TokenOutput(request_id=seq.request_id, index=index, new_token_ids=new,
                           output_token_ids=list(seq.output_token_ids) if done else [],
                           num_prompt_tokens=seq.num_prompt_tokens, finished=done, finish_reason=seq.finish_reason,
                           stop_reason=seq.stop_reason, output_text=getattr(seq, "output_text", None) if done else None,
                           logprobs=list(logprobs), top_logprobs=list(top), queue_time_s=_queue_time(seq, new),
                           num_output_tokens=seq.num_output_tokens, num_cached_tokens=seq.num_cached_tokens)

    # ---- synchronous driver ----
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
                 ) -> list[list[TokenOutput]]:
        """Run prompts concurrently to completion; per prompt, the final TokenOutput of each of its n sequences."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"gen-{next(self._seq_ids)}" for _ in prompts]
        for rid, prompt, p in zip(ids, prompts, params):
            self.add_request(rid, prompt, p)
        final: dict[tuple[str, int], TokenOutput] = {}
        while self.has_unfinished():
            for out in self.step():
                if out.finished:
                    final[(out.request_id, out.index)] = out
        return [[final[(rid, i)] for i in range(p.n)] for rid, p in zip(ids, params)]

    # ---- asynchronous driver ----
    async def stream(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                     resume_output_ids: Iterable[int] = ()) -> AsyncIterator[TokenOutput]:
        """Yield each TokenOutput of the request as it is produced. Leaving early (a client disconnect, a
        cancelled task) aborts the request, which frees its KV blocks at once."""
        queue: asyncio.Queue = asyncio.Queue()
        self.add_request(request_id, prompt_token_ids, params, resume_output_ids)   # raises before registering
        self._streams[request_id] = queue
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run_loop())
        remaining = params.n
        try:
            while remaining:
                out = await queue.get()
                remaining -= out.finished
                yield out
        finally:
            self._streams.pop(request_id, None)
            if remaining:
                self.abort(request_id)

    async def _run_loop(self) -> None:
        while self.has_unfinished():
            self.step()
            await asyncio.sleep(0)                      # let streams consume and new requests arrive

    def _emit(self, out: TokenOutput) -> None:
        queue = self._streams.get(out.request_id)
        if queue is not None:
            queue.put_nowait(out)


def _queue_time(seq: Sequence, new: list[int]) -> float | None:
    """Arrival -> first scheduled, reported once: with the request's first generated token."""
    if seq.first_scheduled_time is None or not new or seq.num_output_tokens != seq.num_resumed_tokens + 1:
        return None
    return seq.first_scheduled_time - seq.arrival_time
