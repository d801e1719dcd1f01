"""tool_choice "auto" through `raytp serve` with the official openai client: SmolLM2's weights served with Qwen2.5's
chat template (tests/data/chat_templates; both speak ChatML with the same control tokens), so the model is told
of the tools and shown earlier calls in Qwen's syntax, and decides by itself (greedy, nothing constrains it).

The reference for each answer is the model's raw text for the same prompt rendered by transformers (through
/v1/completions): a call the server returns must be what Qwen2.5's template writes for it, to the character, and
an answer that holds no well-formed call of an offered tool must come back as that raw text. Streamed and whole."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
import transformers

from tests.util import serve_process

pytestmark = pytest.mark.slow

TEMPLATE = Path(__file__).parent / "data" / "chat_templates" / "Qwen-Qwen2.5-7B-Instruct.jinja"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time in a zone",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}


def _turns() -> list[dict]:
    """Earlier turns in which the assistant called get_weather, got the result and answered (what an agent sends
    back): a 135M model then calls by itself when asked again."""
    messages = []
    for i, (city, weather) in enumerate([("Paris", "sunny"), ("Berlin", "rainy"), ("Madrid", "hot")]):
        call = {"id": f"call_{i}", "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}
        messages += [{"role": "user", "content": f"What is the weather in {city}?"},
                     {"role": "assistant", "content": None, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": f"call_{i}", "content": weather},
                     {"role": "assistant", "content": f"It is {weather} in {city}."}]
    return messages + [{"role": "user", "content": "What is the weather in Rome?"}]


CALLING = _turns()


@pytest.fixture(scope="module")
def model_dir(smollm2_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("smollm2-qwen-template")
    for f in smollm2_dir.iterdir():
        if f.name != "chat_template.jinja":  # never written through a link into the pulled model
            (folder / f.name).symlink_to(f)
    (folder / "chat_template.jinja").write_text(TEMPLATE.read_text())  # read before tokenizer_config.json's
    return folder


@pytest.fixture(scope="module")
def server(ray_head, model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with serve_process(log, "--model", str(model_dir), "--devices", "cpu", "--address", ray_head.address) as (_, url):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def hf(model_dir):
    return transformers.AutoTokenizer.from_pretrained(model_dir)


def as_template_input(messages: list[dict]) -> list[dict]:
    """transformers' convention: a call's arguments as an object."""
    return [m | ({"tool_calls": [c | {"function": c["function"] | {"arguments": json.loads(c["function"]["arguments"])}}
                                 for c in m["tool_calls"]]} if m.get("tool_calls") else {}) for m in messages]


def render(hf, messages: list[dict], tools: list[dict] | None, answer: bool = False) -> str:
    return hf.apply_chat_template(as_template_input(messages), tools=tools, tokenize=False,
                                  add_generation_prompt=not answer)


def raw_answer(server: str, model: str, prompt: str, max_tokens: int) -> tuple[str, str]:
    """(text, finish_reason) of the model's greedy continuation of `prompt`, as text: no tool parsing."""
    response = httpx.post(f"{server}/v1/completions", json={"model": model, "prompt": prompt, "temperature": 0,
                                                            "max_tokens": max_tokens}, timeout=120)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return choice["text"], choice["finish_reason"]


def asked(client, model: str, messages: list[dict], max_tokens: int, **kw):
    """(the whole answer's choice, the streamed answer as (content, {index: (id, name, arguments)}, finishes))."""
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens, **kw}
    whole = client.chat.completions.create(**body).choices[0]
    content, calls, finishes = "", {}, []
    for chunk in client.chat.completions.create(stream=True, **body):
        for c in chunk.choices:
            content += c.delta.content or ""
            for d in c.delta.tool_calls or ():
                assert d.index not in calls, "a call goes out as one delta"
                calls[d.index] = (d.id, d.function.name, d.function.arguments)
            finishes.append(c.finish_reason)
    return whole, (content, calls, [f for f in finishes if f is not None])


def test_the_model_calls_a_tool_as_its_template_writes_it(server, client, hf, model_dir):
    model, tools = str(model_dir), [WEATHER, TIME]
    text, finish = raw_answer(server, model, render(hf, CALLING, tools), max_tokens=40)
    assert "<tool_call>" in text and finish == "stop", text  # the premise: the model does call
    whole, (content, calls, finishes) = asked(client, model, CALLING, 40, tools=tools)  # tool_choice: "auto"
    assert whole.finish_reason == "tool_calls" and whole.message.content is None
    made = [{"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
            for c in whole.message.tool_calls]
    # the calls, written back by the template, are what the model wrote (its end-of-turn token closes the turn)
    assert render(hf, CALLING + [{"role": "assistant", "content": None, "tool_calls": made}], tools, answer=True) == \
        render(hf, CALLING, tools) + text + "<|im_end|>\n"
    assert content == "" and finishes == ["tool_calls"]
    assert [(n, a) for _, n, a in calls.values()] == [(c.function.name, c.function.arguments)
                                                      for c in whole.message.tool_calls]
    assert all(i.startswith("call_") for i, _, _ in calls.values())


@pytest.mark.parametrize("messages, tools, choice, template_tools, max_tokens", [
    ([{"role": "user", "content": "Hi! How are you today?"}], [WEATHER, TIME], "auto", [WEATHER, TIME], 12),
    (CALLING, [TIME], "auto", [TIME], 40),  # it calls get_weather, which this request does not offer
    (CALLING, [WEATHER, TIME], "none", None, 40),  # "none": the model is not told of the tools; no call is read
], ids=["text", "unknown-function", "tool_choice-none"])
def test_what_is_no_call_of_an_offered_tool_is_text(server, client, hf, model_dir, messages, tools, choice,
                                                     template_tools, max_tokens):
    model = str(model_dir)
    text, finish = raw_answer(server, model, render(hf, messages, template_tools), max_tokens)
    assert ("<tool_call>" in text) == (messages is CALLING), text  # the premise: it wrote a call, or did not
    whole, (content, calls, finishes) = asked(client, model, messages, max_tokens, tools=tools, tool_choice=choice)
    assert (whole.message.content, whole.message.tool_calls, whole.finish_reason) == (text, None, finish)
    assert (content, calls, finishes) == (text, {}, [finish])


def test_tokenize_counts_the_tools_the_template_writes(server, hf, model_dir):
    """A client counting a tool request's prompt (vLLM's /tokenize takes tools too) gets transformers' ids."""
    response = httpx.post(f"{server}/tokenize", json={"model": str(model_dir), "messages": CALLING,
                                                      "tools": [WEATHER, TIME]}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["tokens"] == hf(render(hf, CALLING, [WEATHER, TIME]), add_special_tokens=False)["input_ids"]
