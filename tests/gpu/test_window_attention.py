"""Sliding-window attention over a window cache on the GPU: the Triton decode kernel reads the ring (min(length,
window) cells, in ring order) and gives what the torch path gives, and both equal attention over the last `window`
positions of each sequence (GPU host only)."""

import pytest
import torch
import torch.nn.functional as F

from raytp.kernels import dispatch
from raytp.kernels.attention import cached_attention
from raytp.kernels.dispatch import triton
from raytp.model.kv_cache import WindowCache

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or triton is None,
                                                 reason="needs CUDA and Triton")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [37, 512])
def test_window_decode_kernel_equals_torch_and_the_last_window_positions(monkeypatch, dtype, window):
    B, n_q, n_kv, D = 3, 8, 2, 64
    lengths = torch.tensor([1300, 20, window + 1])  # wrapped many times, not yet full, just wrapped
    g = torch.Generator(device="cuda").manual_seed(window)
    keys, values = (torch.randn(B, n_kv, int(lengths.max()), D, device="cuda", generator=g).to(dtype) for _ in "kv")
    q = torch.randn(B, n_q, 1, D, device="cuda", generator=g).to(dtype)
    cache = WindowCache("auto", (B + 1, n_kv, window, D), dtype, torch.device("cuda"))
    slots = torch.tensor([2, 0, 1], device="cuda")
    for b, n in enumerate(lengths.tolist()):  # position p in cell p % window, the latest write winning
        for p in range(max(0, n - window), n):
            cache.k[slots[b], :, p % window], cache.v[slots[b], :, p % window] = keys[b, :, p], values[b, :, p]
    view = WindowCache.view(window, (lengths - 1).view(B, 1).cuda())
    triton_out = cached_attention(q, cache.k, cache.v, slots, view)
    monkeypatch.setattr(dispatch, "_enabled", False)
    torch_out = cached_attention(q, cache.k, cache.v, slots, view)
    for b, n in enumerate(lengths.tolist()):
        seen = slice(max(0, n - window), n)
        expected = F.scaled_dot_product_attention(q[b:b + 1], keys[b:b + 1, :, seen], values[b:b + 1, :, seen],
                                                  enable_gqa=True).transpose(1, 2).reshape(1, 1, n_q * D)
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(triton_out[b:b + 1].float(), expected.float(), **tol)
        torch.testing.assert_close(torch_out[b:b + 1].float(), expected.float(), **tol)
