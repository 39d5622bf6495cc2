"""Decode-only timing of one batch of equal-length prompts, in our LLMEngine and in transformers' generate().

Both exclude start-up and prefill and time exactly `steps` decode steps in which all c sequences advance:
- ours: the c requests are added and the engine is stepped until every one has its first token (prefill done,
  chunked or not); the next `steps` engine steps (schedule -> forward -> sample -> update) are timed, each must
  emit one token for every request; then the requests are aborted.
- transformers: one batched generate() call, greedy, max_new_tokens = steps + 1, no padding (equal lengths, an
  all-ones attention mask), EOS disabled; a logits processor stamps the clock after every forward. The time from
  the first stamp (the prefill's forward) to the last spans exactly `steps` decode forwards and the generate()
  bookkeeping between them.
Tokens/s = c * steps / seconds. Each also returns its greedy tokens (first steps + 1 per sequence), so a caller
can check that both did the same work.
"""
from __future__ import annotations

import itertools
import time

import torch

from engine.engine import LLMEngine
from engine.sampling_params import SamplingParams

_request_ids = itertools.count()


def time_ours(engine: LLMEngine, prompts: list[list[int]], steps: int) -> tuple[float, list[list[int]]]:
    """Decode tokens/s of `engine` on `prompts` (c sequences) over `steps` timed steps, and the greedy tokens."""
    ids = [f"bench-{next(_request_ids)}" for _ in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=engine.config.max_model_len, ignore_eos=True)
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, prompt, params)
    started: set[str] = set()
    while len(started) < len(ids):                             # prefill (and early decodes while others prefill)
        started.update(out.request_id for out in engine.step())
    start = time.perf_counter()
    for _ in range(steps):
        outputs = engine.step()
        if len(outputs) != len(ids) or any(out.finished for out in outputs):
            raise RuntimeError(f"a timed decode step advanced {len(outputs)} of {len(ids)} sequences; raise "
                               "max_model_len or the KV cache of the benchmark engine")
    seconds = time.perf_counter() - start
    tokens = {out.request_id: out.output_token_ids for rid in ids for out in engine.abort(rid)}   # final outputs
    return len(ids) * steps / seconds, [tokens[rid][:steps + 1] for rid in ids]


class _ForwardStamps:
    """A transformers logits processor that records when each forward's logits arrive and changes nothing."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def time_transformers(hf_model, prompts: list[list[int]], steps: int) -> tuple[float, list[list[int]]]:
    """Decode tokens/s of transformers' batched generate() on `prompts`, and the greedy tokens."""
    from transformers import LogitsProcessorList
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("transformers is benchmarked without padding: prompts must have equal lengths")
    input_ids = torch.tensor(prompts, device=hf_model.device)                      # [c, P]
    stamps = _ForwardStamps()
    with torch.no_grad():
        out = hf_model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=steps + 1,
                                do_sample=False, eos_token_id=None, pad_token_id=0,
                                logits_processor=LogitsProcessorList([stamps]))     # [c, P + steps + 1]
    if len(stamps.times) != steps + 1 or out.shape[1] != input_ids.shape[1] + steps + 1:
        raise RuntimeError(f"transformers made {len(stamps.times)} forwards, expected {steps + 1}")
    seconds = stamps.times[-1] - stamps.times[0]
    return len(prompts) * steps / seconds, out[:, input_ids.shape[1]:].tolist()
