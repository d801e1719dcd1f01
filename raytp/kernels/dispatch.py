"""When a Triton kernel runs instead of its torch version: on CUDA tensors, with Triton installed, unless this
process switched Triton off (`set_triton(False)`, which each rank calls once from RuntimeOptions.triton; the
torch versions then run everywhere: for debugging, and to compare the two on a GPU)."""

from __future__ import annotations

import functools

import torch

try:
    import triton
except ImportError:  # CPU-only installs: every kernel's torch version runs
    triton = None

# Per process, not per call: a rank sets it once before its first forward, and a kernel call must not pay for a
# lookup (the decode step makes hundreds of them).
_enabled = triton is not None


def set_triton(enabled: bool) -> None:
    """Use the Triton kernels in this process (where Triton is installed) or the torch versions everywhere."""
    global _enabled
    _enabled = enabled and triton is not None


def use_triton(t: torch.Tensor) -> bool:
    return _enabled and t.is_cuda


def use_triton_fp8(t: torch.Tensor) -> bool:
    """As use_triton, for kernels that convert to or from Triton's float8 e4m3 type: compute capability 8.9 and up
    (Ada, Hopper) converts natively; older GPUs run the torch versions."""
    return use_triton(t) and _capability(t.device.index) >= (8, 9)


@functools.cache
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)
