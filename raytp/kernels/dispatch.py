"""When a Triton kernel runs instead of its torch version: on CUDA tensors, with Triton installed, unless this
process switched Triton off (`set_triton(False)`, which each rank calls once from RuntimeOptions.triton; the
torch versions then run everywhere: for debugging, and to compare the two on a GPU)."""

from __future__ import annotations

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
