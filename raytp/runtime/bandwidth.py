"""Device memory bandwidth, for the speed split: a large copy measured once per device model and cached.

The figure is the bench's copy bandwidth (bytes read plus written per second). It is cached under
`$RAYTP_HOME/bandwidth.json` by device name ("NVIDIA H200", "NVIDIA GeForce RTX 4090"), so a group measures a
kind of card once, ever; delete the file to measure again.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch

from raytp.parallel.comm.timing import synchronize
from raytp.weights.smollm2 import raytp_home

CACHE_FILE = "bandwidth.json"


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, iters: int = 10) -> float:
    """Bytes/s of `iters` copies of nbytes/2 bytes on `device`, counting bytes read and written."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    synchronize(device)
    elapsed = time.perf_counter() - start
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * (nbytes // 2) * iters / elapsed


def _cache_path() -> Path:
    return raytp_home() / CACHE_FILE


def cached_bandwidths() -> dict[str, float]:
    """Device name -> bytes/s measured before; a missing or unreadable cache is empty (it is only a cache)."""
    try:
        return {str(k): float(v) for k, v in json.loads(_cache_path().read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def remember_bandwidths(measured: dict[str, float]) -> None:
    """Add `measured` to the cache, written whole and renamed into place so readers never see half a file."""
    path = _cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{CACHE_FILE}.")
    with os.fdopen(fd, "w") as f:
        json.dump(cached_bandwidths() | measured, f, indent=2)
    os.replace(tmp, path)
