"""Continuations (resume_output_ids): from any cut point, the resumed request's new tokens, final output and
usage equal an undisturbed run's, greedy and seeded, with penalties, min_tokens and stop strings."""
import asyncio

import pytest

from deploy.backend import LocalBackend
from engine.engine import EngineConfig, LLMEngine
from engine.generate_request import GenerateRequest
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from tests.engine.helpers import make_scheduler, run_until_done

MAX_TOKENS = 12


def letters(token_ids: list[int]) -> str:
    """Fake detokenizer: one letter per token."""
    return "".join(chr(ord("a") + t % 26) for t in token_ids)


@pytest.fixture(scope="module")
def engine(tiny_model):
    return LLMEngine(tiny_model, EngineConfig(max_num_seqs=8, max_num_batched_tokens=128, block_size=4,
                                              max_model_len=256), detokenize=letters)


def run(engine, prompt, params, resume=()):
    """(tokens emitted, their logprobs, final TokenOutput) of one request run alone."""
    engine.add_request("r", prompt, params, resume_output_ids=resume)
    emitted, logprobs, final = [], [], None
    while engine.has_unfinished():
        for out in engine.step():
            emitted += out.new_token_ids
            logprobs += out.logprobs
            final = out if out.finished else final
    return emitted, logprobs, final


PARAMS = {
    "greedy": SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0),
    "seeded": SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=MAX_TOKENS, logprobs=0),
    "seeded_penalties": SamplingParams(temperature=0.8, seed=3, frequency_penalty=1.5, presence_penalty=0.5,
                                       repetition_penalty=1.3, max_tokens=MAX_TOKENS, logprobs=0),
    "min_tokens": SamplingParams(temperature=1.0, seed=11, min_tokens=8, stop_token_ids=tuple(range(0, 1024, 3)),
                                 max_tokens=MAX_TOKENS, logprobs=0),
}


@pytest.mark.parametrize("name", list(PARAMS))
def test_continuation_from_every_cut_equals_the_undisturbed_run(engine, ragged_prompts, name):
    params, prompt = PARAMS[name], ragged_prompts[12]
    tokens, logprobs, final = run(engine, prompt, params)
    assert final.num_output_tokens == len(tokens) and len(tokens) >= 2
    for cut in range(len(tokens)):
        emitted, lps, resumed = run(engine, prompt, params, tokens[:cut])
        assert emitted == tokens[cut:], f"cut {cut}"                  # only new tokens, the same ones
        assert lps == pytest.approx(logprobs[cut:], abs=1e-4)
        assert resumed.output_token_ids == tokens and resumed.num_output_tokens == final.num_output_tokens
        assert (resumed.finish_reason, resumed.stop_reason) == (final.finish_reason, final.stop_reason)
        assert resumed.num_prompt_tokens == len(prompt) and resumed.num_cached_tokens <= len(prompt)


def test_stop_string_straddling_the_cut_is_caught(engine, ragged_prompts):
    prompt = ragged_prompts[15]
    free = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    text = letters(run(engine, prompt, free)[0])
    stop = text[6:9]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, stop=[stop])
    tokens, _, final = run(engine, prompt, params)
    at = text.find(stop)
    assert final.finish_reason == "stop" and final.output_text == text[:at] and len(tokens) == at + len(stop)
    for cut in range(len(tokens)):                   # cuts at at+1 and at+2 split the stop string
        emitted, _, resumed = run(engine, prompt, params, tokens[:cut])
        assert emitted == tokens[cut:] and resumed.output_text == final.output_text
        assert (resumed.finish_reason, resumed.stop_reason) == ("stop", stop)


def test_stop_string_inside_resumed_tokens_before_min_tokens_is_not_matched_again():
    """Undisturbed: 'bc' is generated before min_tokens, passed over, and 'bc' later stops it. A continuation
    cut right after the first 'bc' must pass it over too."""
    model = [1, 2, 4, 4, 4, 1, 2, 5]                 # b c e e e b c f
    finals = []
    for cut in (0, 2, 3, 6):
        sched = make_scheduler(detokenize=letters)
        seq = Sequence(0, "r", [7] * 5, SamplingParams(max_tokens=10, min_tokens=4, stop=["bc"]),
                       output_token_ids=model[:cut])
        sched.add(seq)
        it = iter(model[cut:])
        run_until_done(sched, lambda s: next(it))
        finals.append((seq.output_token_ids, seq.output_text, seq.finish_reason))
    assert finals == [(model[:7], "bceee", "stop")] * 4


def test_max_tokens_counts_the_resumed_tokens(engine, ragged_prompts):
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    emitted, _, final = run(engine, ragged_prompts[3], params, resume=[1, 2, 3])
    assert len(emitted) == 2 and final.num_output_tokens == 5 and final.finish_reason == "length"
    assert final.output_token_ids[:3] == [1, 2, 3]


@pytest.mark.parametrize("params, resume, why", [
    (SamplingParams(max_tokens=3), [1, 2, 3], "fewer resumed tokens than max_tokens"),
    (SamplingParams(max_tokens=8, n=2), [1], "n == 1"),
    (SamplingParams(max_tokens=8), [5000], "out of range"),
])
def test_bad_continuations_are_refused(engine, params, resume, why):
    with pytest.raises(ValueError, match=why):
        engine.add_request("bad", [1, 2, 3], params, resume_output_ids=resume)
    assert not engine.has_unfinished()


def test_a_continuation_past_max_model_len_is_refused(engine):
    with pytest.raises(ValueError, match="200 resumed output tokens"):
        engine.add_request("long", [1] * 56, SamplingParams(max_tokens=300), resume_output_ids=[2] * 200)
    assert not engine.has_unfinished()


def test_local_backend_streams_only_new_tokens(engine, ragged_prompts):
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=8)
    tokens = run(engine, ragged_prompts[7], params)[0]

    async def main():
        request = GenerateRequest("s", ragged_prompts[7], params, resume_output_ids=tuple(tokens[:3]))
        return [out async for out in LocalBackend(engine).stream(request)]
    outs = asyncio.run(main())
    assert [t for o in outs for t in o.new_token_ids] == tokens[3:]
    assert [o.num_output_tokens for o in outs] == list(range(4, len(tokens) + 1))
