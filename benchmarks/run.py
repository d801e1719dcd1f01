"""Run one benchmark sitting: a YAML list of runs, each under its own time limit, logs under --out, a table last.

    python benchmarks/run.py benchmarks/sittings/one_gpu.yaml [--out DIR] [--only NAME,...] [--tar] [--check]

A sitting file (benchmarks/sittings/*.yaml):

    about: what the sitting measures and on which machine
    bench_defaults: --dtype bfloat16 --devices cuda:0     # prepended to every bench run's arguments
    runs:
      - name: llama8b_formats     # OUT/SITTING/NAME.log, and for a bench run its results in OUT/SITTING/NAME/
        limit: 200                # seconds; a run past it is stopped and the sitting goes on
        bench: --model synthetic:llama-3.1-8b --quant none,w4a16 --batch 1,8    # `raytp bench` arguments
      - name: gpu_tests
        limit: 540
        script: python3 -m pytest -q tests/gpu   # any command, run by bash from the repository root; its own
                                                 # files go to $RUN_OUT (OUT/SITTING/NAME/)

Every run is checked before the first one starts (bench arguments by raytp's own parser), so a typo costs no
device time. Bench runs share one Ray head (`ray start --head`, loopback only, token authentication with a token
made for the sitting), started once, joined with --address and ended with the sitting however it ends (its log:
OUT/SITTING/ray-head.log). The environment is a GPU host's (NVLink multicast off: it can take a shared host's GPUs
out of service) and, where Ray is not installed and the repository holds a `.whl` folder of wheels (a GPU host
without a package registry), Ray from those wheels. The table printed last has one line per run: its status, its
time, and for a bench run each configuration's ms/token, tokens/s, roofline fraction and prefill tokens/s; it is
also written to OUT/SITTING/SITTING.md (with --tar: OUT/SITTING.md beside OUT/SITTING.tgz).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SITE = Path(tempfile.gettempdir()) / "raytp_site"
RAY_HEAD_START_S = 180  # a head not started by then is tried once more
GPU_HOST_ENV = {"PYTHONUNBUFFERED": "1", "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                "NVSHMEM_DISABLE_NVLS": "1"}


class SittingError(ValueError):
    """A sitting file that cannot run: the message names the file, the run and the fix."""


@dataclass(frozen=True)
class Run:
    name: str
    limit: int  # seconds
    bench: tuple[str, ...] | None  # `raytp bench` arguments, defaults included, without --out
    script: str | None  # a bash command, run from the repository root


def check_bench_args(args: list[str]) -> str | None:
    """None if `raytp bench ARGS` parses with raytp's own parser, else its complaint."""
    from raytp.cli import build_parser

    for flag, what in (("--out", "OUT/NAME"), ("--address", "the sitting's Ray head")):
        if flag in args:
            return f"{flag} is set by the runner ({what})"
    complaint = io.StringIO()
    try:
        with contextlib.redirect_stderr(complaint):
            build_parser().parse_args(["bench", *args, "--out", "unused"])
    except SystemExit:
        return complaint.getvalue().strip().splitlines()[-1]
    return None


def load_sitting(path: Path) -> tuple[str, list[Run]]:
    """The sitting's description and its runs, every one checked; SittingError names the first that cannot run."""
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SittingError(f"{path}: not YAML: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("runs"), list) or not doc["runs"]:
        raise SittingError(f"{path}: expected a mapping with a non-empty list `runs`")
    unknown = set(doc) - {"about", "bench_defaults", "runs"}
    if unknown:
        raise SittingError(f"{path}: unknown keys {sorted(unknown)}; a sitting has about, bench_defaults, runs")
    defaults = shlex.split(doc.get("bench_defaults") or "")
    runs: list[Run] = []
    for i, item in enumerate(doc["runs"]):
        where = f"{path}: run {i + 1}"
        if not isinstance(item, dict):
            raise SittingError(f"{where}: expected a mapping with name, limit and bench or script")
        name = item.get("name")
        if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
            raise SittingError(f"{where}: name {name!r} must be letters, digits, '_' or '-' (it names files)")
        where = f"{path}: run {name!r}"
        if name in {r.name for r in runs}:
            raise SittingError(f"{where}: the name is used twice")
        unknown = set(item) - {"name", "limit", "bench", "script"}
        if unknown:
            raise SittingError(f"{where}: unknown keys {sorted(unknown)}; a run has name, limit, bench or script")
        limit = item.get("limit")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
            raise SittingError(f"{where}: limit {limit!r} must be a positive number of seconds")
        if ("bench" in item) == ("script" in item):
            raise SittingError(f"{where}: give exactly one of bench (raytp bench arguments) or script (a command)")
        if "bench" in item:
            args = [*defaults, *shlex.split(str(item["bench"]))]
            complaint = check_bench_args(args)
            if complaint:
                raise SittingError(f"{where}: raytp bench refuses its arguments: {complaint}")
            runs.append(Run(name, limit, tuple(args), None))
        else:
            runs.append(Run(name, limit, None, str(item["script"])))
    return str(doc.get("about", "")).strip(), runs


def gpu_host_environment() -> dict[str, str]:
    """The environment of every run: the GPU host's settings, the repository first on PYTHONPATH, and Ray from the
    carried wheels where it is not installed."""
    env = {**os.environ, **GPU_HOST_ENV}
    paths = [str(REPO)]
    sys.path[:0] = [str(REPO)]
    wheels = sorted((REPO / ".whl").glob("*.whl"))
    if wheels and subprocess.run([sys.executable, "-c", "import ray"], capture_output=True).returncode != 0:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(SITE), *map(str, wheels)], check=True)
        paths.insert(0, str(SITE))
        sys.path.insert(0, str(SITE))
    env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


class RayHeadError(RuntimeError):
    """The sitting's Ray head did not start: the message ends with its log."""


@dataclass(frozen=True)
class RayHead:
    """The sitting's Ray head: `ray start --head --block` in a session of its own, and what its runs need to join."""

    process: subprocess.Popen
    address: str  # 127.0.0.1:PORT, for --address
    env: dict[str, str]  # token authentication and loopback, for the runs that join it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_ray_head(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen, str] | None:
    """`ray start --head --block`, once it says it started; None if it gave up. Every port is a free one: another
    Ray on the host may hold a default, and `--block` ends the whole head when one of its processes cannot bind."""
    port = free_port()
    ports = [f"--{name}={free_port()}" for name in ("ray-client-server-port", "dashboard-agent-listen-port",
                                                     "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                                     "metrics-export-port")]
    with open(log_path, "a") as log:
        head = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                                 f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false", *ports,
                                 "--disable-usage-stats"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + RAY_HEAD_START_S
    while "Ray runtime started." not in log_path.read_text(errors="replace"):
        if head.poll() is not None or time.monotonic() > deadline:
            stop_ray_head(head)  # and whatever the failed start left running
            return None
        time.sleep(0.5)
    return head, f"127.0.0.1:{port}"


def start_ray_head(env: dict[str, str], workdir: Path) -> RayHead:
    """One Ray head for every bench run, on 127.0.0.1 with token authentication (a token made for the sitting); the
    runs join it with --address. A separate `ray start`, not `ray.init(address="local")` in this process, which
    timed out on a GPU host where `ray start --head` came up. Ray gives its raylet 30 s to register, which a loaded
    host can miss: a start that gives up is tried once more."""
    token = workdir / "ray-auth-token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    ray_env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # Ray's single-machine switch: every socket on 127.0.0.1
    ray_env.pop("RAY_AUTH_TOKEN", None)
    ray_env.pop("RAY_ADDRESS", None)  # the runs join this head, never one named by the caller's environment
    log = workdir / "ray-head.log"
    started = _launch_ray_head(ray_env, log) or _launch_ray_head(ray_env, log)
    if started is None:
        raise RayHeadError(f"the Ray head did not start, twice ({log}):\n{log.read_text(errors='replace')[-3000:]}")
    head, address = started
    return RayHead(head, address, ray_env)


def stop_ray_head(head: subprocess.Popen) -> None:
    """End the head and every process of its session by signal (`ray stop` would end every Ray on the host, other
    people's included); returns once none is left, or after 40 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):  # Ray's own shutdown can wait ~30 s on idle workers: not all
        head.wait(timeout=10)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # what outlived the head, or the head itself still shutting down
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        head.poll()  # reaps the head, which would otherwise stay in its session as a zombie
        time.sleep(0.2)


def run_one(run: Run, out: Path, env: dict[str, str], head: RayHead | None) -> tuple[str, float]:
    """Run `run` into OUT/NAME.log (and OUT/NAME/ for bench, on `head`); its status ("ok", "rc=N" or "timeout") and
    seconds."""
    if run.bench is not None:
        cmd = [sys.executable, "-m", "raytp", "bench", *run.bench, "--address", head.address, "--out",
               str(out / run.name)]
        env = head.env
    else:
        cmd = ["bash", "-c", run.script]
        (out / run.name).mkdir(exist_ok=True)
        env = {**env, "RUN_OUT": str(out / run.name)}
    start = time.monotonic()
    with open(out / f"{run.name}.log", "w") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        # a session of its own, so that a run past its limit is stopped with every process it started
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=run.limit)
            status = "ok" if rc == 0 else f"rc={rc}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            status = "timeout"
    return status, time.monotonic() - start


def bench_lines(folder: Path) -> list[str]:
    """One line per configuration of a bench run's results.csv (what ran, and why the rest was skipped)."""
    path = folder / "results.csv"
    if not path.exists():
        return ["(no results.csv)"]
    lines = []
    for row in csv.DictReader(path.open()):
        what = f"{row['devices']} {row['quant']} {row['backend']} p{row['prompt_len']} b{row['batch']}"
        if row["status"] != "ok":
            lines.append(f"{what}: {row['status']} {row['reason']}")
            continue
        prefill = float(row["prefill_tokens_per_s"] or "nan")
        lines.append(f"{what}: {float(row['ms_per_token']):.2f} ms/token, {float(row['tokens_per_s']):.1f} tokens/s, "
                     f"{float(row['roofline_fraction']):.1%} of roofline, prefill {prefill:.0f} tokens/s")
    return lines


def last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:160] if len(lines) > 1 else ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sitting", type=Path, help="a YAML file of runs, e.g. benchmarks/sittings/one_gpu.yaml")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmark-out")),
                   help="folder for the logs and results (default: $OUT, else ./benchmark-out)")
    p.add_argument("--only", default="", help="comma-separated run names to run, in the file's order")
    p.add_argument("--tar", action="store_true",
                   help="pack everything into OUT/SITTING.tgz beside OUT/SITTING.md (two files, for hosts that "
                        "send back few)")
    p.add_argument("--check", action="store_true", help="check the sitting file and exit")
    args = p.parse_args(argv)
    env = gpu_host_environment()
    try:
        about, runs = load_sitting(args.sitting)
    except SittingError as e:
        print(f"benchmarks/run.py: {e}", file=sys.stderr)
        return 2
    if args.only:
        wanted = args.only.split(",")
        missing = sorted(set(wanted) - {r.name for r in runs})
        if missing:
            print(f"benchmarks/run.py: --only names no run of {args.sitting}: {', '.join(missing)}", file=sys.stderr)
            return 2
        runs = [r for r in runs if r.name in wanted]
    if args.check:
        print(f"{args.sitting}: {len(runs)} runs, at most {sum(r.limit for r in runs)} s")
        return 0
    stem = args.sitting.stem
    out = (args.out / stem).resolve()
    out.mkdir(parents=True, exist_ok=True)
    table = [f"# {stem}: {about}", ""]
    head = None
    try:
        if any(r.bench for r in runs):
            try:
                head = start_ray_head(env, out)
            except RayHeadError as e:  # the scripts still run; each bench run says why it did not
                print(f"benchmarks/run.py: {e}", file=sys.stderr)
        for run in runs:
            if run.bench is not None and head is None:
                table.append(f"{run.name}: not run: the Ray head did not start (ray-head.log)")
                continue
            print(f"{run.name}: running (limit {run.limit} s)", flush=True)
            status, seconds = run_one(run, out, env, head)
            print(f"{run.name}: {status} in {seconds:.0f} s", flush=True)
            details = bench_lines(out / run.name) if run.bench else [last_line(out / f"{run.name}.log")]
            table += [f"{run.name}: {status} in {seconds:.0f} s"] + [f"    {d}" for d in details if d]
    finally:
        if head is not None:
            stop_ray_head(head.process)
        (out / "ray-auth-token").unlink(missing_ok=True)
    report = "\n".join(table) + "\n"
    (out / f"{stem}.md").write_text(report)
    if args.tar:
        with tarfile.open(args.out / f"{stem}.tgz", "w:gz") as tar:
            tar.add(out, arcname=stem)
        (args.out / f"{stem}.md").write_text(report)
        shutil.rmtree(out)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
