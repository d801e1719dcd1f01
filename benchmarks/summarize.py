"""Merge the per-step `raytp bench` JSON files of gpu_run.sh into one file and print the short table.

    python benchmarks/summarize.py RESULTS_DIR OUT.json

Correctness: every `tiny_*` step's greedy tokens (batch 1 and request 0 of the larger batch) must equal tiny_tp1's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(src: str, dst: str) -> int:
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(Path(src).glob("*.json"))}
    extra = {name: Path(src, f"{name}.txt").read_text().splitlines() for name in ("failed", "skipped")
             if Path(src, f"{name}.txt").exists()}
    ref = runs.get("tiny_tp1")
    ref_tokens = ref["decode"][0]["greedy_tokens"] if ref else None
    correctness = {}
    for name, r in runs.items():
        if name.startswith("tiny_"):
            # None: no tiny_tp1 reference to compare with
            correctness[name] = None if ref_tokens is None else all(d["greedy_tokens"] == ref_tokens for d in r["decode"])
    Path(dst).write_text(json.dumps({"runs": runs, "correctness": correctness} | extra, indent=2))

    print(f"{'step':<18} {'backend':<10} {'ranks':>5} {'batch':>5} {'ms/token':>9} {'tokens/s':>9} {'roofline':>8} "
          f"{'AR us 8192':>10} {'bw TB/s':>7}  tokens")
    for name, r in runs.items():
        ar = r["allreduce_us"]["rank0"].get("8192")
        for d in r["decode"]:
            ok = {None: "no ref", True: "same", False: "DIFFER"}.get(correctness.get(name), "") if name in correctness else ""
            print(f"{name:<18} {r['backend']:<10} {len(r['devices']):>5} {d['batch']:>5} {d['ms_per_step']:>9.2f} "
                  f"{d['tokens_per_s']:>9.1f} {100 * d['roofline_fraction']:>7.1f}% "
                  f"{(f'{ar:.1f}' if ar else '-'):>10} {min(r['bandwidth_bytes_per_s']) / 1e12:>7.2f}  {ok}")
    for name, lines in extra.items():
        print(f"{name}: " + "; ".join(lines))
    return 0 if all(v is not False for v in correctness.values()) and "failed" not in extra else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
