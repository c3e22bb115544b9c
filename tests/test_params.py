"""Bad generation parameters fail with clear messages before any compute."""

from __future__ import annotations

import pytest

from livepp import GenerationParams, LiveppError


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(temperature=-0.1), "temperature must be a number >= 0"),
        (dict(top_p=0.0), "top_p must be in (0, 1]"),
        (dict(top_p=1.5), "top_p must be in (0, 1]"),
        (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
        (dict(max_new_tokens=2.5), "max_new_tokens must be an integer >= 1"),
        (dict(top_k=-1), "top_k must be an integer >= 0"),
        (dict(min_p=1.0), "min_p must be in [0, 1)"),
        (dict(seed=-3), "seed must be a non-negative integer"),
        (dict(stop=("",)), "stop must be a list of non-empty strings"),
        (dict(top_logprobs=-1), "top_logprobs must be an integer in [0, 100]"),
        (dict(temperature=float("nan")), "temperature must be a number >= 0"),
    ],
)
def test_bad_params_give_clear_errors(kwargs, message):
    with pytest.raises(LiveppError) as info:
        GenerationParams(**kwargs)
    assert message in str(info.value)


def test_from_dict_accepts_json_shapes_and_rejects_unknown_names():
    p = GenerationParams.from_dict({"temperature": 1, "stop": "END", "max_new_tokens": 3})
    assert p.temperature == 1.0 and p.stop == ("END",) and p.max_new_tokens == 3
    with pytest.raises(LiveppError, match="unknown parameter"):
        GenerationParams.from_dict({"temprature": 1})
    with pytest.raises(LiveppError, match="max_new_tokens"):
        GenerationParams.from_dict({"max_new_tokens": "3"})
    assert GenerationParams.from_dict(p.to_dict()) == p
