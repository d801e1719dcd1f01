"""An idle `raytp serve` costs (almost) nothing: no rank spins while it waits for the next request."""

import subprocess
import time

import httpx
import psutil
import pytest

from tests.test_serve import DEVICES, RAYTP_ENV, raytp_command
from tests.util import free_port

IDLE_S = 10.0
MAX_CORE_FRACTION = 0.05  # of one core, per process


def _title(p: psutil.Process) -> str:
    return (p.cmdline() or [""])[0]


def _raytp_processes(serve: psutil.Process) -> list[psutil.Process]:
    """The serve process and its Ray actors (the driver and one per rank), found among its descendants.

    Ray names an actor's process after the class it wraps and the method running (`ray::Worker.run`,
    `ray::Driver`); Ray's own daemons (gcs_server, raylet, its agents) are Ray's idle cost, not raytp's."""
    found = [serve]
    for p in serve.children(recursive=True):
        try:
            if _title(p).startswith(("ray::Worker", "ray::Driver")):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.mark.slow
def test_idle_server_leaves_the_cores_alone(smollm2_dir, tmp_path):
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(raytp_command("serve", "--model", "smollm2", "--devices", DEVICES, "--dtype",
                                              "float32", "--port", str(port)),
                                stdout=log, stderr=subprocess.STDOUT, env=RAYTP_ENV)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, f"raytp serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, \
                f"raytp serve did not answer within 300 s:\n{log_path.read_text()[-3000:]}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        time.sleep(2)  # let start-up work (graph warm-up, first polls) finish before idling is measured
        procs = _raytp_processes(psutil.Process(proc.pid))
        ranks = [p for p in procs if _title(p).startswith("ray::Worker")]
        assert len(ranks) == len(DEVICES.split(",")), [_title(p) for p in procs]
        before = {p.pid: sum(p.cpu_times()[:2]) for p in procs}
        time.sleep(IDLE_S)
        usage = {f"{p.pid} {_title(p)[:40]}": (sum(p.cpu_times()[:2]) - before[p.pid]) / IDLE_S
                 for p in procs}
        print("idle CPU, fraction of one core:", {k: round(v, 4) for k, v in usage.items()})
        busy = {k: v for k, v in usage.items() if v > MAX_CORE_FRACTION}
        assert not busy, f"busy while idle (fraction of one core over {IDLE_S:.0f} s): {busy}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
