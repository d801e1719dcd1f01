"""Every bad argument is refused before Ray starts: one `raytp: error:` line naming the value, exit status 2, no
traceback, and without importing Ray (nor torch, where the check does not need it), which is what makes a mistake
cost a second rather than a cluster's start-up. Also the token file a local Ray uses, and the start-up environment
around it (no Ray here).
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys

import pytest

from raytp import cli
from raytp.cli import checks, common, serving_checks, session

SMALL = ["--devices", "cpu@1GiB"]

# Runs `python -m raytp ARGS` and then, however it ended, prints which heavy modules it had imported. What was
# imported, not how long it took, is the property: timings on a loaded 2-core machine prove nothing.
IMPORT_PROBE = """
import runpy, sys
try:
    runpy.run_module("raytp", run_name="__main__", alter_sys=True)
finally:
    print("imported:" + ",".join(m for m in ("ray", "torch", "fastapi", "gradio") if m in sys.modules))
"""


def run_cli(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """`python -m raytp ARGS` and the heavy modules it imported."""
    run = subprocess.run([sys.executable, "-c", IMPORT_PROBE, *args], capture_output=True, text=True, timeout=120)
    probe = [line for line in run.stdout.splitlines() if line.startswith("imported:")]
    assert probe, (run.stdout, run.stderr)
    return run, set(filter(None, probe[-1].removeprefix("imported:").split(",")))


def refused(*args: str, needs_torch: bool = False) -> str:
    """Run `python -m raytp ARGS`; assert the refusal's shape, and that it came before Ray (and before torch unless
    `needs_torch`: the sampling rules and the planner's model sizes live in modules that import it); return its one
    line."""
    run, imported = run_cli(*args)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stderr
    assert len(lines) == 1 and lines[0].startswith("raytp: error: "), run.stderr
    assert "ray" not in imported, f"Ray was imported before the refusal: {run.stderr}"
    assert not {"fastapi", "gradio"} & imported, f"the server was imported before the refusal: {imported}"
    if not needs_torch:
        assert "torch" not in imported, f"torch was imported before a refusal that does not need it: {run.stderr}"
    return lines[0]


@pytest.mark.parametrize("flag, value, named", [
    ("--temperature", "-1", "-1"),
    ("--top-p", "2", "2"),
    ("--top-k", "-3", "-3"),
    ("--repetition-penalty", "0", "0"),
    ("--max-tokens", "0", "0"),
])
def test_bad_sampling_argument(flag, value, named):
    line = refused("generate", "--prompt", "hi", *SMALL, flag, value, needs_torch=True)
    assert f"got {named}" in line, line


def test_max_tokens_beyond_the_context_is_refused_not_clamped():
    line = refused("generate", "--prompt", "hi", *SMALL, "--max-tokens", "300", "--max-context", "256")
    assert "--max-tokens 300" in line and "--max-context 256" in line, line


@pytest.mark.parametrize("args, named", [
    (["--profile", "-1"], "got -1"),
    (["--profile-traces", "--out", "x"], "--profile-traces saves the traces of --profile"),
    (["--profile", "--profile-traces"], "give --profile and --out DIR"),
])
def test_bad_profile_arguments(args, named):
    line = refused("bench", "--model", "synthetic:tiny", *SMALL, *args)
    assert named in line, line


@pytest.mark.parametrize("quant, named", [
    ("none,w5a16", "unknown quantization 'w5a16'"),
    ("int4", "unknown quantization 'int4'"),
    (",", "no quantization"),
])
def test_bench_refuses_a_quantization_it_does_not_know(quant, named):
    line = refused("bench", "--model", "synthetic:tiny", "--quant", quant, *SMALL)
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


def test_bad_kv_dtype_is_refused_with_the_choices():
    """argparse's refusal, as for --dtype: the usage, then one line naming the value and the choices."""
    run = subprocess.run([sys.executable, "-m", "raytp", "generate", "--prompt", "hi", "--kv-dtype", "fp4"],
                         capture_output=True, text=True, timeout=60)
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "--kv-dtype: invalid choice: 'fp4'" in last and "auto" in last and "fp8" in last, last


def test_hf_peer_refuses_a_quantized_model():
    line = refused("bench", "--model", "synthetic:tiny", "--quant", "none,w4a16", "--hf-peer", *SMALL,
                   needs_torch=True)
    assert "--hf-peer runs transformers on dense weights" in line and "w4a16" in line, line


def test_hf_peer_refuses_a_synthetic_mixture_of_experts():
    line = refused("bench", "--model", "synthetic:qwen3-30b-a3b", "--hf-peer", *SMALL, needs_torch=True)
    assert "synthetic: give a model directory" in line and "qwen3-30b-a3b" in line, line


def test_more_cpu_ranks_than_this_machine_runs():
    n = common.CPU_RANKS_PER_CORE * (os.cpu_count() or 1) + 1
    line = refused("chat", "--devices", f"cpu*{n}")
    assert f"{n} cpu ranks" in line and f"{os.cpu_count()} CPU cores" in line, line


def test_cpu_caps_beyond_this_machines_memory():
    total_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    each = int(total_gib) + 1
    line = refused("generate", "--prompt", "hi", "--devices", f"cpu@{each}GiB,cpu@1GiB")
    assert f"{each + 1:.2f} GiB" in line and "of memory" in line, line


def test_a_joined_cluster_is_not_measured_against_this_machine(monkeypatch):
    """With --address the ranks may live on other nodes: only the syntax is checked here."""
    args = cli.build_parser().parse_args(["generate", "--prompt-ids", "1", "--devices", "cpu*999", "--address",
                                          "10.0.0.1:6379", "--model", "synthetic:tiny"])
    monkeypatch.setattr(checks, "_check_model", lambda model: None)
    checks.check_args(args)


@pytest.mark.parametrize("host", ["999.1.1.1", "no-such-host.invalid"])
def test_host_that_is_not_an_address(host):
    line = refused("serve", *SMALL, "--host", host)
    assert repr(host) in line and "--host" in line and "another server" not in line, line


def test_host_of_another_machine():
    line = refused("serve", *SMALL, "--host", "192.0.2.77")  # TEST-NET-1: never this machine's
    assert "'192.0.2.77' is not an address of this machine" in line, line


def test_taken_port_keeps_its_message():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = refused("serve", *SMALL, "--port", str(port))
    assert "another server" in line and str(port) in line, line


@pytest.mark.parametrize("model", ["/nonexistent/model", "{tmp}"])
def test_model_that_is_not_a_model_directory(tmp_path, model):
    model = model.format(tmp=tmp_path)  # an existing directory without config.json
    line = refused("generate", "--prompt", "hi", *SMALL, "--temperature", "0", "--model", model,
                   needs_torch=True)
    assert model in line, line


def test_api_key_file(tmp_path):
    line = refused("serve", *SMALL, "--api-key-file", str(tmp_path / "missing"))
    assert "missing" in line and "--api-key-file" in line, line
    (tmp_path / "empty").write_text("\n")
    assert "is empty" in refused("serve", *SMALL, "--api-key-file", str(tmp_path / "empty"))
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

def test_a_device_count_past_any_group_is_refused_not_allocated():
    line = refused("generate", "--prompt", "hi", "--devices", "cpu*99999999999")
    assert "count must be in 1..1024, got 99999999999" in line, line


def test_top_k_beyond_the_vocabulary():
    vocab = 49152  # SmolLM2's, which the refusal reads from the model's config.json
    line = refused("generate", "--prompt", "hi", *SMALL, "--top-k", str(10**12), needs_torch=True)
    assert "--top-k" in line and f"vocabulary size {vocab}" in line and str(10**12) in line, line
    assert cli.build_parser().parse_args(["generate", "--prompt", "hi", "--top-k", str(vocab)]).top_k == vocab


@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"], ["chat"], ["serve"]])
def test_max_batch_zero(command):
    line = refused(*command, *SMALL, "--max-batch", "0")
    assert "--max-batch must be >= 1, got 0" in line, line


def test_empty_prompt():
    line = refused("generate", "--prompt", "", *SMALL)
    assert "--prompt is empty" in line, line


def test_devices_the_planner_knows_are_too_small():
    """`raytp plan` knows that 1 KiB holds no model: so does every command, before Ray. The planner's message
    (the need and the budget of each rank) is the refusal."""
    run, imported = run_cli("generate", "--prompt", "hi", "--devices", "cpu@1KiB")
    plan = subprocess.run([sys.executable, "-m", "raytp", "plan", "--devices", "cpu@1KiB", "--max-batch", "1"],
                          capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.startswith("raytp: error: does not fit") and "rank 0 cpu@1KiB" in run.stderr, run.stderr
    assert "starting Ray" not in run.stderr and "ray" not in imported, run.stderr
    assert run.stderr == plan.stderr, (run.stderr, plan.stderr)  # the same verdict as `raytp plan`


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
