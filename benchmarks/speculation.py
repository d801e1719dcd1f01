"""Prompt-lookup drafting (`speculate: ngram`), or a draft model's (`--draft PATH`: `speculate: draft`), against
plain decoding on the embedded SmolLM2 (or `--model`), through the real path (a local Ray, the driver, the ranks):
acceptance and tokens/s for the edit/summarize prompts and for free chat of benchmarks/prompts/speculation.json,
greedy, every request run both ways in the same group.

    python benchmarks/speculation.py [--devices cpu] [--k 4] [--max-tokens 128] [--model M --draft PATH]

CPU figures are for regressions, not claims: two cores shared by every rank.
"""

import argparse
import json
import statistics
from pathlib import Path

import ray

from raytp.actors.driver import DriverActor
from raytp.actors.group import GroupSettings
from raytp.cli.generate import stream_answer
from raytp.cli.session import ray_session
from raytp.parallel.devices import parse_devices
from raytp.runtime.sampling import SamplingParams
from raytp.weights.smollm2 import pull_smollm2

PROMPTS = Path(__file__).parent / "prompts" / "speculation.json"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--devices", default="cpu")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--draft", default=None, help="a draft model of the same tokenizer: draft:K instead of ngram:K")
    args = p.parse_args()
    pull_smollm2()
    with ray_session(None, args.devices):  # a local Ray of its own, as `raytp generate` starts
        rows = measure(args)
    report(args, rows)


def measure(args) -> list[tuple]:
    settings = GroupSettings(model=args.model, devices=tuple(parse_devices(args.devices)), dtype=args.dtype,
                             max_context=1024, max_batch=1, progress=False, draft_model=args.draft)
    driver = DriverActor.remote(settings)
    ray.get(driver.start.remote())
    try:
        rows = []
        for kind, prompts in json.loads(PROMPTS.read_text()).items():
            plain, fast, drafted, accepted, generated, same = [], [], 0, 0, 0, True
            for prompt in prompts:
                ids = ray.get(driver.encode.remote(messages=[{"role": "user", "content": prompt}]))
                answers = {}
                for spec in ("off", drafting(args)):
                    params = SamplingParams(max_tokens=args.max_tokens, speculate=spec)
                    answers[spec] = stream_answer(driver, False, params, ids)
                (answer_off, off), (answer_on, on) = answers.values()
                same &= answer_off.text == answer_on.text
                plain.append(off["tokens_per_s"])
                fast.append(on["tokens_per_s"])
                drafted, accepted = drafted + on["drafted_tokens"], accepted + on["accepted_tokens"]
                generated += on["generated_tokens"]
            rows.append((kind, len(prompts), statistics.mean(plain), statistics.mean(fast),
                         accepted / drafted if drafted else 0.0, generated / (generated - accepted), same))
    finally:
        ray.get(driver.shutdown.remote())
    return rows


def drafting(args) -> str:
    return f"{'ngram' if args.draft is None else 'draft'}:{args.k}"


def report(args, rows: list[tuple]) -> None:
    drafter = "ngram" if args.draft is None else f"draft {args.draft}"
    print(f"{args.model} {args.dtype}, --devices {args.devices}, greedy, max_tokens {args.max_tokens}, "
          f"{drafting(args)}{'' if args.draft is None else f' ({args.draft})'}")
    print(f"| prompts | n | plain tokens/s | {drafter} tokens/s | speed-up | acceptance | tokens/step | same text |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, n, off, on, acceptance, per_step, same in rows:
        print(f"| {kind} | {n} | {off:.1f} | {on:.1f} | {on / off:.2f}x | {acceptance:.0%} | {per_step:.2f} | "
              f"{'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
