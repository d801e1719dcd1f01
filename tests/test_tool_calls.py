"""Tool calls in the model's own syntax (tool_choice "auto"), against the chat templates that define them: Qwen2.5's
and Qwen3's (Hermes <tool_call> blocks) and Llama 3.1's (JSON), as published with the models (tests/data/
chat_templates: llama.cpp's models/templates copies, as vendored in the llama-cpp-python 0.3.16 sdist). What the
template writes for an assistant's calls, rendered by transformers, is what a model trained on it writes: the
parser must give those calls back, streamed or whole, and anything else as text. No server (test_tool_auto.py
runs one)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import transformers

from raytp.serving.openai_api import Piece, _HeldAnswer
from raytp.serving.tool_calls import (
    ForcedCalls,
    HermesCalls,
    Llama3JsonCalls,
    Malformed,
    answer_calls,
    template_syntax,
)
from raytp.weights.tokenizer import StreamDecoder, Tokenizer

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
QWEN25, QWEN3, LLAMA31 = "Qwen-Qwen2.5-7B-Instruct", "Qwen-Qwen3-0.6B", "meta-llama-Llama-3.1-8B-Instruct"
SYNTAX = {QWEN25: HermesCalls, QWEN3: HermesCalls, LLAMA31: Llama3JsonCalls}
END_OF_TURN = {QWEN25: "<|im_end|>", QWEN3: "<|im_end|>", LLAMA31: "<|eot_id|>"}

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time in a zone",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}
NAMES = ["get_weather", "get_time"]
QUESTION = [{"role": "user", "content": "What is the weather in Paris, and the time in Tokyo?"}]
# arguments with what JSON must escape, and text the parser must not mistake for markup
CALLS = [("get_weather", {"city": "Paris \"la ville\" {lumière} <tool_call>"}), ("get_time", {"zone": "Asia/Tokyo"})]


@pytest.fixture(scope="module")
def hf(smollm2_dir):
    """transformers' renderer (the reference); SmolLM2's tokenizer, whose vocabulary does not matter here."""
    return transformers.AutoTokenizer.from_pretrained(smollm2_dir)


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text()


def written_by_template(hf, name: str, calls: list[tuple[str, dict]], content: str = "") -> str:
    """What the template writes as the assistant's turn making `calls` (after its generation prompt, before the
    end of the turn): the text a model trained on it generates."""
    tool_calls = [{"id": f"call_{i}", "type": "function", "function": {"name": n, "arguments": a}}
                  for i, (n, a) in enumerate(calls)]
    render = lambda messages: hf.apply_chat_template(messages, tools=[WEATHER, TIME], chat_template=template(name),
                                                     tokenize=False, add_generation_prompt=messages is QUESTION)
    prompt = render(QUESTION)
    whole = render(QUESTION + [{"role": "assistant", "content": content, "tool_calls": tool_calls}])
    assert whole.startswith(prompt)
    return whole[len(prompt):].split(END_OF_TURN[name])[0]


def without_last_brace(text: str) -> str:
    """A call whose JSON object is not closed."""
    at = text.rindex("}")
    return text[:at] + text[at + 1:]


def called(calls: list[dict]) -> list[tuple[str, dict]]:
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


@pytest.mark.parametrize("name", [QWEN25, QWEN3, LLAMA31, None], ids=["qwen2.5", "qwen3", "llama3.1", "smollm2"])
def test_the_syntax_is_read_off_the_chat_template(smollm2_dir, tmp_path, name):
    """Through raytp's own template rendering (as the driver reads it): SmolLM2's template writes no calls."""
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(smollm2_dir / f, tmp_path / f)
    if name is not None:
        (tmp_path / "chat_template.jinja").write_text(template(name))
    tokenizer = Tokenizer.from_dir(tmp_path)
    want = SYNTAX.get(name)
    assert template_syntax(lambda m: tokenizer.apply_chat_template(m, add_generation_prompt=False)) is want


@pytest.mark.parametrize("name, calls", [(QWEN25, CALLS), (QWEN3, CALLS), (QWEN25, CALLS[:1]),
                                         (LLAMA31, CALLS[:1])], ids=["qwen2.5-two", "qwen3-two", "qwen2.5-one",
                                                                      "llama3.1-one"])
def test_calls_the_template_writes_are_parsed_back(hf, name, calls):
    """Qwen3's template writes an (empty) <think> block before the calls: text, which stays content (raytp has no
    reasoning parser)."""
    text = written_by_template(hf, name, calls)
    content, parsed = answer_calls(SYNTAX[name](NAMES), text, "stop")
    assert called(parsed) == calls
    assert content == (text[:text.index("<tool_call>")].rstrip() if name == QWEN3 else None)


def test_text_before_hermes_calls_is_the_content(hf):
    text = written_by_template(hf, QWEN25, CALLS, content="Let me look that up.")
    content, parsed = answer_calls(HermesCalls(NAMES), text, "stop")
    assert (content, called(parsed)) == ("Let me look that up.", CALLS)


def test_llama_calls_joined_by_semicolons(hf):
    """Llama 3.1's template writes one call per turn; a model asked for several joins them with ';' (vLLM's
    llama3_json reads them so), after the <|python_tag|> some prompts make it write."""
    one, two = (written_by_template(hf, LLAMA31, [c]) for c in CALLS)
    content, parsed = answer_calls(Llama3JsonCalls(NAMES), f"<|python_tag|>{one}; {two}", "stop")
    assert content is None and called(parsed) == CALLS


@pytest.mark.parametrize("name", [QWEN25, LLAMA31])
def test_malformed_calls_are_text(hf, name):
    """Bad JSON, a function the request did not offer, text after a call, or an answer cut by max_tokens: the
    answer comes back as the text it is."""
    text = written_by_template(hf, name, CALLS[:1])
    broken_json = without_last_brace(text)
    for answer, names, finish in [(broken_json, NAMES, "stop"), (text, ["get_time"], "stop"),
                                  (text + " Done.", NAMES, "stop"), (text, NAMES, "length")]:
        assert answer_calls(SYNTAX[name](names), answer, finish) == (answer, [])
    with pytest.raises(Malformed, match="get_weather"):
        SYNTAX[name](["get_time"]).parse(text)


@pytest.mark.parametrize("name", [QWEN25, LLAMA31])
def test_text_answers_are_text(name):
    for text in ["It is sunny in Paris.", "Use a <tool> with {braces}: {\"a\": 1} <tool_", ""]:
        assert answer_calls(SYNTAX[name](NAMES), text, "stop") == (text, [])


def stream(tokenizer: Tokenizer, parser, text: str, finish: str = "stop") -> tuple[str, list[dict], list[int]]:
    """The answer fed to the streaming path token by token, as the driver detokenizes it: (the content sent,
    the calls sent, the token ids whose logprobs were sent, in order)."""
    held, decoder, sent, calls, scored = _HeldAnswer(parser), StreamDecoder(tokenizer), "", [], []
    ids = tokenizer.encode(text)
    for i, token in enumerate(ids):
        piece = decoder.feed(token) + (decoder.flush() if i == len(ids) - 1 else "")
        out = held.add(Piece(piece, [(token, -1.0, None)]))
        if out is not None:
            sent += out[0]
            scored += [t for t, _, _ in out[1] or ()]
    text_left, calls, scored_left = held.end(finish)
    return sent + text_left, calls, scored + [t for t, _, _ in scored_left or ()]


@pytest.mark.parametrize("name", [QWEN25, LLAMA31])
def test_streaming_sends_the_text_and_then_the_calls_whole(hf, smollm2_dir, name):
    """Streamed, the content is the whole answer's content (no byte of a call leaks into it), the calls are the
    whole answer's, and every token's logprobs go out once, in order."""
    tokenizer = Tokenizer.from_dir(smollm2_dir)
    content = "Let me look that up." if name == QWEN25 else ""  # Llama 3.1's template writes no text with calls
    for text in [written_by_template(hf, name, CALLS[:1], content=content), "It is sunny in Paris, <tool_ or {x}.",
                 without_last_brace(written_by_template(hf, name, CALLS[:1]))]:
        whole_content, whole_calls = answer_calls(SYNTAX[name](NAMES), text, "stop")
        sent, calls, scored = stream(tokenizer, SYNTAX[name](NAMES), text)
        assert sent == (whole_content or "") and called(calls) == called(whole_calls)
        assert scored == tokenizer.encode(text)


def test_a_forced_call_streams_nothing_before_it_is_whole(smollm2_dir):
    tokenizer = Tokenizer.from_dir(smollm2_dir)
    answer = json.dumps([{"name": n, "arguments": a} for n, a in CALLS])
    sent, calls, _ = stream(tokenizer, ForcedCalls(one=False), answer)
    assert sent == "" and called(calls) == CALLS
    assert stream(tokenizer, ForcedCalls(one=False), answer[:-3], finish="length")[:2] == (answer[:-3], [])
