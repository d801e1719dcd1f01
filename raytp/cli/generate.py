"""`raytp generate` (one completion, streamed) and `raytp chat` (a conversation in the terminal)."""

from __future__ import annotations

import json
import sys

from raytp.cli.common import user_message
from raytp.cli.sampling import sampling_params
from raytp.cli.session import ray_session, running_driver


class AnswerText:
    """What the terminal shows of an answer, item by item: its text, or of a harmony model's answer (gpt-oss, given
    its `harmony`) only the final channel, as the web chat shows it; its reasoning is kept aside."""

    def __init__(self, harmony=None):
        self.channels = harmony.answer() if harmony is not None else None
        self.text = ""

    @property
    def reasoning(self) -> str | None:
        return self.channels.reasoning if self.channels is not None else None

    def take(self, item: dict) -> str:
        """The text `item` (one of the driver's submit items) adds to what is shown."""
        if self.channels is None:
            piece = item.get("text", "")
        elif "finish" in item:
            piece = self.channels.end(item["finish"])[0].content
        else:
            piece = self.channels.add(item["text"], item["token_id"]).content
        self.text += piece
        return piece


class AnswerStopped(Exception):
    """Ctrl-C while an answer streamed: the request is cancelled; `text` is what had arrived."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text


def stream_answer(driver, echo: bool, params, prompt_ids: list[int], harmony=None) -> tuple[AnswerText, dict]:
    """Run one request through the driver's `submit`, which checks it as it checks an API request; print its text
    (AnswerText: a `harmony` model's final channel) as it streams when `echo`. Returns (the answer, final stats);
    Ctrl-C cancels the request and raises AnswerStopped."""
    import ray

    answer = AnswerText(harmony)
    stream = driver.submit.remote(prompt_ids, params)
    try:
        for ref in stream:
            item = ray.get(ref)
            piece = answer.take(item)
            if echo and piece:
                print(piece, end="", flush=True)
            if "finish" in item:
                return answer, item
    except KeyboardInterrupt:
        ray.cancel(stream)  # the driver's stream ends and frees the request's cache slot
        raise AnswerStopped(answer.text) from None
    raise RuntimeError("the stream ended without a final item")


def announce_defaults(args, overrides: str = "flags override each") -> None:
    print(f"raytp: {args.sampling_defaults.describe()}; {overrides}", file=sys.stderr)


def cmd_generate(args) -> None:
    import ray

    from raytp.weights.synthetic import is_synthetic

    announce_defaults(args)
    with ray_session(args.address, args.devices), running_driver(args) as (driver, info):
        harmony = ray.get(driver.chat_format.remote()) if args.chat else None  # --chat: the template's answer
        answer, stats = stream_answer(driver, not args.json, sampling_params(args, args.sampling_defaults),
                                      args.prompt_ids, harmony)
        if args.json:
            reasoning = {} if answer.reasoning is None else {"reasoning": answer.reasoning}
            print(json.dumps({"text": answer.text, **reasoning, "token_ids": stats["token_ids"],
                              "prompt_tokens": stats["prompt_tokens"], "generated_tokens": stats["generated_tokens"],
                              "tokens_per_s": stats["tokens_per_s"], "ttft_s": stats["ttft_s"],
                              "finish": stats["finish"], "backend": info["backend"],
                              "drafted_tokens": stats["drafted_tokens"], "accepted_tokens": stats["accepted_tokens"],
                              "plan": info["plan"], "draft_plan": info["draft_plan"]}))
            return
        if is_synthetic(args.model):  # no tokenizer, so no text streamed: the ids are the answer
            print(",".join(map(str, stats["token_ids"])), end="")
        print(f"\n[{stats['generated_tokens']} tokens, {stats['tokens_per_s']:.1f} tokens/s, "
              f"first token {stats['ttft_s'] * 1000:.0f} ms{drafting(stats)}]", file=sys.stderr)


def drafting(stats: dict) -> str:
    """", N of M drafted tokens accepted" where the answer drafted any, else ""."""
    return f", {stats['accepted_tokens']} of {stats['drafted_tokens']} drafted tokens accepted" \
        if stats["drafted_tokens"] else ""


def cmd_chat(args) -> None:
    import ray

    announce_defaults(args)
    with ray_session(args.address, args.devices), running_driver(args) as (driver, info):
        harmony = ray.get(driver.chat_format.remote())
        print(info["plan_table"], file=sys.stderr)
        print("Type a message; Ctrl-C stops an answer, /reset clears the history, /exit (or Ctrl-C here) quits.",
              file=sys.stderr)
        system = [{"role": "system", "content": args.system}] if args.system else []
        history = list(system)
        while True:
            try:
                line = input("\n> ").strip()
            except (EOFError, KeyboardInterrupt):
                print()
                return
            if line in ("/exit", "/quit"):
                return
            if line == "/reset":
                history = list(system)
                print("(history cleared)")
                continue
            if line:
                history = _chat_turn(driver, args, history, line, harmony)


def _chat_turn(driver, args, history: list[dict], line: str, harmony) -> list[dict]:
    """The history after answering `line`: with the answer, or with the part that streamed before Ctrl-C; as it
    was when the turn failed (too long, a rank died), which keeps the session."""
    import ray

    asked = history + [{"role": "user", "content": line}]
    try:
        prompt_ids = ray.get(driver.encode.remote(messages=asked))
        answer, stats = stream_answer(driver, True, sampling_params(args, args.sampling_defaults), prompt_ids,
                                      harmony)
    except AnswerStopped as e:
        print("\n(answer stopped; the chat goes on)", file=sys.stderr)
        return asked + [{"role": "assistant", "content": e.text}]
    except KeyboardInterrupt:  # before the answer began
        print("\n(stopped; the chat goes on)", file=sys.stderr)
        return history
    except Exception as e:  # noqa: BLE001 - a failed turn keeps the session
        print(f"\nraytp: {user_message(e) or e}", file=sys.stderr)
        return history
    print(f"\n[{stats['generated_tokens']} tokens, {stats['tokens_per_s']:.1f} tokens/s{drafting(stats)}]",
          file=sys.stderr)
    return asked + [{"role": "assistant", "content": answer.text}]
