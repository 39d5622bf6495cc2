"""Turns a batch of next-token logits into token ids and logprobs: penalties and bias (engine/logits_shaper.py),
structured output masks (engine/grammar_rows.py), greedy, temperature, top-k, top-p, min-p, seeds.

Owns the randomness of generation; it knows nothing of sequences, stop rules or the model. Runs on
whatever device the logits are on, with no host synchronisation before the final .tolist().
"""
from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from engine.grammar_rows import GrammarRows
from engine.logits_shaper import LogitsShaper
from engine.sampling_params import SamplingParams

# Shape legend: B = sampling rows, V = vocabulary, S = unseeded rows, R = rows asking for logprobs,
# K = top logprobs.

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def row_seed(seed: int, token_index: int) -> int:
    """Generator seed for the token_index-th output token of a request seeded with `seed` (63-bit)."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ token_index) >> 1


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Per-row parameters to the logits' device; through pinned memory on CUDA so the copy does not block."""
    tensor = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: list[int]                                  # [B]
    logprobs: list[float | None]                          # [B] raw logprob of the sampled token, None if not asked
    top_logprobs: list[list[tuple[int, float]] | None]    # [B] the params.logprobs best (id, logprob), best first


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set logits outside each row's top-k, then outside its nucleus, to -inf. One sort for the batch.

    top_k [B] (V = off), top_p [B] (1.0 = off). Top-p runs on the top-k renormalised distribution (as vLLM)
    and keeps a token iff the mass ranked strictly above it is < top_p, so the best token always stays.
    """
    num_vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)               # [B, V], [B, V]
    ranks = torch.arange(num_vocab, device=logits.device)                      # [V]
    sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)                                      # [B, V]
    mass_above = probs.cumsum(dim=-1) - probs                                  # [B, V]
    drop = (mass_above >= top_p[:, None]) & (top_p[:, None] < 1.0)             # [B, V]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


class Sampler:
    """Samples one token per row of logits [B, V] under each row's SamplingParams.

    Greedy rows (temperature < 1e-5) take the argmax of the raw logits. Other rows: logits / temperature,
    top-k, top-p, then the "exponential race": argmax(probs / q) with q ~ Exp(1) i.i.d. per token, which
    draws exactly from probs and keeps the whole batch in one argmax. A row with a seed draws its q from a
    generator seeded by (seed, token index), so its tokens do not depend on the batch around it nor on
    preemption; rows without one share the sampler's generator (seeded by `seed` for reproducible runs).
    """

    def __init__(self, seed: int | None = None, eos_token_ids: Seq[int] = ()) -> None:
        self.seed = seed
        self.eos_token_ids = tuple(eos_token_ids)       # masked with the stop ids while min_tokens is not reached
        self._shared: dict[torch.device, torch.Generator] = {}
        self._per_row: dict[torch.device, torch.Generator] = {}
        self.grammars = GrammarRows()

    def prepare(self, params: SamplingParams, vocab_size: int) -> None:
        """When a request arrives: start compiling its structured output's grammars off the step loop; raises
        ValueError for one this process cannot serve."""
        if params.structured is not None:
            self.grammars.prepare(params.structured, vocab_size)

    def __call__(self, logits: torch.Tensor, params: Seq[SamplingParams],
                 token_indices: Seq[int] | None = None,
                 histories: Seq[tuple[Seq[int], Seq[int]]] | None = None) -> SamplerOutput:
        """logits [B, V]; params[i] and token_indices[i] (the row's number of output tokens so far, default 0);
        histories[i] = (prompt ids, output ids), needed only by rows whose params shape the logits (penalties,
        structured output: the output list itself, which the engine appends the sampled token to)."""
        if logits.dim() != 2 or logits.shape[0] != len(params):
            raise ValueError(f"expected logits [B, V] with B = {len(params)} rows, got {tuple(logits.shape)}")
        indices = list(token_indices) if token_indices is not None else [0] * len(params)
        logits = logits.float()                                                # [B, V]
        shaped = logits
        if any(p.has_controls for p in params):
            shaped = LogitsShaper(self.eos_token_ids)(logits, params, indices, histories)
        constrained = []
        if any(p.structured is not None for p in params):
            shaped, constrained = self.grammars.mask(shaped, logits, params, indices, histories)
        token_ids = self._sample(shaped, params, indices)                      # [B]
        logprobs, top_logprobs = self._logprobs(logits, params, token_ids)
        ids = token_ids.tolist()
        self.grammars.advance(constrained, ids)
        return SamplerOutput(token_ids=ids, logprobs=logprobs, top_logprobs=top_logprobs)

    def _sample(self, logits: torch.Tensor, params: Seq[SamplingParams], indices: list[int]) -> torch.Tensor:
        device, num_vocab = logits.device, logits.shape[-1]
        greedy = [p.greedy for p in params]
        argmax = logits.argmax(dim=-1)                                         # [B]
        if all(greedy):
            return argmax
        temperature = _to_device([1.0 if g else p.temperature for g, p in zip(greedy, params)],
                                 torch.float32, device)                        # [B]
        scaled = logits / temperature[:, None]                                 # [B, V]
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            top_k = _to_device([p.top_k if p.top_k > 0 else num_vocab for p in params], torch.long, device)
            top_p = _to_device([p.top_p for p in params], torch.float32, device)
            scaled = apply_top_k_top_p(scaled, top_k, top_p)
        probs = scaled.softmax(dim=-1)                                         # [B, V]
        if any(p.min_p > 0 for p in params):
            min_p = _to_device([p.min_p for p in params], torch.float32, device)            # [B]
            keep = probs >= min_p[:, None] * probs.max(dim=-1, keepdim=True).values          # [B, V]
            probs = (probs * keep).div_((probs * keep).sum(dim=-1, keepdim=True))
        noise = self._exponential_noise(params, indices, greedy, probs.shape, device)   # [B, V]
        sampled = (probs / noise).argmax(dim=-1)                               # [B]
        return torch.where(_to_device(greedy, torch.bool, device), argmax, sampled)

    def _exponential_noise(self, params: Seq[SamplingParams], indices: list[int], greedy: list[bool],
                           shape: torch.Size, device: torch.device) -> torch.Tensor:
        noise = torch.ones(shape, device=device)                               # [B, V]; greedy rows unused
        shared_rows = [i for i, p in enumerate(params) if p.seed is None and not greedy[i]]
        if len(shared_rows) == len(params):
            noise.exponential_(generator=self._shared_generator(device))
        elif shared_rows:
            draws = torch.empty((len(shared_rows), shape[1]), device=device)  # [S, V]
            noise[_to_device(shared_rows, torch.long, device)] = draws.exponential_(
                generator=self._shared_generator(device))
        if device not in self._per_row:
            self._per_row[device] = torch.Generator(device=device)
        generator = self._per_row[device]
        for i, p in enumerate(params):  # loop over seeded rows only, never over the vocabulary
            if p.seed is not None and not greedy[i]:
                generator.manual_seed(row_seed(p.seed, indices[i]))
                noise[i].exponential_(generator=generator)
        # A draw of exactly 0 is possible in float32; keep the division finite.
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        if device not in self._shared:
            generator = torch.Generator(device=device)
            if self.seed is None:
                generator.seed()
            else:
                generator.manual_seed(self.seed)
            self._shared[device] = generator
        return self._shared[device]

    @staticmethod
    def _logprobs(logits: torch.Tensor, params: Seq[SamplingParams], token_ids: torch.Tensor
                  ) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
        """Raw logprobs (log-softmax of the unmodified logits) for rows with params.logprobs set."""
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        logprobs: list[float | None] = [None] * len(params)
        top: list[list[tuple[int, float]] | None] = [None] * len(params)
        if not rows:
            return logprobs, top
        row_index = _to_device(rows, torch.long, logits.device)               # [R]
        lp = torch.log_softmax(logits[row_index], dim=-1)                      # [R, V]
        chosen = lp.gather(-1, token_ids[row_index][:, None]).squeeze(-1)     # [R]
        k = min(max(params[i].logprobs or 0 for i in rows), lp.shape[-1])
        top_lp, top_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())   # [R, K] best first
        for i, value, ids, values in zip(rows, chosen.tolist(), top_ids.tolist(), top_lp.tolist()):
            logprobs[i] = value
            top[i] = list(zip(ids, values))[: params[i].logprobs]
        return logprobs, top
