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

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.model_runner import ModelRunner, plan_cache
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from engine.stop_checker import StopChecker
from engine.token_output import TokenOutput
from model.transformer import GptOssForCausalLM

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Knobs of one replica; the scheduler and cache configs are derived from these and the model."""
    max_num_seqs: int = 64                  # concurrent sequences (the decode batch)
    max_num_batched_tokens: int = 512       # tokens per step: decodes + prefill chunks
    max_model_len: int = 4096               # prompt + output; capped by the model's max_position_embeddings
    block_size: int = 16
    kv_cache_bytes: int = 64 << 20          # KV memory for both pools (profiling GPU memory comes later)
    enable_prefix_caching: bool = False
    enable_chunked_prefill: bool = True
    seed: int | None = None                 # seeds the shared generator of unseeded requests
    cuda_graphs: bool = True                # decode steps as CUDA graphs (CUDA only; off for expert parallelism)


class LLMEngine:
    def __init__(self, model: GptOssForCausalLM, config: EngineConfig = EngineConfig(),
                 eos_token_ids: Iterable[int] = (), detokenize: Callable[[list[int]], str] | None = None):
        self.model = model
        self.config = config
        device = next(model.parameters()).device
        max_model_len = min(config.max_model_len, model.config.max_position_embeddings)
        sched = SchedulerConfig(max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                                enable_chunked_prefill=config.enable_chunked_prefill, max_model_len=max_model_len)
        cache = plan_cache(model.config, config.kv_cache_bytes, config.block_size, config.max_num_seqs,
                           sched.max_chunk_tokens, model.dtype, config.enable_prefix_caching)
        self.block_manager = BlockManager(cache)
        self.scheduler = Scheduler(sched, self.block_manager, StopChecker(max_model_len, eos_token_ids, detokenize))
        self.runner = ModelRunner(model, cache, device, config.max_num_seqs, max_model_len, config.cuda_graphs)
        self.sampler = Sampler(config.seed)
        self._seq_ids = itertools.count()
        self._index: dict[int, int] = {}                       # seq_id -> index within its request
        self._streams: dict[str, asyncio.Queue] = {}
        self._loop_task: asyncio.Task | None = None
        logger.info("KV cache: %d full + %d sliding blocks of %d tokens", cache.num_full_blocks,
                    cache.num_sliding_blocks, cache.block_size)

    # ---- requests ----
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Queue n sequences under `request_id`; raises ValueError for a request that can never be served."""
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"request {request_id!r}: token id {bad[0]} is out of range [0, {vocab})")
        for i in range(params.n):
            # n > 1 with a seed: each completion gets its own seed, or all n would be identical.
            p = params if params.seed is None or i == 0 else dataclasses.replace(params, seed=params.seed + i)
            seq = Sequence(next(self._seq_ids), request_id, prompt_token_ids, p)
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
        sampled = self.sampler(logits, [r.seq.params for r in rows], [r.seq.num_output_tokens for r in rows])
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
                           num_output_tokens=seq.num_output_tokens)

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
    async def stream(self, request_id: str, prompt_token_ids: list[int],
                     params: SamplingParams) -> AsyncIterator[TokenOutput]:
        """Yield each TokenOutput of the request as it is produced. Leaving early (a client disconnect, a
        cancelled task) aborts the request, which frees its KV blocks at once."""
        queue: asyncio.Queue = asyncio.Queue()
        self.add_request(request_id, prompt_token_ids, params)     # raises before anything is registered
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
    if seq.first_scheduled_time is None or not new or seq.num_output_tokens != 1:
        return None
    return seq.first_scheduled_time - seq.arrival_time
