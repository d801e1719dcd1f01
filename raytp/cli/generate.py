"""`raytp generate` (one completion, streamed) and `raytp chat` (a conversation in the terminal)."""

from __future__ import annotations

import json
import sys

from raytp.cli.common import user_message
from raytp.cli.sampling import sampling_params
from raytp.cli.session import ray_session, running_driver


def stream_answer(driver, echo: bool, params, **text) -> tuple[str, dict]:
    """Run one request (`text`: prompt= or messages=) through the driver's `submit`, which checks it as it checks
    an API request; print its text as it streams when `echo`. Returns (text, final stats)."""
    import ray

    prompt_ids = ray.get(driver.encode.remote(**text))
    pieces = []
    for ref in driver.submit.remote(prompt_ids, params):
        item = ray.get(ref)
        if "finish" in item:
            return "".join(pieces), item
        pieces.append(item["text"])
        if echo:
            print(item["text"], end="", flush=True)
    raise RuntimeError("the stream ended without a final item")


def cmd_generate(args) -> None:
    with ray_session(args.address, args.devices), running_driver(args) as (driver, info):
        request = {"messages": [{"role": "user", "content": args.prompt}]} if args.chat else {"prompt": args.prompt}
        text, stats = stream_answer(driver, not args.json, params=sampling_params(args), **request)
        if args.json:
            print(json.dumps({"text": text, "token_ids": stats["token_ids"], "prompt_tokens": stats["prompt_tokens"],
                              "generated_tokens": stats["generated_tokens"], "tokens_per_s": stats["tokens_per_s"],
                              "ttft_s": stats["ttft_s"], "finish": stats["finish"], "backend": info["backend"],
                              "plan": info["plan"]}))
        else:
            print(f"\n[{stats['generated_tokens']} tokens, {stats['tokens_per_s']:.1f} tokens/s, "
                  f"first token {stats['ttft_s'] * 1000:.0f} ms]", file=sys.stderr)


def cmd_chat(args) -> None:
    with ray_session(args.address, args.devices), running_driver(args) as (driver, info):
        print(info["plan_table"], file=sys.stderr)
        print("Type a message; /reset clears the history, /exit quits.", file=sys.stderr)
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
            if not line:
                continue
            history.append({"role": "user", "content": line})
            try:
                answer, stats = stream_answer(driver, True, messages=history, params=sampling_params(args))
            except Exception as e:  # noqa: BLE001 - a failed turn (too long, rank died) keeps the session
                history.pop()
                print(f"\nraytp: {user_message(e) or e}", file=sys.stderr)
                continue
            history.append({"role": "assistant", "content": answer})
            print(f"\n[{stats['generated_tokens']} tokens, {stats['tokens_per_s']:.1f} tokens/s]", file=sys.stderr)
