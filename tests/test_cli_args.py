"""Every bad argument is refused before Ray starts: one `raytp: error:` line naming the value, exit status 2, no
traceback, and without importing Ray (nor torch, where the check does not need it), which is what makes a mistake
cost a second rather than a cluster's start-up. Also the token file a local Ray uses, and the start-up environment
around it (no Ray here).

The refusals run in process (`cli.main`, with `ray.init` failing the test if reached); one subprocess runs the real
entry point over a refusal of each kind that needs no torch, for what only a fresh interpreter shows: the imports.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys

import pytest
import ray

from raytp import cli
from raytp.cli import checks, common, serving_checks, session

SMALL = ["--devices", "cpu@1GiB"]


@pytest.fixture(autouse=True)
def ray_never_starts(monkeypatch):
    """A refusal comes before Ray: a test whose command reaches `ray.init` fails."""
    def init(*args, **kwargs):
        pytest.fail(f"Ray was started (ray.init {args} {kwargs}) before the refusal")

    monkeypatch.setattr(ray, "init", init)


def refused(capsys, *argv: str) -> str:
    """`raytp ARGV` in process: exit status 2, one `raytp: error:` line and nothing else (no traceback); the line."""
    assert cli.main(list(argv)) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raytp: error: "), err
    return lines[0]


# `python -m raytp ARGV` for each ARGV of a JSON list, in one interpreter, the way `python -m` runs it: each one's
# exit status, its stderr, and the heavy modules imported by then (what was imported, not how long it took, is the
# property: timings on a loaded 2-core machine prove nothing).
ENTRY_POINT_PROBE = """
import contextlib, io, json, runpy, sys
results = []
for argv in json.loads(sys.argv[1]):
    sys.argv = ["raytp", *argv]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            runpy.run_module("raytp", run_name="__main__", alter_sys=True)
            code = None
        except SystemExit as e:
            code = e.code
    results.append({"code": code, "stderr": err.getvalue(),
                    "imported": [m for m in ("ray", "torch", "fastapi", "gradio") if m in sys.modules]})
print(json.dumps(results))
"""


def test_the_entry_point_refuses_in_one_line_importing_neither_ray_nor_torch():
    """A refusal of each kind that needs no torch (the sampling rules and the planner's model sizes live in modules
    that import it), through `python -m raytp`: exit status 2, one line, and neither Ray, torch nor the server
    imported by then."""
    cpu_ranks = common.CPU_RANKS_PER_CORE * (os.cpu_count() or 1) + 1
    refusals = [["generate", "--prompt", "hi", *SMALL, "--max-tokens", "300", "--max-context", "256"],
                ["bench", "--model", "synthetic:tiny", *SMALL, "--profile", "-1"],
                ["bench", "--model", "synthetic:tiny", "--quant", "int4", *SMALL],
                ["chat", "--devices", f"cpu*{cpu_ranks}"],
                ["generate", "--prompt", "hi", "--devices", "cpu@999999GiB"],
                ["generate", "--prompt", "hi", "--devices", "cpu*99999999999"],
                ["generate", "--prompt", "hi", "--devices", "gpu*2"],
                ["generate", "--prompt", "", *SMALL],
                ["serve", *SMALL, "--max-batch", "0"],
                ["serve", *SMALL, "--host", "192.0.2.77"],
                ["serve", *SMALL, "--api-key-file", "/nonexistent/key"]]
    run = subprocess.run([sys.executable, "-c", ENTRY_POINT_PROBE, json.dumps(refusals)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    for argv, result in zip(refusals, json.loads(run.stdout), strict=True):
        lines = result["stderr"].strip().splitlines()
        assert result["code"] == 2, (argv, result)
        assert len(lines) == 1 and lines[0].startswith("raytp: error: "), (argv, result)
        assert not result["imported"], f"raytp {' '.join(argv)} imported {result['imported']} before refusing"


@pytest.mark.parametrize("flag, value, named", [
    ("--temperature", "-1", "-1"),
    ("--top-p", "2", "2"),
    ("--top-k", "-3", "-3"),
    ("--repetition-penalty", "0", "0"),
    ("--max-tokens", "0", "0"),
])
def test_bad_sampling_argument(capsys, flag, value, named):
    line = refused(capsys, "generate", "--prompt", "hi", *SMALL, flag, value)
    assert f"got {named}" in line, line


def test_max_tokens_beyond_the_context_is_refused_not_clamped(capsys):
    line = refused(capsys, "generate", "--prompt", "hi", *SMALL, "--max-tokens", "300", "--max-context", "256")
    assert "--max-tokens 300" in line and "--max-context 256" in line, line


@pytest.mark.parametrize("args, named", [
    (["--profile", "-1"], "got -1"),
    (["--profile-traces", "--out", "x"], "--profile-traces saves the traces of --profile"),
    (["--profile", "--profile-traces"], "give --profile and --out DIR"),
    (["--decode-tokens", "3"], "--decode-tokens must be at least 4 to time whole-batch steps, got 3"),
])
def test_bad_bench_arguments(capsys, args, named):
    line = refused(capsys, "bench", "--model", "synthetic:tiny", *SMALL, *args)
    assert named in line, line


@pytest.mark.parametrize("quant, named", [
    ("none,w5a16", "unknown quantization 'w5a16'"),
    ("int4", "unknown quantization 'int4'"),
    (",", "no quantization"),
])
def test_bench_refuses_a_quantization_it_does_not_know(capsys, quant, named):
    line = refused(capsys, "bench", "--model", "synthetic:tiny", "--quant", quant, *SMALL)
    assert named in line and "of none, w4a16, w8a16, fp8" in line, line


def test_bench_quant_list_becomes_one_model_spec_per_quantization():
    assert checks.bench_models("synthetic:tiny", None) == ["synthetic:tiny"]
    assert checks.bench_models("synthetic:tiny@w8a16", None) == ["synthetic:tiny@w8a16"]  # the @ suffix alone
    assert checks.bench_models("synthetic:tiny", "w4a16") == ["synthetic:tiny@w4a16"]
    assert checks.bench_models("synthetic:tiny", " none, w4a16,none") == ["synthetic:tiny", "synthetic:tiny@w4a16"]
    for model in ("synthetic:tiny@w4a16", "smollm2"):
        with pytest.raises(common.UserError, match="applies to a synthetic model without an @ suffix"):
            checks.bench_models(model, "none,w4a16")


@pytest.mark.parametrize("command", [["plan"], ["generate", "--prompt", "hi"], ["chat"], ["serve"], ["bench"]])
def test_kv_dtype_on_every_command_that_builds_a_plan(command):
    parser = cli.build_parser()
    assert parser.parse_args(command).kv_dtype == "auto"
    assert parser.parse_args(command + ["--kv-dtype", "fp8"]).kv_dtype == "fp8"


def test_bad_kv_dtype_is_refused_with_the_choices(capsys):
    """argparse's refusal, as for --dtype: the usage, then one line naming the value and the choices."""
    with pytest.raises(SystemExit) as refusal:
        cli.main(["generate", "--prompt", "hi", "--kv-dtype", "fp4"])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert refusal.value.code == 2 and "Traceback" not in err, err
    assert "--kv-dtype: invalid choice: 'fp4'" in last and "auto" in last and "fp8" in last, last


def test_hf_peer_refuses_a_quantized_model(capsys):
    line = refused(capsys, "bench", "--model", "synthetic:tiny", "--quant", "none,w4a16", "--hf-peer", *SMALL)
    assert "--hf-peer runs transformers on dense weights" in line and "w4a16" in line, line


def test_hf_peer_refuses_a_synthetic_mixture_of_experts(capsys):
    line = refused(capsys, "bench", "--model", "synthetic:qwen3-30b-a3b", "--hf-peer", *SMALL)
    assert "synthetic: give a model directory" in line and "qwen3-30b-a3b" in line, line


def test_more_cpu_ranks_than_this_machine_runs(capsys):
    n = common.CPU_RANKS_PER_CORE * (os.cpu_count() or 1) + 1
    line = refused(capsys, "chat", "--devices", f"cpu*{n}")
    assert f"{n} cpu ranks" in line and f"{os.cpu_count()} CPU cores" in line, line


def test_cpu_caps_beyond_this_machines_memory(capsys):
    total_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    each = int(total_gib) + 1
    line = refused(capsys, "generate", "--prompt", "hi", "--devices", f"cpu@{each}GiB,cpu@1GiB")
    assert f"{each + 1:.2f} GiB" in line and "of memory" in line, line


def test_a_joined_cluster_is_not_measured_against_this_machine(monkeypatch):
    """With --address the ranks may live on other nodes: only the syntax is checked here."""
    args = cli.build_parser().parse_args(["generate", "--prompt-ids", "1", "--devices", "cpu*999", "--address",
                                          "10.0.0.1:6379", "--model", "synthetic:tiny"])
    monkeypatch.setattr(checks, "_check_model", lambda model: None)
    checks.check_args(args)


@pytest.mark.parametrize("host", ["999.1.1.1", "no-such-host.invalid"])
def test_host_that_is_not_an_address(capsys, host):
    line = refused(capsys, "serve", *SMALL, "--host", host)
    assert repr(host) in line and "--host" in line and "another server" not in line, line


def test_host_of_another_machine(capsys):
    line = refused(capsys, "serve", *SMALL, "--host", "192.0.2.77")  # TEST-NET-1: never this machine's
    assert "'192.0.2.77' is not an address of this machine" in line, line


def test_taken_port_keeps_its_message(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = refused(capsys, "serve", *SMALL, "--port", str(port))
    assert "another server" in line and str(port) in line and "--port" in line, line


def test_a_device_kind_raytp_does_not_know(capsys):
    line = refused(capsys, "generate", "--prompt", "hi", "--devices", "gpu*2")
    assert "unknown kind 'gpu'" in line, line


def test_an_address_where_no_cluster_listens(capsys):
    """Refused in seconds by a connection attempt, not after Ray's minute of retries (after the lines that say what
    the command is about to do)."""
    assert cli.main(["generate", "--model", "synthetic:tiny", "--prompt-ids", "1", "--devices", "cpu", "--address",
                     "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert "Traceback" not in err and line.startswith("raytp: error: "), err
    assert "cannot reach the Ray cluster at --address '127.0.0.1:1'" in line and "ray start --head" in line, line


@pytest.mark.parametrize("model", ["/nonexistent/model", "{tmp}"])
def test_model_that_is_not_a_model_directory(capsys, tmp_path, model):
    model = model.format(tmp=tmp_path)  # an existing directory without config.json
    line = refused(capsys, "generate", "--prompt", "hi", *SMALL, "--temperature", "0", "--model", model)
    assert model in line, line


def test_api_key_file(capsys, tmp_path):
    line = refused(capsys, "serve", *SMALL, "--api-key-file", str(tmp_path / "missing"))
    assert "missing" in line and "--api-key-file" in line, line
    (tmp_path / "empty").write_text("\n")
    assert "is empty" in refused(capsys, "serve", *SMALL, "--api-key-file", str(tmp_path / "empty"))
    (tmp_path / "key").write_text("sk-from-file\n")
    args = cli.build_parser().parse_args(["serve", "--api-key-file", str(tmp_path / "key")])
    assert serving_checks.api_key(args) == "sk-from-file"


def test_token_file_is_made_once_private(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYTP_HOME", str(tmp_path / "home"))
    old = os.umask(0)  # the file must be 0600 whatever the umask
    try:
        path = session.ray_token_file()
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text()
    assert len(token) == 64 and session.ray_token_file().read_text() == token  # made once, then reused
    assert [p.name for p in path.parent.iterdir()] == [session.TOKEN_FILE]  # no temporary file left behind


def test_token_file_readable_by_others_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYTP_HOME", str(tmp_path))
    (tmp_path / session.TOKEN_FILE).write_text("x" * 64)
    (tmp_path / session.TOKEN_FILE).chmod(0o644)
    with pytest.raises(common.UserError, match="chmod 600"):
        session.ray_token_file()


def test_local_ray_environment_is_restored(tmp_path, monkeypatch):
    """Token auth and loopback for our own Ray only: a later join of someone else's cluster sees the caller's
    settings again."""
    monkeypatch.setenv("RAYTP_HOME", str(tmp_path))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "someone-elses")
    with session.local_ray_environment():
        assert os.environ["RAY_AUTH_MODE"] == "token"
        assert os.environ["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / session.TOKEN_FILE)
        assert "RAY_AUTH_TOKEN" not in os.environ
    assert os.environ["RAY_AUTH_MODE"] == "disabled" and os.environ["RAY_AUTH_TOKEN"] == "someone-elses"
    assert "RAY_AUTH_TOKEN_PATH" not in os.environ


# ---- refused before Ray: each of these used to start Ray (or run out of memory) first ----------------------

def test_a_device_count_past_any_group_is_refused_not_allocated(capsys):
    line = refused(capsys, "generate", "--prompt", "hi", "--devices", "cpu*99999999999")
    assert "count must be in 1..1024, got 99999999999" in line, line


def test_top_k_beyond_the_vocabulary(capsys):
    vocab = 49152  # SmolLM2's, which the refusal reads from the model's config.json
    line = refused(capsys, "generate", "--prompt", "hi", *SMALL, "--top-k", str(10**12))
    assert "--top-k" in line and f"vocabulary size {vocab}" in line and str(10**12) in line, line
    assert cli.build_parser().parse_args(["generate", "--prompt", "hi", "--top-k", str(vocab)]).top_k == vocab


@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"], ["chat"], ["serve"]])
def test_max_batch_zero(capsys, command):
    line = refused(capsys, *command, *SMALL, "--max-batch", "0")
    assert "--max-batch must be >= 1, got 0" in line, line


def test_empty_prompt(capsys):
    line = refused(capsys, "generate", "--prompt", "", *SMALL)
    assert "--prompt is empty" in line, line


def test_devices_the_planner_knows_are_too_small(capsys):
    """`raytp plan` knows that 1 KiB holds no model: so does every command, before Ray. The planner's message
    (the need and the budget of each rank) is the refusal."""
    assert cli.main(["generate", "--prompt", "hi", "--devices", "cpu@1KiB"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raytp: error: does not fit") and "rank 0 cpu@1KiB" in err, err
    assert "starting Ray" not in err, err
    assert cli.main(["plan", "--devices", "cpu@1KiB", "--max-batch", "1"]) == 2
    assert capsys.readouterr().err == err  # the same verdict as `raytp plan`


def test_capped_ranks_are_planned_before_joining_a_cluster(capsys):
    """Ranks with @MEM caps have known budgets wherever they run: a model they cannot hold is refused before the
    join (the address here answers nobody, so a join would fail differently)."""
    assert cli.main(["generate", "--prompt", "hi", "--dtype", "float32", "--devices", "cpu@64MiB,cpu@32MiB",
                     "--address", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raytp: error: does not fit") and "rank 1 cpu@32MiB: needs" in err, err
    assert "joining" not in err, err


def test_token_auth_hint_when_joining_without_a_token(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert "RAY_AUTH_MODE=token" in session.token_auth_hint()
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert session.token_auth_hint() == ""


def test_a_reader_that_stops_early_gets_no_traceback():
    """`raytp plan --json | head`: the reader went away; raytp ends quietly, as a shell reports SIGPIPE."""
    proc = subprocess.Popen([sys.executable, "-m", "raytp", "plan", "--devices", "cpu@1GiB", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # gone before raytp writes
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and err == "", err


@pytest.mark.slow
def test_joining_a_token_cluster_without_a_token_says_so(tmp_path):
    """A Ray head with token authentication (started here, on loopback), joined without RAY_AUTH_MODE=token: the
    refusal names the missing setting instead of only 'cannot reach'."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(16).hex(),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    head = subprocess.Popen([sys.executable, "-c", "import ray, sys, time\n"
                             "ray.init(address='local', include_dashboard=False, num_cpus=1)\n"
                             "print(ray.get_runtime_context().gcs_address, flush=True)\n"
                             "sys.stdin.read()\n"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env)
    try:
        address = head.stdout.readline().strip()
        assert address, "the token-auth head did not start"
        run = subprocess.run([sys.executable, "-m", "raytp", "generate", "--prompt", "hi", "--devices", "cpu",
                              "--address", address], capture_output=True, text=True, timeout=300,
                             # the head is on loopback: the client needs Ray's loopback switch to reach it there
                             env={**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    finally:
        head.stdin.close()  # the head's ray.init shuts its cluster down when its process exits
        head.wait(timeout=120)
    error = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert error.startswith(f"raytp: error: cannot reach the Ray cluster at --address {address!r}"), error
    assert "set RAY_AUTH_MODE=token here too" in error, error
