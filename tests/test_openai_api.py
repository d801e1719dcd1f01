"""The OpenAI request bodies: each bounded field passes just inside its range and gets a 400 naming it just outside;
token-id prompts are taken in every shape OpenAI allows for one prompt. No server (tests/test_serve.py runs one)."""

from __future__ import annotations

import pytest

from raytp.runtime.requests import STOP_MAX_CHARS, STOP_MAX_COUNT
from raytp.runtime.sampling import SamplingParams
from raytp.serving.openai_api import APIError, parse_completion
from tests.test_requests import SAMPLING_BOUNDS

PROMPT = {"model": "m", "prompt": "x"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
BODY_BOUNDS = [
    *SAMPLING_BOUNDS,
    ("stop", ["x"] * STOP_MAX_COUNT, ["x"] * (STOP_MAX_COUNT + 1)),
    ("stop", "x" * STOP_MAX_CHARS, "x" * (STOP_MAX_CHARS + 1)),
    ("n", 1, 2), ("best_of", 1, 2), ("max_tokens", 1, True), ("temperature", 1, "1"), ("top_k", 5, 5.0),
    ("seed", 7, 7.5), ("stream", False, 0),
]


def parse(body, chat=False):
    return parse_completion(body, chat=chat, model_id="m")


@pytest.mark.parametrize("field, inside, outside", BODY_BOUNDS)
def test_bounds_beside_the_fields(field, inside, outside):
    req = parse({**PROMPT, field: inside})
    req.sampling()  # the API's bounds are SamplingParams' bounds: what passes one passes the other
    with pytest.raises(APIError) as e:
        parse({**PROMPT, field: outside})
    assert (e.value.status, e.value.param) == (400, field)
    assert field in e.value.message
    assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}


def test_max_completion_tokens_is_chat_max_tokens():
    assert parse({**CHAT, "max_completion_tokens": 3}, chat=True).sampling().max_tokens == 3
    with pytest.raises(APIError) as e:
        parse({**CHAT, "max_completion_tokens": 0}, chat=True)
    assert e.value.param == "max_completion_tokens"


def test_null_means_the_default():
    req = parse({**PROMPT, "temperature": None, "stop": None, "max_tokens": None, "seed": None})
    assert (req.temperature, req.stop, req.max_tokens) == (1.0, [], None)


@pytest.mark.parametrize("prompt, want", [("hi", "hi"), ([1, 2], [1, 2]), (["hi"], "hi"), ([[1, 2]], [1, 2])])
def test_prompt_shapes(prompt, want):
    assert parse({"model": "m", "prompt": prompt}).prompt == want


@pytest.mark.parametrize("prompt", [["a", "b"], [[1], [2]], [], [1, "a"], [1, True], [1.5], 3, None, [[]]])
def test_prompt_shapes_refused(prompt):
    with pytest.raises(APIError) as e:
        parse({"model": "m", "prompt": prompt})
    assert (e.value.status, e.value.param) == (400, "prompt")


def test_unknown_model_is_404_and_missing_model_400():
    with pytest.raises(APIError) as e:
        parse({**PROMPT, "model": "gpt-4"})
    assert (e.value.status, e.value.code, e.value.param) == (404, "model_not_found", "model")
    with pytest.raises(APIError) as e:
        parse({"prompt": "x"})
    assert (e.value.status, e.value.param) == (400, "model")


def test_sampling_defaults_follow_openai():
    params = parse({**PROMPT, "seed": 1}).sampling()
    assert params == SamplingParams(temperature=1.0, seed=1)
