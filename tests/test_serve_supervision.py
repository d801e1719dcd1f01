"""`raytp serve` as its operator sees it: the Ray it starts listens on loopback only and uses token
authentication, start-up reports its phases, the driver's log lines reach the terminal, a dead driver ends
`serve` with one line, and SIGTERM is a clean exit.

Ray's processes (gcs_server, raylet, agents, workers) are all descendants of the `raytp serve` process.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import stat
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest

from raytp.cli import TOKEN_FILE
from raytp.weights.smollm2 import raytp_home
from tests.util import free_port

pytestmark = pytest.mark.slow

# The caller's RAY_AUTH_MODE=disabled must not reach a Ray that raytp starts itself.
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}


@contextmanager
def serving(log_path: Path):
    """`raytp serve` on a free port, up and answering; yields (process, log path). Killed if still running."""
    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "raytp", "serve", "--model", "smollm2", "--devices",
                                 "cpu@2GiB,cpu@1GiB", "--dtype", "float32", "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, env=ENV)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, f"raytp serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"raytp serve did not answer:\n{log_path.read_text()[-3000:]}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield proc, log_path
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def tree(proc: subprocess.Popen) -> list[psutil.Process]:
    root = psutil.Process(proc.pid)
    return [root, *root.children(recursive=True)]


def ray_process(proc: subprocess.Popen, title: str) -> psutil.Process:
    """The descendant whose command line (Ray's process title, e.g. `ray::Worker.run`) contains `title`."""
    found = [p for p in tree(proc) if title in " ".join(p.cmdline())]
    assert found, f"no process {title!r} among {[' '.join(p.cmdline())[:60] for p in tree(proc)]}"
    return found[0]


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or address).is_loopback


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


def test_nothing_listens_beyond_loopback_and_sigterm_exits_cleanly(tmp_path):
    with serving(tmp_path / "serve.log") as (proc, log_path):
        procs = {p.pid: p for p in tree(proc)}
        names = {p.name() for p in procs.values()}
        assert {"gcs_server", "raylet"} <= names, names  # Ray's own processes are in the tree we inspect
        listening = [(c.laddr.ip, c.laddr.port, procs[c.pid].name()) for c in psutil.net_connections("inet")
                     if c.status == psutil.CONN_LISTEN and c.pid in procs]
        assert len(listening) >= 5, listening  # GCS, raylet, agents, workers, the HTTP server
        exposed = [s for s in listening if not is_loopback(s[0])]
        assert not exposed, f"listening beyond loopback: {exposed}"

        token = raytp_home() / TOKEN_FILE
        assert stat.S_IMODE(token.stat().st_mode) == 0o600
        gcs = next(p for p in procs.values() if p.name() == "gcs_server")
        assert gcs.environ().get("RAY_AUTH_MODE") == "token"
        assert gcs.environ().get("RAY_AUTH_TOKEN_PATH") == str(token)

        text = log_path.read_text()
        for phase in ("starting Ray (local, 127.0.0.1 only, token auth", "placing 2 ranks", "loading weights",
                      "ready in"):
            assert phase in text, f"no {phase!r} line:\n{text}"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, log_path.read_text()[-3000:]
    assert "Traceback" not in log_path.read_text(), log_path.read_text()[-3000:]


def test_driver_logs_reach_the_terminal_and_a_dead_driver_ends_serve(tmp_path):
    with serving(tmp_path / "serve.log") as (proc, log_path):
        ray_process(proc, "ray::Worker.").kill()  # the driver logs the rank's failure and rebuilds
        wait_for(lambda: "failed" in log_path.read_text() and "rank" in log_path.read_text(), 30,
                 f"the driver's report of the dead rank never reached the terminal:\n{log_path.read_text()}")

        ray_process(proc, "ray::Driver").kill()
        start = time.monotonic()
        rc = proc.wait(timeout=30)
        elapsed = time.monotonic() - start
    text = log_path.read_text()
    assert "A worker died" not in text, text[-3000:]  # Ray's page of advice: raytp names the rank itself
    assert rc not in (0, None), text[-3000:]
    assert elapsed < 10, f"took {elapsed:.0f} s to notice"
    assert "raytp: error: the driver actor died" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
