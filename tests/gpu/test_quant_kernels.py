"""The quantized matmul Triton kernels against their torch fallbacks, eager and inside a CUDA graph (GPU host only)."""

import pytest
import torch

from raytp.kernels import dequant_matmul as dm
from raytp.kernels import fp8_matmul as f8
from tests.test_quant_kernels import random_int_weight

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or dm.triton is None,
                                                 reason="needs CUDA and Triton")]


def int_case(out, cols, bits, group_size, group_start=0, sym=True, act_order=False, dtype=torch.bfloat16):
    packed, scales, zeros, g_idx = random_int_weight(out, cols, bits, group_size, group_start, sym, act_order, dtype)
    to = dict(device="cuda")
    return dict(qweight=packed.to(**to), scales=scales.to(**to), zeros=zeros.to(**to) if zeros is not None else None,
                bits=bits, group_size=group_size, group_start=group_start,
                g_idx=g_idx.to(**to) if g_idx is not None else None)


def assert_close_to_fallback(y, x, w):
    ref = dm.int_linear_torch(x, **w)
    # both round the same dequantized weights to the model dtype; only the summation order differs
    tol = dict(rtol=1e-4, atol=1e-4) if x.dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y, ref, **tol)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 4, 16])
@pytest.mark.parametrize("sym", [True, False])
def test_int_kernel_matches_fallback(bits, group_size, rows, sym):
    w = int_case(1000, 4096, bits, group_size, sym=sym)
    x = torch.randn(rows, 1, 4096, device="cuda", dtype=torch.bfloat16)
    assert_close_to_fallback(dm.int_linear(x, **w), x, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
# groups aligned to the packed words take the kernel's scale-per-word path; act-order and groups of 50 (from
# column 2) the scale-per-value one
@pytest.mark.parametrize("case", [dict(group_start=40, group_size=64), dict(act_order=True, group_size=128),
                                  dict(group_size=200), dict(group_size=50, group_start=2)])
def test_int_kernel_mid_group_slices_act_order_and_dtypes(dtype, case):
    w = int_case(300, 1600, 4, sym=False, dtype=dtype, **case)
    for rows in (1, 3):
        x = torch.randn(rows, 1600, device="cuda", dtype=dtype)
        assert_close_to_fallback(dm.int_linear(x, **w), x, w)


@pytest.mark.parametrize("launch", [dm.Launch(16, 256, 1), dm.Launch(32, 256, 4), dm.Launch(64, 128, 3),
                                    dm.Launch(16, 512, 2, num_warps=8)])
def test_every_launch_shape_gives_the_same_product(launch):
    """The benchmark's sweep tries these; a ragged last split (3 of 14336 columns) included."""
    w = int_case(4096, 14336, 4, 128)
    for rows in (1, 8):
        x = torch.randn(rows, 14336, device="cuda", dtype=torch.bfloat16)
        assert_close_to_fallback(dm.int_linear(x, **w, launch=launch), x, w)


def test_int_kernel_replays_in_a_cuda_graph():
    w = int_case(6144, 4096, 4, 128, sym=False)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        dm.int_linear(x, **w)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = dm.int_linear(x, **w)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, dm.int_linear(x, **w))  # same launch, same bits


def fp8_case(out, cols, per_channel):
    weight = (torch.randn(out, cols, device="cuda") * 50).to(torch.float8_e4m3fn)
    scale = (torch.rand(out, 1, device="cuda") + 0.5) * 1e-3 if per_channel else torch.tensor(3e-3, device="cuda")
    return weight, scale


@pytest.mark.parametrize("rows", [1, 4, 16])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_kernel_matches_fallback(rows, per_channel, dtype):
    weight, scale = fp8_case(1000, 4096, per_channel)
    x = torch.randn(rows, 4096, device="cuda", dtype=dtype)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(f8.fp8_linear(x, weight, scale), f8.fp8_linear_torch(x, weight, scale), **tol)


def test_fp8_kernel_decodes_every_byte_like_torch():
    """All 256 e4m3 codes but the two NaNs, one per output row: the integer decode against torch's float8 cast."""
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8, device="cuda")
    weight = torch.zeros(codes.numel(), 64, dtype=torch.uint8, device="cuda")
    weight[:, 5] = codes
    weight = weight.view(torch.float8_e4m3fn)
    x = torch.zeros(1, 64, device="cuda")
    x[0, 5] = 1
    got = f8.fp8_linear(x, weight, torch.ones(codes.numel(), 1, device="cuda"))
    assert torch.equal(got[0], weight[:, 5].float())


def test_fp8_kernel_replays_in_a_cuda_graph():
    weight, scale = fp8_case(6144, 4096, True)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        f8.fp8_linear(x, weight, scale)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = f8.fp8_linear(x, weight, scale)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, f8.fp8_linear(x, weight, scale))
