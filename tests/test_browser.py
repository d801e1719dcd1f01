"""The web chat. In a real browser (Debian's chromium driven by Playwright, against one real `raytp serve`): send a
question, watch the answer stream in and its stats line appear, stop a second answer, check that the Cluster panel
lists every rank, and save docs/screenshot.png. Without a browser: the busy and error paths, and the panel's data.
"""

from __future__ import annotations

import asyncio
import re
import types
import time
from pathlib import Path

import pytest

from raytp.parallel.devices import format_bytes
from raytp.runtime.errors import BusyError, RequestError
from raytp.runtime.sampling import SamplingParams
from raytp.model.pieces import plan_model
from raytp.weights.generation_defaults import SamplingDefaults
from raytp.weights.source import ModelSource
from raytp.weights.synthetic import synthetic_config
from raytp.ui.chat import (QUEUED_NOTE, TABLE_HEADERS, Conversation, build_ui, cluster_table, live_rates,
                           memory_use, shard_widths)
from tests.util import SERVED_API_KEY, SERVED_DEVICES as DEVICES

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "screenshot.png"
STATS = re.compile(r"[\d.]+ tokens/s · first token \d+ ms · \d+ tokens")
BOT = "#raytp-chat [data-testid='bot']"
USER = "#raytp-chat [data-testid='user']"


# ---- no browser --------------------------------------------------------------------------------------------

class RefusingDriver:
    """Stands in for the Driver: every request fails the way `error` says."""

    settings = types.SimpleNamespace(model="smollm2", max_context=64, speculate="off")
    sampling_defaults = SamplingDefaults()  # the model's generation_config.json: none, so greedy
    harmony = None  # answers are plain text

    def __init__(self, error: Exception):
        self.error = error

    async def encode(self, messages):
        return [1] * len(messages)

    async def submit(self, prompt_ids, params):
        raise self.error
        yield


async def _outputs(gen) -> list:
    return [out async for out in gen]


def handler(demo, name: str):
    return next(f.fn for f in demo.fns.values() if f.name == name)


@pytest.mark.parametrize("error, shown", [(BusyError("the server is busy: 8 requests are running"), "**busy**"),
                                          (RequestError("the prompt has 99 tokens"), "**error**")])
def test_chat_says_busy_or_why_it_failed(error, shown):
    respond = handler(build_ui(RefusingDriver(error)), "respond")
    chat = Conversation([{"role": "user", "content": "hi"}])
    with pytest.warns(UserWarning, match=str(error)):  # outside a page, gr.Warning is a Python warning
        outputs = asyncio.run(_outputs(respond(chat, "", 0.0, 1.0, 8, -1)))
    chatbot, status = outputs[-1]
    assert status.startswith(shown) and str(error) in status
    # the user's turn stays, marked as unanswered, and the chat says so below it (no empty answer left behind)
    assert chat.turns == [{"role": "user", "content": "hi", "failed": str(error)}] and not chat.answering
    assert chatbot[0] == {"role": "user", "content": "hi"} and chatbot[1]["role"] == "assistant" and len(chatbot) == 2
    assert f"No answer: {error}" in chatbot[1]["content"] and "Regenerate" in chatbot[1]["content"]
    # asked again (Regenerate), the turn goes out without its note
    again = handler(build_ui(AnsweringDriver()), "respond")
    *_, (chatbot, status) = asyncio.run(_outputs(again(chat, "", 0.0, 1.0, 8, -1)))
    assert chat.turns[0] == {"role": "user", "content": "hi"} and chat.turns[1]["content"] == "Hi"
    assert len(chatbot) == 2 and "No answer" not in str(chatbot)


class AnsweringDriver(RefusingDriver):
    """Stands in for the Driver: answers "Hi" to any request and records the sampling it was asked for."""

    def __init__(self):
        self.asked = []

    async def submit(self, prompt_ids, params):
        self.asked.append(params)
        yield {"text": "Hi", "token_id": 5}
        yield {"finish": "stop", "generated_tokens": 1, "tokens_per_s": 0.0, "ttft_s": 0.01}


def test_chat_turn_runs_through_submit_and_its_checks():
    driver = AnsweringDriver()
    respond = handler(build_ui(driver), "respond")
    chat = Conversation([{"role": "user", "content": "hi"}])
    *_, (chatbot, status) = asyncio.run(_outputs(respond(chat, "", 0.5, 0.9, 8, 3)))
    assert chat.turns[-1]["content"] == "Hi" and status == ""
    assert driver.asked == [SamplingParams(temperature=0.5, top_p=0.9, max_tokens=8, seed=3)]
    chat.turns.pop()
    with pytest.warns(UserWarning, match="top_p"):  # the same rules as the API's, before anything is submitted
        *_, (chatbot, status) = asyncio.run(_outputs(respond(chat, "", 0.5, 0.0, 8, 3)))
    assert status.startswith("**error**") and chat.turns[-1]["failed"] and len(driver.asked) == 1


class StreamingDriver(AnsweringDriver):
    """Stands in for the Driver: answers each request with the words of `answer`, one per step, each step waiting
    for the test to let it go."""

    def __init__(self, answer: str):
        super().__init__()
        self.words, self.step, self.prompts = answer.split(), asyncio.Event(), []

    async def encode(self, messages):
        self.prompts.append([m["content"] for m in messages])
        return [1] * len(messages)

    async def submit(self, prompt_ids, params):
        for word in self.words:
            await self.step.wait()
            self.step.clear()
            yield {"text": f"{word} ", "token_id": 5}
        yield {"finish": "stop", "generated_tokens": len(self.words), "tokens_per_s": 1.0, "ttft_s": 0.01}


def test_a_message_sent_while_an_answer_streams_is_queued_and_answered_next():
    """As the page chains them: Send runs add_user, then respond; a second Send while the first answer streams."""
    driver = StreamingDriver("one two three")
    demo = build_ui(driver)
    add_user, respond = handler(demo, "add_user"), handler(demo, "respond")
    chat = Conversation()

    async def run():
        await add_user("Write a long essay.", chat)
        first = respond(chat, "", 0.0, 1.0, 8, -1)
        driver.step.set()
        chatbot, _ = await anext(first)
        assert chatbot[-1] == {"role": "assistant", "content": "one "}
        box, chatbot = await add_user("And a haiku?", chat)  # while the answer streams
        assert box == "" and chatbot[-1]["content"] == f"And a haiku?\n\n{QUEUED_NOTE}"
        assert await _outputs(respond(chat, "", 0.0, 1.0, 8, -1)) == []  # the running turn answers it
        updates = []
        while True:
            driver.step.set()
            try:
                updates.append(await anext(first))
            except StopAsyncIteration:
                break
        return updates

    updates = asyncio.run(run())
    shown = [[m["content"] for m in chatbot] for chatbot, _ in updates]
    # the first answer kept updating, with the queued message below it
    assert shown[0] == ["Write a long essay.", "one two ", f"And a haiku?\n\n{QUEUED_NOTE}"]
    assert STATS.search(shown[2][1]) and shown[2][1].startswith("one two three")
    # then the queued message was answered, with the first answer in its context
    assert driver.prompts == [["Write a long essay."], ["Write a long essay.", "one two three ", "And a haiku?"]]
    assert shown[-1][:3] == ["Write a long essay.", shown[2][1], "And a haiku?"]
    assert shown[-1][3].startswith("one two three") and STATS.search(shown[-1][3])
    assert [t["role"] for t in chat.turns] == ["user", "assistant", "user", "assistant"] and not chat.answering
    assert not any("queued" in t for t in chat.turns)


def test_stop_leaves_a_queued_message_marked_unanswered():
    driver = StreamingDriver("one two three")
    demo = build_ui(driver)
    add_user, respond = handler(demo, "add_user"), handler(demo, "respond")
    chat = Conversation()

    async def run():
        await add_user("First", chat)
        first = respond(chat, "", 0.0, 1.0, 8, -1)
        driver.step.set()
        await anext(first)
        await add_user("Second", chat)
        await first.aclose()  # Stop cancels the running turn

    asyncio.run(run())
    assert chat.turns[-1] == {"role": "user", "content": "Second", "failed": "stopped before its turn came"}
    assert not chat.answering and len(driver.prompts) == 1


def test_sliders_start_at_the_models_defaults():
    """The web chat samples as the API and the CLI do when nothing is set: the model's generation_config.json
    (top_k and the repetition penalty, which have no slider, too)."""
    driver = AnsweringDriver()
    driver.sampling_defaults = SamplingDefaults(temperature=0.6, top_p=0.95, top_k=20, repetition_penalty=1.1)
    demo = build_ui(driver)
    sliders = {b.elem_id: b.value for b in demo.blocks.values() if getattr(b, "elem_id", None) in
               ("raytp-temperature", "raytp-top-p")}
    assert sliders == {"raytp-temperature": 0.6, "raytp-top-p": 0.95}
    add_user, respond = handler(demo, "add_user"), handler(demo, "respond")
    chat = Conversation()

    async def run():
        await add_user("hi", chat)
        await _outputs(respond(chat, "", 0.6, 0.95, 8, 3))

    asyncio.run(run())
    assert driver.asked == [SamplingParams(temperature=0.6, top_p=0.95, top_k=20, repetition_penalty=1.1,
                                           max_tokens=8, seed=3)]
    assert [b.value for b in build_ui(AnsweringDriver()).blocks.values()
            if getattr(b, "elem_id", None) == "raytp-temperature"] == [0.0]  # none given: greedy


def test_cluster_panel_data(smollm2_dir):
    config = ModelSource.parse("smollm2").config()
    plan = plan_model(config, [("cpu@2GiB", 2 << 30), ("cpu@1GiB", 1 << 30)], max_context=256, max_batch=4,
                       dtype="float32")
    info = {"backend": "hoststaged", "plan": plan.to_dict(),
            "ranks": [{"device_name": "x86_64", "ip": "10.0.0.1"}, {"device_name": "x86_64", "ip": "10.0.0.1"}]}
    table = cluster_table(info)
    # the model's pieces after the fixed columns: a Llama's query heads with their KV heads, MLP columns, vocab rows;
    # then its state
    assert list(table.columns) == [*TABLE_HEADERS, "query heads", "KV heads", "MLP columns", "vocab rows", "KV cache",
                                   "backend"]
    assert list(table["device"]) == ["cpu@2GiB", "cpu@1GiB"]
    assert list(table["KV heads"]) == [f"{len(r.kv_heads)} [{r.kv_heads.start}:{r.kv_heads.stop}]"
                                       for r in plan.ranks]
    widths = shard_widths(info)
    for dimension, shares in widths.groupby("dimension")["share (%)"]:
        assert abs(shares.sum() - 100) < 0.2, dimension  # each dimension is dealt out exactly once
    memory = memory_use(info).groupby("rank")["GiB"].sum()
    assert list(memory.round(2)) == [2.0, 1.0]  # the parts of each bar add up to the budget


def test_cluster_panel_shows_each_layer_kinds_pieces_and_state():
    """A Qwen3.5 on a 5090 and two 3080s: its linear-attention heads and KV heads per rank, and the conv and
    recurrent state of its linear-attention layers apart from the KV cache of its full-attention ones, in the table
    and in the memory bars."""
    config = synthetic_config("synthetic:qwen3.5-27b@w4a16")
    plan = plan_model(config, [("cuda:0@32GiB", 32 << 30), ("cuda:1@20GiB", 20 << 30), ("cuda:2@20GiB", 20 << 30)],
                      max_context=4096, max_batch=2, dtype="bfloat16")
    info = {"backend": "nccl", "plan": plan.to_dict(), "ranks": [{"device_name": "GPU", "ip": "10.0.0.1"}] * 3}
    table = cluster_table(info)
    assert list(table.columns)[len(TABLE_HEADERS):] == ["linear value heads", "linear key heads", "MLP columns",
                                                        "query heads", "KV heads", "vocab rows",
                                                        "conv + recurrent state", "KV cache", "backend"]
    assert list(table["conv + recurrent state"]) == [format_bytes(r.state_bytes["conv + recurrent state"])
                                                     for r in plan.ranks]
    memory = memory_use(info)
    state = memory[memory["part"] == "conv + recurrent state"]["GiB"]
    assert list(state) == [round(r.state_bytes["conv + recurrent state"] / 2**30, 3) for r in plan.ranks]
    assert list(memory.groupby("rank", sort=False)["GiB"].sum().round(2)) == [32.0, 20.0, 20.0]


# ---- one real server and a browser ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(request):
    """The run's shared server (tests/conftest.py): behind its --api-key, so the page logs in first."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)")
    pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    _, url = request.getfixturevalue("shared_server")
    return url


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(server + "/", wait_until="domcontentloaded")
        # Gradio's login form: any user name, the API key as password
        page.locator("input[type=password]").fill(SERVED_API_KEY)
        page.locator("input:not([type=password])").first.fill("tester")
        page.get_by_role("button", name="Login").click()
        page.wait_for_selector("#raytp-input textarea, #raytp-input input")
        yield page
        browser.close()


def set_number(page, elem_id: str, value) -> None:
    """Type into the number box of a slider or number field, as a person would."""
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")


def ask(page, question: str) -> None:
    page.locator("#raytp-input textarea, #raytp-input input").first.fill(question)
    page.click("#raytp-send")


def last_answer(page) -> str:
    answers = page.locator(BOT)
    return answers.nth(answers.count() - 1).inner_text() if answers.count() else ""


@pytest.mark.slow
def test_answer_streams_with_a_stats_line(page):
    set_number(page, "raytp-temperature", 0)
    set_number(page, "raytp-max-tokens", 48)
    ask(page, "Write a short poem about the sea.")
    seen = []  # the answer's text each time it changed: several partial texts mean it streamed
    deadline = time.monotonic() + 180
    while not STATS.search(text := last_answer(page)):
        assert time.monotonic() < deadline, f"no stats line after 180 s; the answer reads {text!r}"
        if text and (not seen or text != seen[-1]):
            seen.append(text)
        time.sleep(0.05)
    assert len(seen) >= 3, f"the answer did not stream: {seen}"
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:])), seen  # each piece extends the text before
    answer = STATS.split(text)[0].strip(" *\n")
    assert len(answer) > 10, text
    assert page.locator(USER).first.inner_text().startswith("Write a short poem")


@pytest.mark.slow
def test_stop_ends_an_answer(page):
    set_number(page, "raytp-max-tokens", 400)
    ask(page, "Tell me a long story about a dragon and a knight.")
    page.wait_for_function(f"document.querySelectorAll(\"{BOT}\").length >= 2 && "
                           f"[...document.querySelectorAll(\"{BOT}\")].pop().innerText.length > 20")
    page.click("#raytp-stop")
    time.sleep(1.0)  # a step may be in flight when the stop arrives
    stopped = last_answer(page)
    time.sleep(2.0)
    assert last_answer(page) == stopped, "the answer kept growing after Stop"
    assert not STATS.search(stopped)


@pytest.mark.slow
def test_a_message_sent_while_an_answer_streams_is_answered_next(page):
    page.click("#raytp-clear")
    set_number(page, "raytp-temperature", 0)
    set_number(page, "raytp-max-tokens", 120)  # still streaming when the second message comes
    ask(page, "Write a long essay about the history of Rome.")
    page.wait_for_function(f"[...document.querySelectorAll(\"{BOT}\")].pop()?.innerText.length > 20")
    box = page.locator("#raytp-input textarea, #raytp-input input").first
    box.fill("What is the capital of France?")
    box.press("Enter")
    # the second message shows at once, marked queued, and the first answer keeps streaming above it
    page.wait_for_function(f"document.querySelectorAll(\"{USER}\").length == 2")
    users, answers = page.locator(USER), page.locator(BOT)
    assert users.nth(0).inner_text().startswith("Write a long essay")
    assert users.nth(1).inner_text().startswith("What is the capital of France?")
    assert "queued" in users.nth(1).inner_text()
    before = answers.nth(0).inner_text()
    page.wait_for_function(f"document.querySelector(\"{BOT}\")?.innerText.length > {len(before)}")
    assert answers.nth(0).inner_text().startswith(before)
    # then the second gets its answer, below the first one's
    page.wait_for_function(f"[...document.querySelectorAll(\"{BOT}\")].filter(e => e.innerText.includes('tokens/s'))"
                           ".length == 2", timeout=300_000)
    assert users.count() == 2 and answers.count() == 2 and "queued" not in users.nth(1).inner_text()
    assert STATS.search(answers.nth(0).inner_text()) and len(STATS.split(answers.nth(1).inner_text())[0]) > 2


@pytest.mark.slow
def test_cluster_panel_lists_every_rank(page):
    """One table row per rank (Gradio draws rows as role=row divs of cells `cell-ROW-COLUMN`), and the charts."""
    def cell(row: int, header: str) -> str:
        column = [*TABLE_HEADERS, "query heads", "KV heads", "MLP columns", "vocab rows", "KV cache",
                  "backend"].index(header)
        return page.locator(f"#raytp-cluster-table [data-testid='cell-{row}-{column}']").first.inner_text().strip()

    page.locator("#raytp-cluster-table [data-testid='cell-0-0']").wait_for()
    devices = DEVICES.split(",")
    for rank, device in enumerate(devices):
        assert (cell(rank, "rank"), cell(rank, "device"), cell(rank, "backend")) == (str(rank), device, "hoststaged")
        assert cell(rank, "memory budget").endswith("GiB") and cell(rank, "KV heads") != "0"
    assert page.locator(f"#raytp-cluster-table [data-testid='cell-{len(devices)}-0']").count() == 0
    summary = page.locator("#raytp-cluster").inner_text()
    assert f"{len(devices)} ranks" in summary and "Shard widths" in summary
    assert page.locator("#raytp-widths canvas, #raytp-widths svg").count() > 0  # the bar chart drew


@pytest.mark.slow
def test_screenshot(page):
    page.click("#raytp-clear")
    set_number(page, "raytp-temperature", 0)
    set_number(page, "raytp-max-tokens", 64)
    ask(page, "What is tensor parallelism? Answer in two sentences.")
    page.wait_for_function(f"[...document.querySelectorAll(\"{BOT}\")].some(e => e.innerText.includes('tokens/s'))",
                           timeout=180_000)
    page.locator("#raytp-widths canvas, #raytp-widths svg").first.wait_for()
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 20_000


def test_live_rates_from_two_snapshots():
    before = {"t": 10.0, "tokens": 100.0, "ranks": [(0, "cpu@2GiB", 50.0, 1.0), (1, "cpu@1GiB", 50.0, 0.5)]}
    now = {"t": 12.0, "tokens": 140.0, "ranks": [(0, "cpu@2GiB", 90.0, 3.0), (1, "cpu@1GiB", 50.0, 0.5)]}
    text = live_rates(before, now)
    assert "**20.0 tokens/s** over the last 2 s" in text
    assert "| 0 | cpu@2GiB | 40 | 50.0 ms |" in text and "| 1 | cpu@1GiB | 0 | idle |" in text
    assert "first refresh" in live_rates(None, now)
