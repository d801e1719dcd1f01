"""The bounds every request meets before it reaches a rank: SamplingParams' own, and check_request's, which need the
model (vocabulary, context). The API's pydantic models declare the same bounds (tests/test_openai_api.py)."""

from __future__ import annotations

import pytest

from raytp.runtime.errors import RequestError
from raytp.runtime.requests import STOP_MAX_CHARS, STOP_MAX_COUNT, check_request
from raytp.runtime.sampling import REPETITION_PENALTY_MAX, SEED_MAX, SEED_MIN, TEMPERATURE_MAX, SamplingParams

# (field, a value just inside its range, one just outside): shared with tests/test_openai_api.py
SAMPLING_BOUNDS = [
    ("temperature", 0.0, -1e-9), ("temperature", TEMPERATURE_MAX, TEMPERATURE_MAX + 1e-9),
    ("temperature", TEMPERATURE_MAX, 1e308), ("temperature", TEMPERATURE_MAX, float("inf")),
    ("temperature", TEMPERATURE_MAX, float("nan")),
    ("top_p", 1e-9, 0.0), ("top_p", 1.0, 1.0 + 1e-9), ("top_p", 1.0, float("nan")),
    ("top_k", -1, -2),
    ("repetition_penalty", 1e-9, 0.0), ("repetition_penalty", REPETITION_PENALTY_MAX, REPETITION_PENALTY_MAX + 1e-6),
    ("repetition_penalty", REPETITION_PENALTY_MAX, float("inf")),
    ("seed", SEED_MIN, SEED_MIN - 1), ("seed", SEED_MAX, SEED_MAX + 1),
    ("max_tokens", 1, 0),
]
VOCAB, CONTEXT = 100, 16


@pytest.mark.parametrize("field, inside, outside", SAMPLING_BOUNDS)
def test_sampling_params_bounds(field, inside, outside):
    SamplingParams(**{field: inside})
    with pytest.raises(RequestError, match=field) as e:
        SamplingParams(**{field: outside})
    assert e.value.param == field


def test_top_k_minus_one_is_off_as_in_vllm():
    assert SamplingParams(top_k=-1) == SamplingParams(top_k=0)


def check(prompt=(1, 2, 3), stop=(), **params):
    check_request(list(prompt), SamplingParams(**params), list(stop), VOCAB, CONTEXT)


@pytest.mark.parametrize("inside, outside, param, numbers", [
    (dict(top_k=VOCAB), dict(top_k=VOCAB + 1), "top_k", [str(VOCAB), str(VOCAB + 1)]),
    (dict(top_k=VOCAB), dict(top_k=10**12), "top_k", [str(VOCAB), str(10**12)]),
    (dict(prompt=[0, VOCAB - 1]), dict(prompt=[0, VOCAB]), "prompt", [str(VOCAB)]),
    (dict(prompt=[1]), dict(prompt=[-1]), "prompt", ["-1"]),
    (dict(prompt=[1]), dict(prompt=[]), "prompt", []),
    (dict(prompt=[1] * (CONTEXT - 1)), dict(prompt=[1] * CONTEXT), "prompt", [str(CONTEXT)]),
    # prompt + max_tokens may fill the context exactly
    (dict(max_tokens=CONTEXT - 3), dict(max_tokens=CONTEXT - 2), "max_tokens", [str(CONTEXT), "3", str(CONTEXT - 3)]),
    (dict(stop=["x"] * STOP_MAX_COUNT), dict(stop=["x"] * (STOP_MAX_COUNT + 1)), "stop", [str(STOP_MAX_COUNT)]),
    (dict(stop=["x" * STOP_MAX_CHARS]), dict(stop=["x" * (STOP_MAX_CHARS + 1)]), "stop", [str(STOP_MAX_CHARS)]),
])
def test_check_request_bounds_that_need_the_model(inside, outside, param, numbers):
    check(**inside)
    with pytest.raises(RequestError) as e:
        check(**outside)
    assert e.value.param == param
    assert all(n in str(e.value) for n in numbers), str(e.value)


def test_context_errors_carry_openai_code():
    with pytest.raises(RequestError) as e:
        check(max_tokens=CONTEXT)
    assert e.value.code == "context_length_exceeded"
