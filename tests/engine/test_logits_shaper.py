"""Sampling controls against hand-computed references: presence/frequency penalties over output tokens, the
repetition penalty over prompt and output, logit_bias, min_p, and min_tokens masking stop/end ids (and holding off
stop strings); raw logprobs stay the model's."""
import math

import pytest
import torch

from engine.logits_shaper import LogitsShaper
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from engine.stop_checker import StopChecker

V = 8


def test_penalties_bias_and_min_tokens_match_the_formulas():
    logits = torch.tensor([[1.0, -2.0, 3.0, 0.5, 0.0, 2.0, -1.0, 4.0]] * 4)
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
              SamplingParams(repetition_penalty=2.0),
              SamplingParams(logit_bias={7: -100.0, 1: 5.0}),
              SamplingParams(min_tokens=2, stop_token_ids=(3,), max_tokens=4)]
    histories = [([0], [2, 2, 5]), ([1], [2]), ([0], []), ([0], [4])]
    out = LogitsShaper(eos_token_ids=(7,))(logits, params, [3, 1, 0, 1], histories)
    want = logits.clone()
    want[0, 2] -= 0.5 + 0.25 * 2
    want[0, 5] -= 0.5 + 0.25
    want[1, 1] *= 2.0                     # negative and seen in the prompt: multiplied
    want[1, 2] /= 2.0                     # positive and generated: divided
    want[2, 7] -= 100.0
    want[2, 1] += 5.0
    want[3, 3] = want[3, 7] = -math.inf   # the stop id and the end id, before min_tokens
    torch.testing.assert_close(out, want)
    assert torch.equal(logits[0], torch.tensor([1.0, -2.0, 3.0, 0.5, 0.0, 2.0, -1.0, 4.0]))   # raw untouched


def test_greedy_follows_the_bias_and_logprobs_stay_raw():
    logits = torch.tensor([[0.0, 1.0, 5.0, 0.0]])
    raw = torch.log_softmax(logits, dim=-1)
    out = Sampler(0)(logits, [SamplingParams(temperature=0, logit_bias={2: -100.0}, logprobs=0)], [0], [([1], [])])
    assert out.token_ids == [1]
    assert out.logprobs[0] == pytest.approx(raw[0, 1].item())


def test_min_p_keeps_only_tokens_near_the_top():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(400, 1)
    params = [SamplingParams(temperature=1.0, min_p=0.5, seed=i) for i in range(400)]
    tokens = Sampler(0)(logits, params, [0] * 400).token_ids
    assert set(tokens) == {0, 1}                       # 0.15 < 0.5 * 0.5: never drawn
    assert 0.5 < tokens.count(0) / 400 < 0.75          # 0.5 / 0.8 = 0.625 after renormalising


def test_min_tokens_holds_off_stop_ids_and_strings():
    checker = StopChecker(100, eos_token_ids=(9,), detokenize=lambda ids: "".join(chr(97 + i) for i in ids))
    seq = Sequence(0, "r", [1], SamplingParams(min_tokens=3, max_tokens=10, stop=("b",), stop_token_ids=(5,)))
    for token in (9, 1):                                # the end id, then "b": within min_tokens
        seq.append_token(token)
        assert not checker.check(seq)
    seq.append_token(1)                                 # the 3rd token: a new "b" ends it, the first one never
    assert checker.check(seq) and seq.stop_reason == "b" and seq.output_text == "jb"


@pytest.mark.parametrize("bad", [dict(presence_penalty=2.5), dict(repetition_penalty=0.0), dict(min_p=1.5),
                                 dict(logit_bias={1: 101.0}), dict(min_tokens=20, max_tokens=10)])
def test_out_of_range_controls_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
