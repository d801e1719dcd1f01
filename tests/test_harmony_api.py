"""A gpt-oss model's chat completions through the OpenAI API, with the official openai client: the real Driver (its
tokenizer pool, chat template, detokenizer, stop handling) and the real HTTP app, over a directory holding a tiny
gpt-oss (random weights) and a tokenizer that speaks harmony (tests/harmony_model.py). A random model writes no
harmony, so the leader rank is scripted (tests/test_driver.py's FakeLeader): it answers with the ids of what gpt-oss's
template writes for an assistant's turn (rendered by transformers). The prompt the leader gets must be transformers';
the answer must come back as content, reasoning_content and tool_calls, streamed (reasoning deltas, then content,
never markup) and whole. The web chat and the terminal over the same driver show the final answer."""

from __future__ import annotations

import asyncio
import json
import types

import httpx
import openai
import pytest
import transformers

from raytp.actors.driver import Driver
from raytp.actors.group import GroupSettings
from raytp.parallel.devices import parse_devices
from raytp.runtime.engine import TokenEvent
from raytp.runtime.sampling import SamplingParams
from tests.harmony_model import write_harmony_tokenizer
from tests.test_driver import FakeLeader
from tests.test_gpt_oss import TINY
from tests.test_harmony import ANSWER, ARGUMENTS, CALL, QUESTION, THINKING, TIME, WEATHER, generated

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = write_harmony_tokenizer(tmp_path_factory.mktemp("gpt-oss-harmony"))
    vocab = len(transformers.AutoTokenizer.from_pretrained(folder))
    transformers.GptOssForCausalLM(transformers.GptOssConfig(**TINY | {"vocab_size": vocab})).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf(model_dir):
    return transformers.AutoTokenizer.from_pretrained(model_dir)


def answer_ids(hf, answer: dict, tools=None) -> list[int]:
    """The ids gpt-oss writes for the assistant's turn `answer` after the generation prompt, its end token last."""
    prompt = hf.apply_chat_template(QUESTION, tools=tools, tokenize=False, add_generation_prompt=True)
    whole = hf.apply_chat_template([*QUESTION, answer], tools=tools, tokenize=False)
    return generated(hf, whole[len(prompt):])


def scripted_driver(model_dir, answers: list[tuple[list[int], str]], samples: int = 1) -> Driver:
    """The Driver of `model_dir` (run in an event loop), its leader answering each request with the next of
    `answers`: (ids, how the last ends: "stop" for an end token, "length" for max_tokens), for each of `samples`
    choices, their tokens interleaved as the batch steps them."""
    driver = Driver(GroupSettings(model=str(model_dir), devices=tuple(parse_devices("cpu")), max_context=4096))
    pending = list(answers)

    def script(rid):
        ids, finish = pending.pop(0)
        return [TokenEvent(rid, t, finish if i == len(ids) - 1 else None, index=k) for i, t in enumerate(ids)
                for k in range(samples)]

    driver.group = types.SimpleNamespace(leader=FakeLeader(driver, script))
    driver.ready.set()
    return driver


def serve(model_dir, answers: list[tuple[list[int], str]], ask, samples: int = 1):
    """Runs `ask(client, model id)` against the API of `scripted_driver(model_dir, answers, samples)`; returns
    (what `ask` returned, the prompt ids each request sent)."""
    async def run():
        from raytp.serving.openai_api import build_app

        driver = scripted_driver(model_dir, answers, samples)
        transport = httpx.ASGITransport(app=build_app(driver))
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://raytp/v1") as http:
                client = openai.AsyncOpenAI(base_url="http://raytp/v1", api_key="none", http_client=http,
                                            max_retries=0)
                result = await asyncio.wait_for(ask(client, str(model_dir)), timeout=60)
        finally:
            driver.tokenizer_pool.close()
        return result, [c.request.prompt_ids for c in driver.group.leader.commands]
    return asyncio.run(run())


def test_reasoning_and_content_whole_and_streamed(model_dir, hf):
    ids = answer_ids(hf, {"role": "assistant", "content": ANSWER, "thinking": THINKING})

    async def ask(client, model):
        whole = await client.chat.completions.create(model=model, messages=QUESTION, reasoning_effort="high")
        stream = await client.chat.completions.create(model=model, messages=QUESTION, reasoning_effort="high",
                                                      stream=True)
        return whole, [chunk async for chunk in stream]

    (whole, chunks), prompts = serve(model_dir, [(ids, "stop")] * 2, ask)
    want = hf.apply_chat_template(QUESTION, add_generation_prompt=True, reasoning_effort="high", return_dict=False)
    assert prompts == [want, want]
    message = whole.choices[0].message
    assert (message.content, message.reasoning_content, message.tool_calls) == (ANSWER, THINKING, None)
    assert whole.choices[0].finish_reason == "stop"
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = [d.reasoning_content for d in deltas if getattr(d, "reasoning_content", None)]
    content = [d.content for d in deltas if d.content]
    assert "".join(reasoning) == THINKING and "".join(content) == ANSWER and len(reasoning) > 1 and len(content) > 1
    first_content = next(i for i, d in enumerate(deltas) if d.content)
    assert all(not getattr(d, "reasoning_content", None) for d in deltas[first_content:])  # reasoning, then content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_a_tool_call_whole_and_streamed(model_dir, hf):
    tools = [WEATHER, TIME]
    ids = answer_ids(hf, {"role": "assistant", "content": "", "thinking": THINKING, "tool_calls": [CALL]}, tools)
    sent = [*QUESTION, {"role": "assistant", "content": None, "reasoning_content": THINKING, "tool_calls": [
        CALL | {"function": {"name": "get_weather", "arguments": json.dumps(ARGUMENTS)}}]},
        {"role": "tool", "tool_call_id": "call_0", "content": "sunny"}]

    async def ask(client, model):
        whole = await client.chat.completions.create(model=model, messages=QUESTION, tools=tools)
        stream = await client.chat.completions.create(model=model, messages=QUESTION, tools=tools, stream=True)
        chunks = [chunk async for chunk in stream]
        answered = await client.chat.completions.create(model=model, messages=sent, tools=tools)
        return whole, chunks, answered

    (whole, chunks, answered), prompts = serve(model_dir, [(ids, "stop")] * 2 + [(answer_ids(hf, {
        "role": "assistant", "content": "Sunny."}), "stop")], ask)
    assert prompts[0] == hf.apply_chat_template(QUESTION, tools=tools, add_generation_prompt=True, return_dict=False)
    for message, finish in [(whole.choices[0].message, whole.choices[0].finish_reason)]:
        assert finish == "tool_calls" and message.content is None and message.reasoning_content == THINKING
        assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == \
            [("get_weather", ARGUMENTS)]
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [c for d in deltas for c in d.tool_calls or ()]
    assert [(c.index, c.function.name, json.loads(c.function.arguments)) for c in calls] == \
        [(0, "get_weather", ARGUMENTS)]
    assert "".join(d.reasoning_content or "" for d in deltas if hasattr(d, "reasoning_content")) == THINKING
    assert not any(d.content for d in deltas)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    # the call sent back, with its reasoning and result: the prompt is transformers' (the reasoning kept before it)
    template_input = [*QUESTION, {"role": "assistant", "content": "", "thinking": THINKING, "tool_calls": [CALL]},
                      sent[-1]]
    assert prompts[2] == hf.apply_chat_template(template_input, tools=tools, add_generation_prompt=True,
                                                return_dict=False)
    assert answered.choices[0].message.content == "Sunny." and answered.choices[0].message.reasoning_content is None


def test_each_choice_is_read_apart(model_dir, hf):
    """n=2, the choices' tokens interleaved: each choice's reasoning and content, streamed and whole."""
    ids = answer_ids(hf, {"role": "assistant", "content": ANSWER, "thinking": THINKING})

    async def ask(client, model):
        whole = await client.chat.completions.create(model=model, messages=QUESTION, n=2, seed=1)
        stream = await client.chat.completions.create(model=model, messages=QUESTION, n=2, seed=1, stream=True)
        return whole, [chunk async for chunk in stream]

    (whole, chunks), _ = serve(model_dir, [(ids, "stop")] * 2, ask, samples=2)
    assert [(c.message.reasoning_content, c.message.content) for c in whole.choices] == [(THINKING, ANSWER)] * 2
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert "".join(getattr(c.delta, "reasoning_content", None) or "" for c in mine) == THINKING
        assert "".join(c.delta.content or "" for c in mine) == ANSWER and mine[-1].finish_reason == "stop"


def test_an_answer_cut_by_max_tokens(model_dir, hf):
    """Cut inside the final channel: what came is content, the finish is "length"; cut inside a call: no call."""
    answer = answer_ids(hf, {"role": "assistant", "content": ANSWER, "thinking": THINKING})
    call = answer_ids(hf, {"role": "assistant", "content": "", "tool_calls": [CALL]}, [WEATHER])
    cut_answer, cut_call = answer[:len(answer) - 10], call[:len(call) - 3]

    async def ask(client, model):
        return [await client.chat.completions.create(model=model, messages=QUESTION, tools=[WEATHER])
                for _ in range(2)]

    (text, called), _ = serve(model_dir, [(cut_answer, "length"), (cut_call, "length")], ask)
    assert text.choices[0].finish_reason == "length" and text.choices[0].message.reasoning_content == THINKING
    assert ANSWER.startswith(text.choices[0].message.content) and len(text.choices[0].message.content) > 0
    assert called.choices[0].finish_reason == "length" and not called.choices[0].message.tool_calls
    assert called.choices[0].message.content == ""


def test_reasoning_effort_needs_a_harmony_model():
    from raytp.serving.openai_api import APIError, parse_completion

    body = {"model": "m", "messages": QUESTION, "reasoning_effort": "high"}
    with pytest.raises(APIError) as e:
        parse_completion(body, chat=True, model_id="m")
    assert (e.value.status, e.value.param) == (400, "reasoning_effort")
    assert parse_completion(body, chat=True, model_id="m", harmony=True).template_variables() == \
        {"reasoning_effort": "high"}
    with pytest.raises(APIError) as e:
        parse_completion(body | {"reasoning_effort": "max"}, chat=True, model_id="m", harmony=True)
    assert e.value.param == "reasoning_effort"


def test_the_web_chat_shows_the_final_answer(model_dir, hf):
    """The web chat's turn over the same driver: the answer shown and kept in the history is the final channel; while
    only reasoning has come, a note says the model thinks."""
    from raytp.ui.chat import THINKING_NOTE, Conversation, build_ui

    ids = answer_ids(hf, {"role": "assistant", "content": ANSWER, "thinking": THINKING})

    async def run():
        driver = scripted_driver(model_dir, [(ids, "stop")])
        respond = next(f.fn for f in build_ui(driver).fns.values() if f.name == "respond")
        chat = Conversation([{"role": "user", "content": QUESTION[0]["content"]}])
        try:
            shown = [chatbot async for chatbot, _ in respond(chat, "", 0.0, 1.0, 64, -1)]
        finally:
            driver.tokenizer_pool.close()
        return chat, shown

    chat, shown = asyncio.run(run())
    assert chat.turns[-1]["content"] == ANSWER
    answers = [chatbot[-1]["content"] for chatbot in shown if len(chatbot) == 2 and chatbot[-1]["content"]]
    assert answers[0] == THINKING_NOTE and answers[-1].startswith(ANSWER + "\n\n*")  # then the stats line
    assert not any(THINKING[:20] in a or "<|" in a or "analysis" in a for a in answers)


def test_return_and_call_end_generation_whatever_the_files_say(model_dir, hf, tmp_path):
    """A directory whose files name only <|return|> as eos (a GGUF import's, with no generation_config.json): a
    request still stops at <|call|> too."""
    for f in model_dir.iterdir():
        if f.name != "generation_config.json":
            (tmp_path / f.name).symlink_to(f)

    async def run():
        driver = scripted_driver(tmp_path, [([hf.convert_tokens_to_ids("<|return|>")], "stop")])
        try:
            [_ async for _ in driver.submit(driver.tokenizer.encode("x"), SamplingParams(max_tokens=4))]
        finally:
            driver.tokenizer_pool.close()
        return driver.tokenizer.eos_token_ids, driver.group.leader.commands[0].request.stop_ids

    files_say, stops = asyncio.run(run())
    ids = {hf.convert_tokens_to_ids(t) for t in ("<|return|>", "<|call|>")}
    assert hf.convert_tokens_to_ids("<|call|>") not in files_say and ids <= set(stops)


def test_the_terminal_prints_the_final_answer(model_dir, hf):
    """`raytp chat` and `raytp generate --chat` read the driver's items as the web chat does: the final channel is
    printed (and kept in the chat's history), the reasoning kept aside (`--json`'s reasoning)."""
    from raytp.cli.generate import AnswerText

    ids = answer_ids(hf, {"role": "assistant", "content": ANSWER, "thinking": THINKING})

    async def run():
        driver = scripted_driver(model_dir, [(ids, "stop")])
        try:
            prompt = await driver.encode(messages=QUESTION)
            return driver.chat_format(), [item async for item in driver.submit(prompt, SamplingParams(max_tokens=64))]
        finally:
            driver.tokenizer_pool.close()

    harmony, items = asyncio.run(run())
    shown = AnswerText(harmony)
    printed = [shown.take(item) for item in items]
    assert "".join(printed) == shown.text == ANSWER and shown.reasoning == THINKING
    plain = AnswerText()  # a model that answers in plain text: its text as it comes
    assert "".join(plain.take(item) for item in items) == "".join(item.get("text", "") for item in items)


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_reasoning_sent_back_reaches_the_template(field):
    """Under either name clients send it (vLLM's, older and newer), as the names templates read it by."""
    from raytp.serving.openai_api import parse_completion

    call = CALL | {"function": {"name": "get_weather", "arguments": json.dumps(ARGUMENTS)}}
    body = {"model": "m", "messages": [*QUESTION, {"role": "assistant", field: THINKING, "tool_calls": [call]}]}
    message = parse_completion(body, chat=True, model_id="m").messages[1].as_template_input()
    assert message["thinking"] == message["reasoning_content"] == THINKING
