"""The OpenAI request bodies: each bounded field passes just inside its range and gets a 400 naming it just outside;
token-id prompts are taken in every shape OpenAI allows for one prompt; what raytp does not do (tool_choice auto
for a model without a tool-call syntax, suffix, best_of beyond n, response formats other than text and JSON) is
refused naming the field, never ignored. No server (tests/test_serve.py runs one)."""

from __future__ import annotations

import pytest

from raytp.runtime.requests import STOP_MAX_CHARS, STOP_MAX_COUNT
from raytp.runtime.sampling import SamplingParams
from raytp.serving.openai_api import APIError, parse_completion
from raytp.serving.tool_calls import HermesCalls
from raytp.weights.generation_defaults import SamplingDefaults
from tests.test_requests import SAMPLING_BOUNDS

PROMPT = {"model": "m", "prompt": "x"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
BODY_BOUNDS = [
    *SAMPLING_BOUNDS,
    ("stop", ["x"] * STOP_MAX_COUNT, ["x"] * (STOP_MAX_COUNT + 1)),
    ("stop", "x" * STOP_MAX_CHARS, "x" * (STOP_MAX_CHARS + 1)),
    ("n", 2, 0), ("n", 1, True), ("best_of", 1, 2), ("max_tokens", 1, True), ("temperature", 1, "1"),
    ("top_k", 5, 5.0), ("seed", 7, 7.5), ("stream", False, 0), ("logprobs", 20, 21), ("logprobs", 0, -1),
    ("logprobs", 1, True), ("echo", True, 1), ("suffix", "", "x"), ("presence_penalty", 0, 0.5),
    ("frequency_penalty", 0.0, -1.0), ("logit_bias", {}, {"5": 10}),
    ("speculate", "ngram:8", "ngram:9"), ("speculate", "off", "ngram:0"), ("speculate", "ngram", 4),
    ("speculate", "draft:8", "draft:/m/small"),  # the server's draft model only, never one a request names
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
    assert (req.temperature, req.stop, req.max_tokens) == (None, [], None)  # None: the model's default


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


def test_sampling_defaults_are_the_models():
    """What a request omits comes from the model's generation_config.json (tests/test_cli_checks.py reads real
    files), else greedy with every filter off."""
    assert parse({**PROMPT, "seed": 1}).sampling() == SamplingParams(temperature=0.0, seed=1)
    defaults = SamplingDefaults(temperature=0.6, top_p=0.9, top_k=20, repetition_penalty=1.1)
    assert parse({**PROMPT, "seed": 1, "top_p": 0.5}).sampling(defaults) == SamplingParams(
        temperature=0.6, top_p=0.5, top_k=20, repetition_penalty=1.1, seed=1)


CHAT_BOUNDS = [("top_logprobs", 20, 21), ("top_logprobs", 0, -1), ("logprobs", True, 1), ("n", 3, 0),
               ("best_of", None, 4)]


@pytest.mark.parametrize("field, inside, outside", CHAT_BOUNDS)
def test_chat_bounds_beside_the_fields(field, inside, outside):
    req = parse({**CHAT, "logprobs": True, "n": 3, field: inside}, chat=True)
    req.sampling()
    with pytest.raises(APIError) as e:
        parse({**CHAT, "logprobs": True, "n": 3, field: outside}, chat=True)
    assert (e.value.status, e.value.param) == (400, field)
    assert field in e.value.message


TOOLS = [{"type": "function", "function": {"name": "weather", "description": "", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),  # no schema
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "{}"}}}, "response_format"),
    ({"tools": TOOLS}, "tool_choice"),  # tool_choice defaults to "auto" with tools: this model has no call syntax
    ({"tools": TOOLS, "tool_choice": "auto"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),  # no tools
    ({"functions": [{"name": "weather"}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs
    ({"top_logprobs": 2, "logprobs": False}, "top_logprobs"),
    ({"n": 2, "best_of": 3}, "best_of"),
])
def test_unsupported_fields_are_refused_naming_the_field(extra, param):
    with pytest.raises(APIError) as e:
        parse({**CHAT, **extra}, chat=True)
    assert (e.value.status, e.value.param, e.value.code) == (400, param, "unsupported")


def test_what_is_supported_reaches_the_sampling_parameters():
    chat = parse({**CHAT, "logprobs": True, "top_logprobs": 3, "n": 2, "best_of": 2, "seed": 4,
                  "response_format": {"type": "text"}, "tools": TOOLS, "tool_choice": "none"}, chat=True)
    assert (chat.sampling().logprobs, chat.sampling().prompt_logprobs, chat.sampling().n) == (3, None, 2)
    assert parse({**CHAT, "logprobs": True}, chat=True).sampling().logprobs == 0
    assert parse(CHAT, chat=True).sampling().logprobs is None
    text = parse({**PROMPT, "logprobs": 1, "echo": True, "max_tokens": 1}).sampling()  # lm-eval's request
    assert (text.logprobs, text.prompt_logprobs, text.max_tokens) == (1, 1, 1)
    assert parse({**PROMPT, "echo": True}).sampling().prompt_logprobs is None  # echo alone: the text only


def test_json_response_formats_become_grammars():
    assert parse({**CHAT, "response_format": {"type": "text"}}, chat=True).sampling().grammar is None
    assert parse({**CHAT, "response_format": {"type": "json_object"}}, chat=True).sampling().grammar
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    response_format = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    grammar = parse({**PROMPT, "response_format": response_format}).sampling().grammar
    assert '"integer"' in grammar


def test_auto_tool_calls_are_read_in_the_models_syntax():
    for body in ({**CHAT, "tools": TOOLS}, {**CHAT, "tools": TOOLS, "tool_choice": "auto"}):
        req = parse_completion(body, chat=True, model_id="m", tool_syntax=HermesCalls)
        assert req.sampling().grammar is None  # the model decodes freely
        assert req.template_tools() == TOOLS
        assert isinstance(req.call_parser(HermesCalls), HermesCalls)
    none = parse_completion({**CHAT, "tools": TOOLS, "tool_choice": "none"}, chat=True, model_id="m",
                            tool_syntax=HermesCalls)
    assert none.call_parser(HermesCalls) is None and none.template_tools() is None
    with pytest.raises(APIError) as e:
        parse_completion({**CHAT, "tools": TOOLS, "response_format": {"type": "json_object"}}, chat=True,
                         model_id="m", tool_syntax=HermesCalls)
    assert (e.value.status, e.value.param) == (400, "tool_choice")


CALL = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}


def test_tool_results_reach_the_template_as_transformers_takes_them():
    """An agent sends back the assistant's calls (arguments as a JSON string) and the tools' results."""
    messages = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    req = parse({**CHAT, "messages": messages}, chat=True)
    assert [m.as_template_input() for m in req.messages] == [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{**CALL, "function": {"name": "weather",
                                                                                   "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}]


@pytest.mark.parametrize("arguments", ["{", "[1]", '"x"'])
def test_a_calls_arguments_must_be_a_json_object(arguments):
    call = {**CALL, "function": {"name": "weather", "arguments": arguments}}
    with pytest.raises(APIError) as e:
        parse({**CHAT, "messages": [{"role": "assistant", "tool_calls": [call]}]}, chat=True)
    assert (e.value.status, e.value.param) == (400, "messages")
    assert "arguments" in e.value.message and "JSON object" in e.value.message


def test_forced_tool_calls_become_grammars_and_reach_the_template():
    for choice in ("required", {"type": "function", "function": {"name": "weather"}}):
        req = parse({**CHAT, "tools": TOOLS, "tool_choice": choice}, chat=True)
        assert '"weather"' in req.sampling().grammar
        assert req.template_tools() == TOOLS
    assert parse({**CHAT, "tools": TOOLS, "tool_choice": "none"}, chat=True).template_tools() is None
    with pytest.raises(APIError) as e:
        parse({**PROMPT, "tools": TOOLS, "tool_choice": "required"})  # tool calls are chat's
    assert e.value.param == "tool_choice"
