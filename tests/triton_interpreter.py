"""Scripts that check Triton kernels under Triton's CPU interpreter, all in one process.

TRITON_INTERPRET=1 is read when a kernel is defined, so those checks cannot run in the pytest process; a process of
their own costs an interpreter, torch and Triton start-up each (seconds on 2 cores), so every collected check runs in
one: `run_interpreted` starts `python -m tests.triton_interpreter SCRIPTS RESULTS`, which runs each script in a
namespace of its own and records what it printed and, if it failed, its traceback. The checks share the process:
each patches only the dispatch of the module it checks.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_interpreted(scripts: list[str], timeout_s: float = 1200) -> dict[str, tuple[str, str]]:
    """script -> (what it printed, its traceback or "" if it passed), every script run under the interpreter."""
    with tempfile.TemporaryDirectory(prefix="raytp-interpreted-") as tmp:
        given, results = Path(tmp) / "scripts.json", Path(tmp) / "results.json"
        given.write_text(json.dumps(scripts))
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)  # this checkout first
        env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
        done = subprocess.run([sys.executable, "-m", "tests.triton_interpreter", str(given), str(results)], env=env,
                              capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
        if done.returncode != 0 or not results.exists():
            failed = f"the interpreter process exited with {done.returncode}:\n{done.stderr[-3000:]}"
            return {s: ("", failed) for s in scripts}
        return {s: tuple(r) for s, r in zip(scripts, json.loads(results.read_text()))}


def _run_each(scripts: list[str]) -> list[tuple[str, str]]:
    results = []
    for script in scripts:
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                exec(compile(script, "<interpreted check>", "exec"), {"__name__": "__interpreted__"})
            results.append((printed.getvalue(), ""))
        except Exception:  # noqa: BLE001 - a failed check is reported to its test; the next one still runs
            results.append((printed.getvalue(), traceback.format_exc()))
    return results


if __name__ == "__main__":
    scripts_path, results_path = sys.argv[1:]
    Path(results_path).write_text(json.dumps(_run_each(json.loads(Path(scripts_path).read_text()))))
