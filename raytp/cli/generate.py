"""`raytp generate` (one completion, streamed) and `raytp chat` (a conversation in the terminal)."""

from __future__ import annotations

import json
import sys

from raytp.cli.common import user_message
from raytp.cli.sampling import sampling_params
from raytp.cli.session import ray_session, running_driver


class AnswerStopped(Exception):
    """Ctrl-C while an answer streamed: the request is cancelled; `text` is what had arrived."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text


def stream_answer(driver, echo: bool, params, prompt_ids: list[int]) -> tuple[str, dict]:
    """Run one request through the driver's `submit`, which checks it as it checks an API request; print its text
    as it streams when `echo`. Returns (text, final stats); Ctrl-C cancels the request and raises AnswerStopped."""
    import ray

    pieces = []
    stream = driver.submit.remote(prompt_ids, params)
    try:
        for ref in stream:
            item = ray.get(ref)
            if "finish" in item:
                return "".join(pieces), item
            pieces.append(item["text"])
            if echo:
                print(item["text"], end="", flush=True)
    except KeyboardInterrupt:
        ray.cancel(stream)  # the driver's stream ends and frees the request's cache slot
        raise AnswerStopped("".join(pieces)) from None
    raise RuntimeError("the stream ended without a final item")


def announce_defaults(args, overrides: str = "flags override each") -> None:
    print(f"raytp: {args.sampling_defaults.describe()}; {overrides}", file=sys.stderr)


def cmd_generate(args) -> None:
    from raytp.weights.synthetic import is_synthetic

    announce_defaults(args)
    with ray_session(args.address, args.devices), running_driver(args) as (driver, info):
        text, stats = stream_answer(driver, not args.json, sampling_params(args, args.sampling_defaults),
                                    args.prompt_ids)
        if args.json:
            print(json.dumps({"text": text, "token_ids": stats["token_ids"], "prompt_tokens": stats["prompt_tokens"],
                              "generated_tokens": stats["generated_tokens"], "tokens_per_s": stats["tokens_per_s"],
                              "ttft_s": stats["ttft_s"], "finish": stats["finish"], "backend": info["backend"],
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
    announce_defaults(args)
    with ray_session(args.address, args.devices), running_driver(args) as (driver, info):
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
                history = _chat_turn(driver, args, history, line)


def _chat_turn(driver, args, history: list[dict], line: str) -> list[dict]:
    """The history after answering `line`: with the answer, or with the part that streamed before Ctrl-C; as it
    was when the turn failed (too long, a rank died), which keeps the session."""
    import ray

    asked = history + [{"role": "user", "content": line}]
    try:
        prompt_ids = ray.get(driver.encode.remote(messages=asked))
        answer, stats = stream_answer(driver, True, sampling_params(args, args.sampling_defaults), prompt_ids)
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
    return asked + [{"role": "assistant", "content": answer}]
