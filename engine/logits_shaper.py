"""LogitsShaper: what a request's sampling controls do to its logits before sampling: presence and frequency
penalties (OpenAI), repetition penalty (vLLM/CTRL), logit_bias, and min_tokens (stop and end ids masked).

Batched over the rows that ask for any of it; index tensors are built on the host from token ids the host already
has and copied once (no read-back). The raw logits stay untouched: reported logprobs are the model's.
Legend: B = rows, R = rows with controls, V = vocabulary, N = (row, token) index pairs.
"""
from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from engine.sampling_params import SamplingParams


def _pairs(rows: list[int], id_lists: list[Seq[int]], num_vocab: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token id) index tensors [N] for every id of every row's list (ids outside the vocabulary dropped)."""
    r = [row for row, ids in zip(rows, id_lists) for t in ids if 0 <= t < num_vocab]
    t = [t for ids in id_lists for t in ids if 0 <= t < num_vocab]
    as_tensor = lambda v: torch.tensor(v, dtype=torch.long).to(device, non_blocking=True)  # noqa: E731
    return as_tensor(r), as_tensor(t)


class LogitsShaper:
    def __init__(self, eos_token_ids: Seq[int] = ()):
        self.eos_token_ids = tuple(eos_token_ids)

    def __call__(self, logits: torch.Tensor, params: Seq[SamplingParams], num_outputs: list[int],
                 histories: Seq[tuple[Seq[int], Seq[int]]] | None) -> torch.Tensor:
        """logits [B, V] (float32) -> a shaped copy; rows without controls are unchanged."""
        device, (B, V) = logits.device, logits.shape
        rows = [i for i, p in enumerate(params) if p.has_controls]
        out = logits.clone()
        penalized = [i for i in rows if params[i].presence_penalty or params[i].frequency_penalty
                     or params[i].repetition_penalty != 1.0]
        if penalized:
            if histories is None:
                raise ValueError("penalties need each row's (prompt ids, output ids)")
            self._penalize(out, [params[i] for i in penalized], penalized, [histories[i] for i in penalized])
        bias = [i for i in rows if params[i].logit_bias]
        if bias:
            r, t = _pairs(bias, [[t for t, _ in params[i].logit_bias] for i in bias], V, device)
            values = [b for i in bias for t, b in params[i].logit_bias if 0 <= t < V]
            out.index_put_((r, t), torch.tensor(values, dtype=out.dtype).to(device), accumulate=True)
        early = [i for i in rows if num_outputs[i] < params[i].min_tokens]
        if early:
            stops = [params[i].stop_token_ids + (() if params[i].ignore_eos else self.eos_token_ids) for i in early]
            r, t = _pairs(early, stops, V, device)
            out.index_put_((r, t), torch.tensor(float("-inf"), device=device))
        return out

    @staticmethod
    def _penalize(out: torch.Tensor, params: list[SamplingParams], rows: list[int],
                  histories: list[tuple[Seq[int], Seq[int]]]) -> None:
        device, V = out.device, out.shape[1]
        index = torch.tensor(rows, dtype=torch.long).to(device)                                  # [R]
        local = list(range(len(rows)))
        counts = torch.zeros(len(rows), V, device=device)                                        # [R, V]
        r, t = _pairs(local, [h[1] for h in histories], V, device)
        counts.index_put_((r, t), torch.ones(r.shape, device=device), accumulate=True)
        as_col = lambda name: torch.tensor([getattr(p, name) for p in params]).to(device)[:, None]  # noqa: E731
        sub = out[index]                                                                         # [R, V]
        sub -= as_col("frequency_penalty") * counts + as_col("presence_penalty") * (counts > 0)
        if any(p.repetition_penalty != 1.0 for p in params):
            seen = counts > 0                                                                    # [R, V]
            r, t = _pairs(local, [h[0] for h in histories], V, device)
            seen[r, t] = True
            penalty = as_col("repetition_penalty").expand_as(sub)
            sub = torch.where(seen, torch.where(sub > 0, sub / penalty, sub * penalty), sub)
        out[index] = sub
