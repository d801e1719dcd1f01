"""benchmarks/run.py: every sitting file parses, its bench runs pass `raytp bench`'s own parser and its scripts name
files that exist; a bad file is refused with the run's name; runs are stopped at their limit and reported; bench runs
join the sitting's own Ray head, which ends with the sitting however it ends."""

from __future__ import annotations

import importlib.util
import os
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SITTINGS = sorted((REPO / "benchmarks" / "sittings").glob("*.yaml"))


def _runner():
    spec = importlib.util.spec_from_file_location("benchmarks_run", REPO / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


runner = _runner()


def test_there_are_sittings():
    assert {p.stem for p in SITTINGS} >= {"gpu_tests", "one_gpu", "moe", "kernels", "multi_gpu"}


@pytest.mark.parametrize("path", SITTINGS, ids=lambda p: p.stem)
def test_sitting_parses_and_names_only_real_flags_and_files(path):
    about, runs = runner.load_sitting(path)
    assert about and runs
    for run in runs:
        # one device call is at most 10 minutes: a sitting that could not finish in one would be cut off unreported
        assert sum(r.limit for r in runs) <= 600, path
        if run.script is not None:
            for word in shlex.split(run.script):
                if word.startswith(("benchmarks/", "tests/")):
                    assert (REPO / word.split("::")[0]).exists(), f"{path.name} {run.name}: {word} does not exist"


def _write(tmp_path, text):
    path = tmp_path / "sitting.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, expected", [
    ("runs:\n  - {name: a, limit: 5, bench: --model synthetic:tiny --no-such-flag}",
     "run 'a': raytp bench refuses its arguments: raytp: error: unrecognized arguments: --no-such-flag"),
    ("runs:\n  - {name: a, limit: 5, bench: --batch}", "run 'a': raytp bench refuses its arguments"),
    ("runs:\n  - {name: a, limit: 5, bench: --out x}", "--out is set by the runner"),
    ("runs:\n  - {name: a, limit: 5, bench: --address 127.0.0.1:6379}", "--address is set by the runner"),
    ("runs:\n  - {name: a, limit: 0, script: 'true'}", "limit 0 must be a positive number of seconds"),
    ("runs:\n  - {name: a, limit: 5}", "give exactly one of bench"),
    ("runs:\n  - {name: a, limit: 5, script: 'true', bench: ''}", "give exactly one of bench"),
    ("runs:\n  - {name: a, limit: 5, script: 'true'}\n  - {name: a, limit: 5, script: 'true'}", "used twice"),
    ("runs:\n  - {name: a/b, limit: 5, script: 'true'}", "must be letters, digits"),
    ("runs:\n  - {name: a, limt: 5, script: 'true'}", "unknown keys ['limt']"),
    ("bench_default: --repeats 1\nruns:\n  - {name: a, limit: 5, script: 'true'}", "unknown keys ['bench_default']"),
    ("runs: []", "non-empty list `runs`"),
    ("bench_defaults: --repeats one\nruns:\n  - {name: a, limit: 5, bench: --batch 1}",
     "argument --repeats: invalid int value: 'one'"),
])
def test_bad_sitting_is_refused_naming_the_run(tmp_path, text, expected):
    with pytest.raises(runner.SittingError) as refused:
        runner.load_sitting(_write(tmp_path, text))
    assert expected in str(refused.value)


def test_scripts_run_under_their_limit_and_the_table_comes_last(tmp_path, capsys):
    path = _write(tmp_path, "about: runner check\nruns:\n"
                            "  - {name: fine, limit: 20, script: 'echo hello > \"$RUN_OUT/file\"; echo done'}\n"
                            "  - {name: failing, limit: 20, script: 'exit 3'}\n"
                            "  - {name: slow, limit: 1, script: 'sleep 30'}\n")
    assert runner.main([str(path), "--out", str(tmp_path / "out")]) == 0
    out = tmp_path / "out" / "sitting"
    assert (out / "fine" / "file").read_text() == "hello\n"
    report = (out / "sitting.md").read_text()
    assert report.splitlines()[2:] == ["fine: ok in 0 s", "    done", "failing: rc=3 in 0 s", "slow: timeout in 1 s"]
    assert capsys.readouterr().out.endswith(report + "\n")


def test_only_names_runs_of_the_file(tmp_path, capsys):
    path = _write(tmp_path, "runs:\n  - {name: a, limit: 5, script: 'true'}\n")
    assert runner.main([str(path), "--only", "b", "--check"]) == 2
    assert "--only names no run" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_runs_join_the_sittings_ray_head_which_ends_with_the_sitting(tmp_path, monkeypatch):
    """A tiny bench run on CPU, end to end: the runner starts its Ray head (`ray start --head`, loopback, token
    authentication), the run joins it with --address and measures its configuration; the head and every process of
    its session end with the sitting, here cut short by Ctrl-C during the next run."""
    path = _write(tmp_path, "about: Ray head check\n"
                            "bench_defaults: --dtype float32 --devices cpu --repeats 1\n"
                            "runs:\n"
                            "  - name: tiny\n"
                            "    limit: 400\n"
                            "    bench: --model synthetic:tiny --batch 1 --prompt-len 8 --decode-tokens 4 "
                            "--allreduce-sizes 64 --allreduce-iters 2\n"
                            "  - {name: interrupted, limit: 20, script: 'true'}\n")
    heads, start_head, run_one = [], runner.start_ray_head, runner.run_one
    monkeypatch.setattr(runner, "start_ray_head", lambda *args: heads.append(start_head(*args)) or heads[-1])

    def run_until_interrupted(run, *args):
        if run.name == "interrupted":
            raise KeyboardInterrupt
        return run_one(run, *args)

    monkeypatch.setattr(runner, "run_one", run_until_interrupted)
    with pytest.raises(KeyboardInterrupt):
        runner.main([str(path), "--out", str(tmp_path / "out")])
    out = tmp_path / "out" / "sitting"
    assert heads, (out / "ray-head.log").read_text()[-3000:]
    head = heads[0]
    assert head.process.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(head.process.pid, 0)  # no process of the head's session is left
    assert not (out / "ray-auth-token").exists()
    assert head.address.startswith("127.0.0.1:") and head.env["RAY_AUTH_MODE"] == "token"
    log = (out / "tiny.log").read_text()
    assert f"--address {head.address}" in log.splitlines()[0], log[-3000:]
    (line,) = runner.bench_lines(out / "tiny")
    assert line.startswith("cpu none hoststaged p8 b1: ") and "ms/token" in line, (line, log[-3000:])


def test_a_head_that_does_not_start_costs_the_bench_runs_only(tmp_path, monkeypatch, capsys):
    """Ray giving up on its start (its raylet misses Ray's 30 s to register on a loaded host) is tried once more;
    if it fails again the scripts still run and each bench run says why it did not."""
    tries = []

    def gives_up(env, log):
        tries.append(env)
        log.write_text("The current node timed out during startup.\n")
        return None

    monkeypatch.setattr(runner, "_launch_ray_head", gives_up)
    path = _write(tmp_path, "runs:\n  - {name: bench, limit: 5, bench: --model synthetic:tiny}\n"
                            "  - {name: script, limit: 5, script: 'echo ran'}\n")
    assert runner.main([str(path), "--out", str(tmp_path / "out")]) == 0
    assert len(tries) == 2 and tries[0]["RAY_AUTH_MODE"] == "token"
    report = (tmp_path / "out" / "sitting" / "sitting.md").read_text()
    assert report.splitlines()[2:] == ["bench: not run: the Ray head did not start (ray-head.log)",
                                       "script: ok in 0 s", "    ran"]
    assert "the Ray head did not start, twice" in capsys.readouterr().err
    assert not (tmp_path / "out" / "sitting" / "ray-auth-token").exists()
