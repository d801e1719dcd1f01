"""Ray for one command: join the cluster the user names, or start a local one (127.0.0.1 only, token
authentication) and shut it down on exit; then the driver actor that runs the model, and its log lines."""

from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from raytp.cli.common import DriverDied, UserError, first_line, plural, resolve_devices
from raytp.parallel.devices import is_auto, parse_devices

TOKEN_FILE = "ray-auth-token"  # under $RAYTP_HOME: the token of every local Ray that raytp starts
# Ray prints this for every worker that dies, with a page of advice; raytp names the rank or driver itself
RAY_WORKER_DIED = "A worker died or was killed"


def check_reachable(address: str) -> None:
    """Fail in seconds, not after Ray's minute of retries, when nothing listens at HOST:PORT."""
    host, _, port = address.rpartition(":")
    if "://" in address or not port.isdigit():
        return  # ray://, "auto" and the like: let Ray resolve them
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as e:
        raise UserError(f"cannot reach the Ray cluster at --address {address!r} ({e.strerror or e}); "
                        "start one with `ray start --head` or omit --address to run locally") from None


def token_auth_hint() -> str:
    """Why a join may have failed that Ray's own error leaves out: a cluster with token authentication refuses a
    client without a token, and Ray reports that as an unreachable cluster."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        return ""
    return ("; if that cluster uses token authentication (its `ray start` ran with RAY_AUTH_MODE=token), set "
            "RAY_AUTH_MODE=token here too, with its token in ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN")


def ray_token_file() -> Path:
    """The token of the local Rays raytp starts: made once, mode 0600 from its first byte on."""
    from raytp.weights.smollm2 import raytp_home

    path = raytp_home() / TOKEN_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # mkstemp creates the file 0600; linking it into place is atomic and never replaces a token that a
        # concurrent raytp made first, so no process ever reads a partial or world-readable token
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{TOKEN_FILE}.")
        try:
            os.write(fd, os.urandom(32).hex().encode())
            os.close(fd)
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise UserError(f"the Ray token {path} is readable by others (mode {mode:o}); chmod 600 {path}")
    return path


@contextmanager
def local_ray_environment():
    """Environment for a Ray of our own: token authentication with raytp's token, every socket on 127.0.0.1.

    Ray reads both settings from the environment (its processes inherit it) and, in this process, when `ray` is
    imported: `raytp` imports it after this, but a caller that imported it before (tests calling main()) gets
    Ray's cached config refreshed the way Ray's own `ray.init` does when it turns token auth on. Restored on exit,
    so a later join of another cluster in this process sees the caller's settings."""
    settings = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(ray_token_file()), "RAY_AUTH_TOKEN": None,
                # Ray's switch for single-machine clusters: the node address is 127.0.0.1, so every gRPC server,
                # agent and worker binds loopback only
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    saved = {k: os.environ.get(k) for k in settings}

    def apply(values: dict) -> None:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if "ray" in sys.modules:
            from ray._private import ray_constants
            from ray._raylet import AuthenticationTokenLoader, Config

            Config.initialize("")
            ray_constants.ENABLE_RAY_CLUSTER = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1") != "0"
            # the token it loaded for our Ray would be sent to the next cluster this process joins, and refused
            AuthenticationTokenLoader.instance().reset_cache()

    apply(settings)
    try:
        yield
    finally:
        apply(saved)


def _drop_ray_worker_died_lines() -> None:
    """Keep Ray's error stream but drop its RAY_WORKER_DIED reports, and send everything Ray prints to stderr:
    stdout is the answer's (`generate --json` is one JSON document), where the raylet's warnings would land. Ray
    prints from a thread of its own with no filter hook, so its printer is wrapped (once per process: main() may
    run more than once)."""
    from ray._private import worker

    if getattr(worker.print_to_stdstream, "drops_worker_died", False):
        return
    original = worker.print_to_stdstream

    def print_to_stdstream(data, ignore_prefix):
        lines = [line for line in data["lines"] if not line.startswith(RAY_WORKER_DIED)]
        if lines:
            original({**data, "lines": lines, "is_err": True}, ignore_prefix)

    print_to_stdstream.drops_worker_died = True
    worker.print_to_stdstream = print_to_stdstream


@contextmanager
def ray_session(address: str | None, devices_spec: str):
    """Join `address` as its owner set it up, or start a local Ray (loopback only, token auth) with enough CPU
    slots for every cpu rank."""
    with ExitStack() as local:
        if address:
            import ray

            print(f"raytp: joining the Ray cluster at {address}", file=sys.stderr)
            check_reachable(address)
            try:
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as e:
                raise UserError(f"cannot reach the Ray cluster at --address {address!r}: {first_line(e)}"
                                f"{token_auth_hint()}") from None
        else:
            local.enter_context(local_ray_environment())
            import ray

            print(f"raytp: starting Ray (local, 127.0.0.1 only, token auth: {os.environ['RAY_AUTH_TOKEN_PATH']})",
                  file=sys.stderr)
            cpu_ranks = sum(d.kind == "cpu" for d in parse_devices(devices_spec)) if not is_auto(devices_spec) else 1
            # address="local": always a fresh cluster of our own, never one another process left running
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, cpu_ranks), include_dashboard=False,
                     logging_level=logging.WARNING, log_to_driver=False)
        _drop_ray_worker_died_lines()
        try:
            yield
        finally:
            ray.shutdown()


@contextmanager
def running_driver(args):
    """A started driver actor for the args' model and devices; shut down on exit."""
    import ray

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from raytp.actors.driver import DriverActor
    from raytp.actors.group import GroupSettings

    settings = GroupSettings(model=args.model, devices=resolve_devices(args.devices), dtype=args.dtype,
                             kv_dtype=args.kv_dtype, comm=args.comm, max_context=args.max_context,
                             max_batch=args.max_batch, progress=False, options=args.options, split=args.split,
                             heartbeat_s=args.rank_timeout, speculate=args.speculate,
                             draft_model=args.draft_model)
    # on this node: the HTTP server it runs must listen on this machine, and a lost node must not take it along
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    driver = DriverActor.options(scheduling_strategy=here).remote(settings)
    try:
        start = driver.start.remote()
        while not ray.wait([start], timeout=0.5)[0]:  # the driver's phases (placing, loading) as they happen
            print_driver_logs(driver)
        info = ray.get(start)
        print_driver_logs(driver)
        print(f"raytp: ready in {time.monotonic() - args.started:.0f} s: {plural(len(info['ranks']), 'rank')}, "
              f"all-reduce {info['backend']}", file=sys.stderr)
        yield driver, info
    finally:
        try:
            ray.get(driver.shutdown.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - the driver may be what failed; ray.shutdown cleans up after it
            pass


def print_driver_logs(driver, timeout: float = 60) -> None:
    """Print the driver's `raytp` log lines since the last call; DriverDied when the driver is gone, or hung for
    `timeout` (its event loop answers in milliseconds: the heavy work runs in the ranks and in threads)."""
    import ray

    try:
        lines = ray.get(driver.take_logs.remote(), timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise DriverDied(f"the driver actor did not answer within {timeout:.0f} s") from None
    except ray.exceptions.RayActorError as e:
        raise DriverDied(f"the driver actor died ({first_line(e)})") from None
    for line in lines:
        print(f"raytp: {line}", file=sys.stderr, flush=True)
