"""`raytp serve` as its operator sees it: the Ray it starts listens on loopback only and uses token
authentication, start-up reports its phases, the driver's log lines reach the terminal, a dead driver ends
`serve` with one line, and SIGTERM is a clean exit.

Ray's processes (gcs_server, raylet, agents, workers) are all descendants of the `raytp serve` process.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import json
import os
import re
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

from raytp.cli.session import TOKEN_FILE
from raytp.weights.smollm2 import raytp_home
from tests.util import RAYTP_ENV, raytp_segments, serve_process, shm_files_mapped_by

pytestmark = pytest.mark.slow

@contextmanager
def serving(log_path: Path, *extra: str):
    """`raytp serve` up and answering; yields (process, log path, base URL). The caller's RAY_AUTH_MODE=disabled (in
    RAYTP_ENV) must not reach the Ray that raytp starts itself."""
    with serve_process(log_path, "--model", "smollm2", "--devices", "cpu@2GiB,cpu@1GiB", "--dtype",
                       "float32", *extra) as (proc, url):
        yield proc, log_path, url


def tree(proc: subprocess.Popen) -> list[psutil.Process]:
    root = psutil.Process(proc.pid)
    return [root, *root.children(recursive=True)]


def ray_process(proc: subprocess.Popen, title: str) -> psutil.Process:
    """The descendant whose command line (Ray's process title, e.g. `ray::Worker.run`) contains `title`."""
    found = [p for p in tree(proc) if title in command_line(p)]
    assert found, f"no process {title!r} among {[command_line(p)[:60] for p in tree(proc)]}"
    return found[0]


def command_line(process: psutil.Process) -> str:
    """Its command line; "" for one that is gone or a zombie (a rank the test killed, not yet reaped)."""
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or address).is_loopback


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


# gloo: of the backends that run on one node of CPU ranks, the one that listens (torch.distributed's store and
# gloo's own connections); the host-staged one opens no socket
@pytest.mark.parametrize("comm", ["gloo"])
def test_nothing_listens_beyond_loopback_and_sigterm_exits_cleanly(tmp_path, comm):
    """SIGTERM also tells an open stream, with an error event and [DONE], before serve exits."""
    with serving(tmp_path / "serve.log", "--comm", comm) as (proc, log_path, url):
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

        with httpx.Client(timeout=120) as http, long_stream(http, url) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line).startswith("data: {")  # decoding
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert proc.wait(timeout=90) == 0, log_path.read_text()[-3000:]
    # the open stream is told, not cut
    assert rest[-1] == "data: [DONE]" and "shutting down" in error_event(rest)["message"], rest[-3:]
    assert "Traceback" not in log_path.read_text(), log_path.read_text()[-3000:]


def test_driver_logs_reach_the_terminal_and_a_dead_driver_tells_its_clients_and_ends_serve(tmp_path):
    """The driver killed with SIGKILL while a stream and a whole answer run: the stream gets one error event saying
    the driver died and serve is exiting, then [DONE]; the whole answer a 503 saying the same; serve exits with one
    line. Also: it leaves nothing in /dev/shm: no raytp segment, and no file that serve's processes mapped before the
    kill (the tokenizer processes' semaphores were such files)."""
    before = raytp_segments()
    with serving(tmp_path / "serve.log") as (proc, log_path, url), httpx.Client(timeout=120) as http, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        ray_process(proc, "ray::Worker").kill()  # the driver logs the rank's failure and rebuilds
        wait_for(lambda: "failed" in log_path.read_text() and "rank" in log_path.read_text(), 30,
                 f"the driver's report of the dead rank never reached the terminal:\n{log_path.read_text()}")
        wait_for(lambda: "serving again" in log_path.read_text(), 120, f"no rebuild:\n{log_path.read_text()}")

        ours = shm_files_mapped_by(tree(proc))
        whole = pool.submit(http.post, f"{url}/v1/completions", json={**LONG, "stream": False})
        with long_stream(http, url) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line).startswith("data: {")  # decoding
            wait_for(lambda: "raytp_requests_running 2.0" in http.get(f"{url}/metrics").text, 60,
                     "the whole answer never started")
            ray_process(proc, "ray::Driver").kill()
            start = time.monotonic()
            rest = [line for line in lines if line]
        answer = whole.result(timeout=30)
        rc = proc.wait(timeout=30)
        elapsed = time.monotonic() - start
    text = log_path.read_text()
    assert rest[-1] == "data: [DONE]", rest[-3:]
    assert re.fullmatch(DRIVER_DIED, error_event(rest)["message"]), rest[-3:]
    assert answer.status_code == 503 and re.fullmatch(DRIVER_DIED, answer.json()["error"]["message"]), answer.text
    assert "A worker died" not in text, text[-3000:]  # Ray's page of advice: raytp names the rank itself
    assert rc not in (0, None), text[-3000:]
    assert elapsed < 10, f"took {elapsed:.0f} s to notice"
    assert "raytp: error: the driver actor died" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    left = (raytp_segments() - before) | (ours & set(os.listdir("/dev/shm")))
    assert not left, f"left behind in /dev/shm: {sorted(left)}"


DRIVER_DIED = r"raytp serve's driver actor died \(killed, crashed or out of memory\): the request was not finished; " \
              r"serve is exiting"
INTERNALS = ("actor_id", "pid", "namespace", "ip:", "Traceback", "class_name", "\n")


LONG = {"model": "smollm2", "prompt": "Count: 1, 2, 3,", "max_tokens": 1500, "temperature": 0, "ignore_eos": True,
        "stream": True}


def long_stream(http: httpx.Client, url: str):
    return http.stream("POST", f"{url}/v1/completions", json=LONG)


def error_event(lines) -> dict:
    for line in lines:
        if line.startswith("data: {") and '"error"' in line:
            return json.loads(line.removeprefix("data: "))["error"]
    raise AssertionError("the stream ended without an error event")


def test_a_stopped_rank_is_found_by_heartbeat_and_failures_say_503_naming_the_rank(tmp_path):
    """A rank stopped with SIGSTOP (its peers wait for it in a collective) makes /health answer 503 at once, and is
    found by the driver's heartbeat, not by the collective's 30 s timeout; its requests fail with one line naming the rank; new requests get 503 with
    Retry-After while the group rebuilds; then it serves again. Killing every rank (the leader too) is reported
    the same way, without Ray's internals."""
    log_path = tmp_path / "serve.log"
    with serve_process(log_path, "--model", "smollm2", "--devices", "cpu@2GiB,cpu@1GiB", "--dtype", "float32") \
            as (proc, url), httpx.Client(timeout=120) as http:
        workers = [p for p in tree(proc) if "ray::Worker" in command_line(p)]
        assert len(workers) == 2, workers
        with long_stream(http, url) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line).startswith("data: {")  # decoding
            stopped = workers[1]
            stopped.suspend()
            try:
                asked = time.monotonic()
                at_once = http.get(f"{url}/health")  # before the heartbeat gives up on the rank (5 s)
                asked = time.monotonic() - asked
                error = error_event(lines)
                busy = http.post(f"{url}/v1/completions", json={"model": "smollm2", "prompt": "Hi", "max_tokens": 2})
                unhealthy = http.get(f"{url}/health")
            finally:
                try:
                    stopped.resume()  # the driver kills it; were it still here, it must not stay stopped
                except psutil.NoSuchProcess:
                    pass
        assert re.fullmatch(r"rank [01] \(cpu@[12]GiB\) failed: it answered no heartbeat for 5 s \(stopped or "
                            r"stuck; --rank-timeout\); the group is rebuilding: retry shortly", error["message"]), error
        assert at_once.status_code == 503 and asked < 4, (asked, at_once.text)
        assert re.fullmatch(r"rank [01] \(cpu@[12]GiB\) did not answer within 1 s",
                            at_once.json()["error"]["message"]), at_once.text
        assert busy.status_code == 503 and busy.headers["Retry-After"], busy.text
        assert busy.json()["error"]["code"] == "unavailable" and error["message"] in busy.json()["error"]["message"]
        assert unhealthy.status_code == 503 and unhealthy.headers["Retry-After"], unhealthy.text

        wait_for(lambda: http.post(f"{url}/v1/completions", json={"model": "smollm2", "prompt": "Hi",
                                                                   "max_tokens": 2}).status_code == 200,
                 120, "the group never came back")
        assert http.get(f"{url}/health").status_code == 200
        assert "raytp_rebuilds_total 1.0" in http.get(f"{url}/metrics").text
        with long_stream(http, url) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line).startswith("data: {")
            for worker in [p for p in tree(proc) if "ray::Worker" in command_line(p)]:
                worker.kill()
            error = error_event(lines)
        assert re.fullmatch(r"rank [01] \(cpu@[12]GiB\) failed: .+; the group is rebuilding: retry shortly",
                            error["message"]), error
        assert not [x for x in INTERNALS if x in error["message"]], error
        wait_for(lambda: http.post(f"{url}/v1/completions", json={"model": "smollm2", "prompt": "Hi",
                                                                   "max_tokens": 2}).status_code == 200,
                 120, "the group never came back")
    assert "Traceback" not in log_path.read_text(), log_path.read_text()[-3000:]


def test_generate_on_a_terminal_prints_no_stray_escape_and_counts_ready_from_the_start(tmp_path):
    """On a terminal, nothing follows the answer (Ray's colorama used to reset colors raytp never set); "ready in
    N s" counts the whole wait, Ray's start-up included: at least the time to the line that says Ray started."""
    import pty

    master, slave = pty.openpty()
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "raytp", "generate", "--devices", "cpu", "--prompt", "Hi",
                             "--max-tokens", "3", "--temperature", "0"], stdout=slave, stderr=subprocess.PIPE,
                            env=RAYTP_ENV, text=True)
    os.close(slave)
    out = b""
    while chunk := _read_pty(master):
        out += chunk
    os.close(master)
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 0, err
    assert b"\x1b" not in out, out
    ready = re.search(r"ready in (\d+) s", err)
    assert ready, err
    placing = err.index("placing 1 rank\n")  # after Ray's start-up: the wait includes it
    assert ": 1 rank, all-reduce" in err, err
    assert placing < ready.start()
    assert int(ready.group(1)) <= time.monotonic() - started + 1  # and nothing before this process started


def _read_pty(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except OSError:  # the child closed its end
        return b""
