"""Triton kernels against their torch fallbacks (GPU host only)."""

import pytest
import torch

from raytp.kernels import norm

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or norm.triton is None,
                                                 reason="needs CUDA and Triton")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 4096), (8, 1, 8192), (2, 37, 576)])
def test_add_rms_norm_kernel_matches_torch(dtype, shape):
    x, delta = torch.randn(shape, device="cuda").to(dtype), torch.randn(shape, device="cuda").to(dtype)
    w = (torch.rand(shape[-1], device="cuda") + 0.5).to(dtype)
    total, normed = norm.add_rms_norm(x, delta, w, 1e-5)
    assert torch.equal(total, x + delta)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(normed, norm.rms_norm_torch(x + delta, w, 1e-5), **tol)
    torch.testing.assert_close(norm.rms_norm(x, w, 1e-5), norm.rms_norm_torch(x, w, 1e-5), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_kernel_matches_torch(dtype):
    gate_up = torch.randn(8, 1, 2 * 1408, device="cuda").to(dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(norm.swiglu(gate_up), norm.swiglu_torch(gate_up), **tol)
