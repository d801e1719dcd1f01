"""When a Triton kernel runs instead of its torch version: on CUDA tensors, with Triton installed, unless
RAYTP_TRITON=0 (the torch versions then run everywhere: for debugging, and to compare the two on a GPU)."""

from __future__ import annotations

import os

import torch

try:
    import triton
except ImportError:  # CPU-only installs: every kernel's torch version runs
    triton = None


def use_triton(t: torch.Tensor) -> bool:
    return triton is not None and t.is_cuda and os.environ.get("RAYTP_TRITON", "1") != "0"
