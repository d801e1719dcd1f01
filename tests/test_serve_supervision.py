"""`raytp serve` as its operator sees it: the Ray it starts listens on loopback only and uses token
authentication, start-up reports its phases, the driver's log lines reach the terminal, a dead driver ends
`serve` with one line, and SIGTERM is a clean exit.

Ray's processes (gcs_server, raylet, agents, workers) are all descendants of the `raytp serve` process.
"""

from __future__ import annotations

import ipaddress
import signal
import stat
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from raytp.cli import TOKEN_FILE
from raytp.weights.smollm2 import raytp_home
from tests.util import serve_process

pytestmark = pytest.mark.slow

@contextmanager
def serving(log_path: Path, *extra: str):
    """`raytp serve` up and answering; yields (process, log path). The caller's RAY_AUTH_MODE=disabled (in
    RAYTP_ENV) must not reach the Ray that raytp starts itself."""
    with serve_process(log_path, "--model", "smollm2", "--devices", "cpu@2GiB,cpu@1GiB", "--dtype",
                       "float32", *extra) as (proc, _):
        yield proc, log_path


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


# every backend that runs on one node of CPU ranks (auto is hoststaged there; gloo opens torch.distributed's store
# and gloo's own connections)
@pytest.mark.parametrize("comm", ["auto", "gloo"])
def test_nothing_listens_beyond_loopback_and_sigterm_exits_cleanly(tmp_path, comm):
    with serving(tmp_path / "serve.log", "--comm", comm) as (proc, log_path):
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
