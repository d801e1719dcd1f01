"""Helpers shared by the tests that start Ray clusters and servers."""

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import torch
import transformers

from raytp.weights.tokenizer import Tokenizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raytp_segments() -> set[str]:
    """raytp's shared-memory segments now in /dev/shm, by their name (there should be none left behind). Files of
    other names (multiprocessing's `sem.mp-*`...) are told apart by `shm_files_mapped_by` instead: other test runs
    on the machine create such files meanwhile."""
    return {n for n in os.listdir("/dev/shm") if n.startswith("raytp-")}


def shm_files_mapped_by(processes) -> set[str]:
    """Every file in /dev/shm that these psutil processes map now (any name: raytp's segments, multiprocessing's
    semaphores...). Taken while they run, it tells which of the files appearing in /dev/shm are theirs: other test
    runs on the machine create files there meanwhile, and a file cannot be traced to its creator once it is gone."""
    names = set()
    for process in processes:
        try:
            maps = process.memory_maps(grouped=False)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        names |= {m.path.removeprefix("/dev/shm/") for m in maps if m.path.startswith("/dev/shm/")
                  and not m.path.endswith("(deleted)")}
    return names


def transformers_greedy(model_dir, prompt: str, max_tokens: int) -> list[int]:
    """transformers' greedy continuation of `prompt`: max_tokens ids, fewer if it stops at end-of-sequence."""
    tokenizer = Tokenizer.from_dir(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer.encode(prompt)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=sorted(tokenizer.eos_token_ids))
    return out[0, len(ids):].tolist()


SERVED_DEVICES = "cpu@2GiB,cpu@1GiB"
SERVED_API_KEY = "sk-raytp-test"

# The caller's RAY_AUTH_MODE=disabled: a Ray the tests start themselves; one that raytp starts ignores it.
RAYTP_ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}


def raytp_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "raytp", *args]


@contextmanager
def serve_process(log_path: Path, *args: str, headers: dict | None = None, timeout_s: float = 300):
    """`raytp serve ARGS --port P` on a free port, answering /v1/models; yields (process, base URL). The caller
    may stop it as its test needs; one still running on exit gets SIGTERM (a clean shutdown stops the Ray it
    started), then SIGKILL after 90 s."""
    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(raytp_command("serve", *args, "--port", str(port)), stdout=log,
                                stderr=subprocess.STDOUT, env=RAYTP_ENV)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                pytest.fail(f"raytp serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"raytp serve did not answer within {timeout_s:.0f} s:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/v1/models", headers=headers or {}, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass(frozen=True)
class RayHead:
    """A Ray head the tests started: `address` for --address and ray.init, `dashboard` for `ray job submit`."""

    address: str
    dashboard: str
    pid: int

    def processes(self) -> list[psutil.Process]:
        """Its processes: gcs_server, raylet, agents and the workers that hold actors."""
        root = psutil.Process(self.pid)
        return [root, *root.children(recursive=True)]


def _start_ray_head(log_path: Path) -> tuple[subprocess.Popen, RayHead] | None:
    """`ray start --head --block` in its own session, once it says it started; None if it gave up."""
    port, dash = free_port(), free_port()
    others = [f"--{name}={free_port()}" for name in ("ray-client-server-port", "dashboard-agent-listen-port",
                                                      "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                                      "metrics-export-port")]
    with open(log_path, "w") as log:
        head = subprocess.Popen(["ray", "start", "--head", "--block", f"--port={port}", "--num-cpus=32",
                                 "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", *others,
                                 "--disable-usage-stats"],
                                env=RAYTP_ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while "Ray runtime started." not in log_path.read_text():
        if head.poll() is not None:
            return None
        if time.monotonic() > deadline:
            _stop_ray_head(head)
            raise RuntimeError(f"the test's Ray head did not start in 180 s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)
    return head, RayHead(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", head.pid)


def _stop_ray_head(head: subprocess.Popen) -> None:
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=10)
    except subprocess.TimeoutExpired:  # Ray's own shutdown can wait ~30 s on idle workers: end its session now
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)


@contextmanager
def ray_head_process(log_path: Path):
    """A Ray head of the tests' own (32 CPU slots: 12 ranks fit on 2 cores beside the shared server; auth off, as
    RAYTP_ENV), ended by signal: `ray stop` would end every Ray cluster on the machine, other people's included.
    Every port is a free one: another Ray on the machine may hold a default (the dashboard agent's 52365, the client
    server's 10001), and `--block` ends the whole head when one of its processes cannot bind. Ray gives its raylet
    30 s to register (ray._private.node), which a loaded machine can miss: a start that gives up is tried once more."""
    started = _start_ray_head(log_path) or _start_ray_head(log_path)
    if started is None:
        raise RuntimeError(f"the test's Ray head did not start, twice:\n{log_path.read_text()[-3000:]}")
    head, info = started
    try:
        yield info
    finally:
        _stop_ray_head(head)


@contextmanager
def running_server(log_path: Path, *extra: str, stop_signal=signal.SIGTERM, api_key: str | None = None):
    """`raytp serve` of SmolLM2 in float32 over SERVED_DEVICES, as a subprocess on a free port; yields (process,
    base URL). On exit: stop it with `stop_signal`, expect a clean exit, and nothing left in /dev/shm: no raytp
    segment, no file that serve's processes mapped (with a Ray it started itself, its actors are among them)."""
    segments = raytp_segments()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with serve_process(log_path, "--model", "smollm2", "--devices", SERVED_DEVICES, "--dtype", "float32", *extra,
                       headers=headers) as (proc, url):
        try:
            yield proc, url
        finally:
            root = psutil.Process(proc.pid)
            ours = shm_files_mapped_by([root, *root.children(recursive=True)])
            proc.send_signal(stop_signal)
            try:
                rc = proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
    assert rc == 0, f"raytp serve exited with {rc} on {stop_signal.name}:\n{log_path.read_text()[-3000:]}"
    left = (raytp_segments() - segments) | (ours & set(os.listdir("/dev/shm")))
    assert not left, f"shared memory left behind in /dev/shm: {sorted(left)}"
