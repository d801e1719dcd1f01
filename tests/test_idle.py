"""An idle `raytp serve` costs (almost) nothing: no rank spins while it waits for the next request."""

import time

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.util import SERVED_API_KEY, SERVED_DEVICES as DEVICES

IDLE_S = 10.0
MAX_CORE_FRACTION = 0.05  # of one core, per process


def _title(p: psutil.Process) -> str:
    return (p.cmdline() or [""])[0]


def _raytp_processes(serve: psutil.Process, ray_processes: list[psutil.Process]) -> list[psutil.Process]:
    """The serve process and its Ray actors (the driver and one per rank), found among the processes of the Ray it
    joined.

    Ray names an actor's process after the class it wraps and the method running (`ray::Worker.run`,
    `ray::Driver`); Ray's own daemons (gcs_server, raylet, its agents) are Ray's idle cost, not raytp's."""
    found = [serve]
    for p in ray_processes:
        try:
            if _title(p).startswith(("ray::Worker", "ray::Driver")):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def _wait_until_no_request_runs(url: str, timeout_s: float = 120) -> None:
    """The shared server may still be finishing what an earlier test abandoned: wait for its metrics to say no
    request runs or waits."""
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {SERVED_API_KEY}"}, timeout=30)
        samples = {s.name: s.value for family in text_string_to_metric_families(metrics.text) for s in family.samples}
        if samples["raytp_requests_running"] == samples["raytp_requests_waiting"] == 0:
            return
        assert time.monotonic() < deadline, f"the server was still busy after {timeout_s:.0f} s: {samples}"
        time.sleep(0.5)


@pytest.mark.slow
def test_idle_server_leaves_the_cores_alone(shared_server, ray_head):
    proc, url = shared_server
    _wait_until_no_request_runs(url)
    time.sleep(2)  # let start-up work (graph warm-up, first polls) finish before idling is measured
    procs = _raytp_processes(psutil.Process(proc.pid), ray_head.processes())
    ranks = [p for p in procs if _title(p).startswith("ray::Worker")]
    assert len(ranks) == len(DEVICES.split(",")), [_title(p) for p in procs]
    before = {p.pid: sum(p.cpu_times()[:2]) for p in procs}
    time.sleep(IDLE_S)
    usage = {f"{p.pid} {_title(p)[:40]}": (sum(p.cpu_times()[:2]) - before[p.pid]) / IDLE_S
             for p in procs}
    print("idle CPU, fraction of one core:", {k: round(v, 4) for k, v in usage.items()})
    busy = {k: v for k, v in usage.items() if v > MAX_CORE_FRACTION}
    assert not busy, f"busy while idle (fraction of one core over {IDLE_S:.0f} s): {busy}"
