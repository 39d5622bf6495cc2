"""SamplingParams validation: defaults, conventions and actionable error messages."""
import pytest

from engine.sampling_params import SamplingParams


def test_defaults_and_conventions():
    params = SamplingParams()
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens, params.n) == (1.0, 1.0, 0, 16, 1)
    assert params.seed is None and params.logprobs is None and not params.greedy
    assert SamplingParams(temperature=0.0).greedy and SamplingParams(temperature=1e-6).greedy
    listy = SamplingParams(stop=["a", "b"], stop_token_ids=[3])
    assert listy.stop == ("a", "b") and listy.stop_token_ids == (3,)
    assert SamplingParams(stop="x").stop == ("x",)
    hash(listy)  # frozen and hashable


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1.0}, "temperature must be non-negative, got -1.0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
    ({"top_k": -1}, "top_k must be 0 \\(disable\\) or at least 1, got -1"),
    ({"max_tokens": 0}, "max_tokens must be at least 1, got 0"),
    ({"logprobs": 21}, r"logprobs must be in \[0, 20\] or None, got 21"),
    ({"logprobs": -1}, r"logprobs must be in \[0, 20\] or None, got -1"),
    ({"n": 0}, "n must be at least 1, got 0"),
    ({"seed": 1.5}, "seed must be an integer or None"),
    ({"stop_token_ids": (-3,)}, "stop_token_ids must be non-negative integers"),
    ({"stop": ("",)}, "stop strings must be non-empty"),
])
def test_invalid_values_raise_actionable_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
