"""What every part of the `raytp` command shares: its constants, its two errors, and how an error becomes one line."""

from __future__ import annotations

from raytp.parallel.devices import DeviceSpecError, is_auto, parse_devices

DTYPES = ("float32", "bfloat16", "float16")
SPLITS = ("memory", "speed")
CPU_RANKS_PER_CORE = 4  # a local Ray refuses more cpu ranks than this per core: each rank spins in its collectives


class UserError(Exception):
    """Printed as one line; exit status 2."""


class DriverDied(Exception):
    """The driver actor is gone while serving; printed as one line, exit status 1."""


def user_message(e: BaseException) -> str | None:
    """The one-line message of an error caused by the input, unwrapping Ray's task errors; else None."""
    if isinstance(e, (UserError, DeviceSpecError)):  # before the imports below, which take seconds
        return str(e).strip()
    from raytp.actors.group import ClusterError
    from raytp.parallel.comm import CommError
    from raytp.model.config import UnsupportedModelError
    from raytp.weights.checkpoint import CheckpointError

    cause = getattr(e, "cause", None)
    if cause is not None and cause is not e:
        return user_message(cause)
    if isinstance(e, (ValueError, ClusterError, CommError, UnsupportedModelError,
                      CheckpointError, FileNotFoundError, RuntimeError)) and not isinstance(e, NotImplementedError):
        return str(e).strip()
    return None


def plural(n: int, word: str) -> str:
    """`1 rank`, `2 ranks`."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def resolve_devices(spec: str):
    """Parse SPEC; `auto` becomes every GPU of the cluster, or one CPU rank without GPUs."""
    if is_auto(spec):
        import ray

        n = int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0
        spec = f"cuda*{n}" if n else "cpu"
    return tuple(parse_devices(spec))
