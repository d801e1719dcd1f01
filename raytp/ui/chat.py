"""The web chat: streamed answers with a stats line, sampling controls, and a Cluster panel showing the split.

`build_ui(driver)` takes the plain `Driver` object and runs in the driver actor's event loop (mounted next to the
OpenAI API by raytp.serving.openai_api), so a chat turn iterates `driver.submit` directly, like an API request does,
joins the same continuous batch and meets the same checks. A message sent while an answer streams shows at once,
marked queued, and is answered next. Stopping a turn cancels the Gradio task, which closes the stream and frees the
request's cache slot.
"""

from __future__ import annotations

import secrets
from contextlib import aclosing
from dataclasses import dataclass, field

import gradio as gr
import pandas as pd

from raytp.runtime.errors import BusyError, RequestError
from raytp.runtime.sampling import TEMPERATURE_MAX, SamplingParams
from raytp.parallel.devices import format_bytes

TABLE_HEADERS = ["rank", "device", "device name (node)", "memory budget", "used (weights + state)"]


def _dimensions(info: dict) -> dict[str, str]:
    """The sharded dimensions of whichever model runs, as ShardPlan.to_dict names them -> how the panel labels
    them: of each piece the ranges that follow it, then its own."""
    spans = [s for p in info["plan"]["pieces"] for s in (*p["spans"][1:], p["spans"][0])]
    return {s["name"]: s["title"] for s in spans}


def _states(info: dict) -> list[str]:
    """What keeps per-sequence state in this model ("KV cache", "window cache", "conv + recurrent state"), as its
    layer kinds name it (ShardPlan.states)."""
    return list(info["plan"]["ranks"][0]["state_bytes"])


# ---- the Cluster panel -------------------------------------------------------------------------------------

def _span(rank: dict, key: str) -> str:
    start, stop = rank[f"{key}_range"]
    return f"{stop - start} [{start}:{stop}]" if stop > start else "0"


def _label(rank: dict) -> str:
    return f"rank {rank['rank']} · {rank['device']}"


def cluster_table(info: dict) -> pd.DataFrame:
    """One row per rank: the device behind it, its memory, the slice of every sharded dimension it holds and the
    state its layers keep for the batch (each kind's apart)."""
    rows = []
    for shard, described in zip(info["plan"]["ranks"], info["ranks"]):
        rows.append([
            shard["rank"], shard["device"], f"{described.get('device_name', '')} ({described.get('ip', '?')})",
            format_bytes(shard["budget_bytes"]),
            f"{format_bytes(shard['weight_bytes'] + shard['kv_cache_bytes'])} ({format_bytes(shard['weight_bytes'])}"
            f" + {format_bytes(shard['kv_cache_bytes'])})",
            *(_span(shard, key) for key in _dimensions(info)),
            *(format_bytes(shard["state_bytes"][name]) for name in _states(info)), info["backend"],
        ])
    return pd.DataFrame(rows, columns=[*TABLE_HEADERS, *_dimensions(info).values(), *_states(info), "backend"])


def shard_widths(info: dict) -> pd.DataFrame:
    """Each rank's share (%) of every sharded dimension: the bars show at a glance how the model was split."""
    ranks = info["plan"]["ranks"]
    rows = []
    for key, name in _dimensions(info).items():
        total = sum(r[key] for r in ranks) or 1
        rows += [{"dimension": name, "share (%)": round(100 * r[key] / total, 1), "rank": _label(r)}
                 for r in ranks]
    return pd.DataFrame(rows)


def memory_use(info: dict) -> pd.DataFrame:
    """Each rank's budget (GiB) as weights, each kind of state, replicated buffers and headroom (listed top of the
    stack first: the chart stacks the first part on top)."""
    def parts(r: dict) -> dict[str, int]:
        return ({"headroom": r["headroom_bytes"], "buffers": r["overhead_bytes"]}
                | {name: r["state_bytes"][name] for name in reversed(_states(info))} | {"weights": r["weight_bytes"]})
    return pd.DataFrame([{"rank": _label(r), "GiB": round(max(n, 0) / 2**30, 3), "part": part}
                         for r in info["plan"]["ranks"] for part, n in parts(r).items()])


def cluster_summary(info: dict) -> str:
    dtype = info["dtype"] + (" · fp8 KV cache" if info.get("kv_dtype") == "fp8" else "")
    return (f"**{info['model']}** on {len(info['ranks'])} ranks · all-reduce **{info['backend']}** · "
            f"{dtype} · context {info['max_context']} tokens · batch of {info['max_batch']} sequences, "
            f"which requests join and leave between decode steps"
            + "".join(f"\n- {event}" for event in info["history"][-5:]))  # rank losses, re-plans


LIVE_REFRESH_S = 2.0  # how often an open page refreshes the panel's live numbers


def live_rates(before: dict | None, now: dict) -> str:
    """The panel's live line from two of Driver.live_numbers' snapshots: tokens/s and each rank's mean step time
    over the interval between them."""
    if not before:
        return "*live numbers appear after the first refresh*"
    seconds = max(now["t"] - before["t"], 1e-9)
    rows = ["| rank | device | steps | step time |", "|---|---|---|---|"]
    was = {rank: (steps, total) for rank, _, steps, total in before["ranks"]}
    for rank, device, steps, total in now["ranks"]:
        d_steps, d_total = steps - was.get(rank, (0, 0))[0], total - was.get(rank, (0, 0))[1]
        rows.append(f"| {rank} | {device} | {d_steps:.0f} | "
                    f"{f'{1000 * d_total / d_steps:.1f} ms' if d_steps > 0 else 'idle'} |")
    rate = (now["tokens"] - before["tokens"]) / seconds
    return f"**{rate:.1f} tokens/s** over the last {seconds:.0f} s\n\n" + "\n".join(rows)


# ---- chat --------------------------------------------------------------------------------------------------

def stats_line(final: dict) -> str:
    line = (f"{final['tokens_per_s']:.1f} tokens/s · first token {final['ttft_s'] * 1000:.0f} ms · "
            f"{final['generated_tokens']} tokens")
    return line + (" · hit max tokens" if final["finish"] == "length" else "")


QUEUED_NOTE = "⏳ *queued: answered after the answer being written*"
THINKING_NOTE = "💭 *thinking…*"  # a reasoning model's answer while only its reasoning (not shown) comes


@dataclass
class Conversation:
    """One browser tab's chat. Every event of the tab gets this same object (Gradio keeps a State's value per
    session and passes it, not a copy), so a message sent while an answer streams joins `turns` at once, marked
    queued, and the turn being answered picks it up next."""
    # {"role", "content"}; on user turns "queued"/"failed", on answers "stats" and "thinking" (reasoning so far)
    turns: list[dict] = field(default_factory=list)
    answering: bool = False  # an answer is being written: new messages wait for it


def _display(turns: list[dict]) -> list[dict]:
    """The chatbot's messages: each answer with its stats line below it, a queued message marked so, and below a
    turn that got no answer, why (the turn stays: Regenerate asks again)."""
    shown = []
    for t in turns:
        content = t["content"] or (THINKING_NOTE if t.get("thinking") else "")
        if t.get("stats"):
            if content.count("```") % 2:  # an answer cut inside a code block: close it so the stats show
                content += "\n```"
            content += f"\n\n*{t['stats']}*"
        if t.get("queued"):
            content += f"\n\n{QUEUED_NOTE}"
        shown.append({"role": t["role"], "content": content})
        if t.get("failed"):
            shown.append({"role": "assistant", "content": f"⚠️ *No answer: {t['failed']}. Your message is kept: "
                                                          "press Regenerate to ask again.*"})
    return shown


def build_ui(driver) -> gr.Blocks:
    """The chat and Cluster panel over `driver`, a plain Driver running in the same event loop."""
    max_new = max(1, driver.settings.max_context - 1)

    async def add_user(text: str, chat: Conversation):
        if not text.strip():
            return text, _display(chat.turns)
        chat.turns.append({"role": "user", "content": text} | ({"queued": True} if chat.answering else {}))
        return "", _display(chat.turns)

    async def drop_answer(chat: Conversation):
        if chat.answering:
            gr.Warning("An answer is being written: wait for it, or press Stop, before Regenerate.")
        elif chat.turns and chat.turns[-1]["role"] == "assistant":
            chat.turns.pop()
        return _display(chat.turns)

    async def clear_chat(chat: Conversation):
        chat.turns, chat.answering = [], False  # a new list: an answer still being cancelled writes to the old one
        return [], ""

    async def respond(chat: Conversation, system: str, temperature: float, top_p: float, max_tokens: float, seed):
        """Answer the last turn, then each message queued meanwhile, in order. Stop (or Clear) ends them all: a
        message still queued is then marked as not answered."""
        turns = chat.turns
        if chat.answering or not turns or turns[-1]["role"] != "user":
            return  # an answer is being written: the message just added is queued and answered after it
        chat.answering = True
        turns[-1].pop("failed", None)  # asked again: no failure yet
        index = len(turns) - 1
        try:
            while index is not None:
                async with aclosing(_answer(turns, index, system, temperature, top_p, max_tokens, seed)) as shown:
                    async for update in shown:
                        if turns is not chat.turns:
                            return  # cleared
                        yield update
                index = next((i for i, t in enumerate(turns) if t.get("queued")), None)
                if index is not None:
                    del turns[index]["queued"]
        finally:
            if turns is chat.turns:
                chat.answering = False
            for t in turns:
                if t.pop("queued", False):
                    t["failed"] = "stopped before its turn came"

    async def _answer(turns: list[dict], index: int, system: str, temperature: float, top_p: float,
                      max_tokens: float, seed):
        """Stream the answer to turns[index] (a user turn) into `turns` right after it; yields (chatbot, status)."""
        messages = ([{"role": "system", "content": system}] if system.strip() else []) + \
            [{"role": t["role"], "content": t["content"]} for t in turns[:index + 1]]
        answer = {"role": "assistant", "content": "", "stats": ""}
        # a harmony model (gpt-oss) answers in channels: only its final answer is shown, and kept in the history
        channels = driver.harmony.answer() if driver.harmony is not None else None
        try:
            params = SamplingParams(temperature=float(temperature), top_p=float(top_p), max_tokens=int(max_tokens),
                                    seed=int(seed) if seed is not None and seed >= 0 else secrets.randbits(31),
                                    top_k=driver.sampling_defaults.top_k,  # no slider: the model's own
                                    repetition_penalty=driver.sampling_defaults.repetition_penalty,
                                    speculate=driver.settings.speculate)
            async with aclosing(driver.submit(await driver.encode(messages=messages), params)) as items:
                async for item in items:
                    if "finish" in item:
                        answer["stats"] = stats_line(item)
                        if channels is not None:
                            answer["content"] += channels.end(item["finish"])[0].content
                    elif channels is not None:
                        answer["content"] += channels.add(item["text"], item["token_id"]).content
                        answer["thinking"] = bool(channels.reasoning)
                    else:
                        answer["content"] += item["text"]
                    if len(turns) == index + 1 or turns[index + 1] is not answer:  # shown from its first piece
                        turns.insert(index + 1, answer)
                    yield _display(turns), ""
        except (BusyError, RequestError, RuntimeError) as e:
            gr.Warning(str(e))
            turns[:] = [t for t in turns if t is not answer]
            turns[index]["failed"] = str(e)
            yield _display(turns), f"**{'busy' if isinstance(e, BusyError) else 'error'}**: {e}"

    def cluster_view():
        info = driver.info()
        return cluster_summary(info), cluster_table(info), shard_widths(info), memory_use(info)

    model = driver.settings.model
    with gr.Blocks(title=f"raytp · {model}", analytics_enabled=False, fill_width=True) as demo:
        chat = gr.State(Conversation())
        gr.Markdown(f"## raytp · {model}\nTensor-parallel inference, one Ray actor per device. The same server "
                    f"answers the OpenAI API at `/v1`.")
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Chat", height=420, elem_id="raytp-chat", buttons=["copy"])
                with gr.Row():
                    box = gr.Textbox(placeholder="Ask something and press Enter", show_label=False, scale=6,
                                     elem_id="raytp-input", autofocus=True)
                    send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="raytp-send")
                    stop = gr.Button("Stop", variant="stop", scale=1, min_width=80, elem_id="raytp-stop")
                with gr.Row():
                    regenerate = gr.Button("Regenerate", size="sm", elem_id="raytp-regenerate")
                    clear = gr.Button("Clear", size="sm", elem_id="raytp-clear")
                status = gr.Markdown(elem_id="raytp-status")
            with gr.Column(scale=2):
                system = gr.Textbox(label="System prompt", lines=3, placeholder="You are a helpful assistant.",
                                    elem_id="raytp-system")
                # the model's own defaults (its generation_config.json), as the API's and the CLI's
                temperature = gr.Slider(0, TEMPERATURE_MAX, value=driver.sampling_defaults.temperature, step=0.05,
                                        label="Temperature (0 = greedy)", elem_id="raytp-temperature")
                top_p = gr.Slider(0.05, 1, value=driver.sampling_defaults.top_p, step=0.05, label="Top-p",
                                  elem_id="raytp-top-p")
                max_tokens = gr.Slider(1, max_new, value=min(256, max_new), step=1, label="Max tokens",
                                       elem_id="raytp-max-tokens")
                seed = gr.Number(value=-1, precision=0, label="Seed (-1: a new one each turn)", elem_id="raytp-seed")
        with gr.Accordion("Cluster", open=True, elem_id="raytp-cluster"):
            summary = gr.Markdown()
            live = gr.Markdown(elem_id="raytp-live")
            live_state = gr.State(None)
            timer = gr.Timer(LIVE_REFRESH_S)
            table = gr.Dataframe(headers=TABLE_HEADERS, interactive=False, wrap=True, elem_id="raytp-cluster-table",
                                 column_widths=["5%", "9%", "13%", "8%", "20%", "7%", "7%", "10%", "12%", "9%"])
            with gr.Row():
                widths = gr.BarPlot(x="dimension", y="share (%)", color="rank", height=300, sort=None,
                                    title="Shard widths: each rank's share of every dimension",
                                    elem_id="raytp-widths")
                memory = gr.BarPlot(x="rank", y="GiB", color="part", height=300, sort=None,
                                    title="Memory budget per rank", elem_id="raytp-memory")
        sampling = [system, temperature, top_p, max_tokens, seed]
        running = []
        for trigger in (box.submit, send.click):  # "multiple": a message sent while an answer streams is queued
            running.append(trigger(add_user, [box, chat], [box, chatbot], queue=False, trigger_mode="multiple").then(
                respond, [chat, *sampling], [chatbot, status], concurrency_limit=None))
        running.append(regenerate.click(drop_answer, [chat], [chatbot], queue=False).then(
            respond, [chat, *sampling], [chatbot, status], concurrency_limit=None))
        stop.click(None, cancels=running)
        clear.click(clear_chat, [chat], [chatbot, status], cancels=running, queue=False)
        demo.load(cluster_view, outputs=[summary, table, widths, memory])

        async def live_view(before):
            now = await driver.live_numbers()
            return live_rates(before, now), now

        timer.tick(live_view, inputs=[live_state], outputs=[live, live_state], queue=False, show_progress="hidden")
    _poll_queue_calmly(demo)
    return demo


QUEUE_IDLE_POLL_S = 0.05  # how often Gradio's idle queue looks for a new chat turn: at most this much added latency


def _poll_queue_calmly(demo: gr.Blocks) -> None:
    """Gradio's queue polls for work every 1 ms and for progress every 10 ms, even with nobody connected: 2-3% of
    a core in an idle server (tests/test_idle.py). It has no public setting; a chat turn starting up to 50 ms later
    is not noticed, its tokens then stream without this poll."""
    demo._queue.sleep_when_free = QUEUE_IDLE_POLL_S
    demo._queue.progress_update_sleep_when_free = 10 * QUEUE_IDLE_POLL_S
