"""When a Triton kernel runs instead of its torch version: on CUDA tensors, with Triton installed, unless this
process switched Triton off (`set_triton(False)`, which each rank calls once from RuntimeOptions.triton; the
torch versions then run everywhere: for debugging, and to compare the two on a GPU). Some kernels need more of the
GPU than that, checked here once per device: the FP8 KV cache's (raytp.kernels.kv_fp8) a GPU that converts e4m3 in
hardware, and torch._grouped_mm (raytp.kernels.moe_gemv) Hopper's CUTLASS kernel."""

from __future__ import annotations

from functools import cache

import torch

try:
    import triton
except ImportError:  # CPU-only installs: every kernel's torch version runs
    triton = None

# Per process, not per call: a rank sets it once before its first forward, and a kernel call must not pay for a
# lookup (the decode step makes hundreds of them).
_enabled = triton is not None

FP8_CAPABILITY = (8, 9)  # Ada and Hopper convert e4m3 in hardware; before them Triton would emulate it per element
GROUPED_MM_CAPABILITY = (9, 0)  # torch._grouped_mm's CUTLASS kernel; before Hopper torch loops and syncs


def set_triton(enabled: bool) -> None:
    """Use the Triton kernels in this process (where Triton is installed) or the torch versions everywhere."""
    global _enabled
    _enabled = enabled and triton is not None


def use_triton(t: torch.Tensor) -> bool:
    return _enabled and t.is_cuda


def use_triton_fp8_kv(t: torch.Tensor) -> bool:
    """Whether the FP8 KV cache's Triton kernels run for tensors like t."""
    return use_triton(t) and _capability(t.device.index) >= FP8_CAPABILITY


def grouped_mm_runs(t: torch.Tensor) -> bool:
    """Whether torch._grouped_mm runs as one kernel without a host sync for tensors like t: bfloat16 on a GPU of
    compute capability 9.0 or later (before Hopper torch loops over the groups and syncs)."""
    return t.is_cuda and t.dtype == torch.bfloat16 and _capability(t.device.index) >= GROUPED_MM_CAPABILITY


@cache  # a device's capability does not change; asking CUDA every call would cost each decode step's kernels
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)
