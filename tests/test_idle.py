"""An idle `raytp serve` costs (almost) nothing: no rank spins while it waits for the next request."""

import time

import psutil
import pytest

from tests.test_serve import DEVICES
from tests.util import serve_process

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
    with serve_process(tmp_path / "serve.log", "--model", "smollm2", "--devices", DEVICES, "--dtype",
                       "float32") as (proc, _):
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
