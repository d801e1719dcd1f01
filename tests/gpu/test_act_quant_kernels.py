"""The activation-quantized matmul's cuBLAS paths (torch._scaled_mm for e4m3, torch._int_mm for int8) against its
torch path, eager and inside a CUDA graph, and the same weights repacked for the weight-only packed GEMV
(--weight-only-act-quant) against it (GPU host only)."""

import pytest
import torch

from raytp.kernels import act_quant_matmul as aq
from raytp.kernels import dispatch
from raytp.kernels.packed_gemv import runs_kernel
from raytp.model.formats import ActQuantWeight, PackedWeight, for_device

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
FP8_OK = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def weight(out: int, cols: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A random 8-bit weight with channel scales, quantized from N(0, 0.02^2) as llmcompressor does."""
    w = torch.randn(out, cols, device="cuda") * 0.02
    q, s = aq.quantize_per_token(w, dtype)  # the same symmetric per-row arithmetic
    return q, s


def check(dtype, out, cols, rows, x_dtype, want_path, amax=False):
    q, s = weight(out, cols, dtype)
    x = torch.randn(rows, cols, device="cuda", dtype=x_dtype)
    a = (x.float().abs().amax(-1, keepdim=True) * 1.5) if amax else None  # a row wider than this rank's part
    assert aq.route(x, q) == want_path
    got = aq.act_quant_linear(x, q, s, a)
    ref = aq.act_quant_linear_torch(x, q, s, a)
    assert got.dtype == x_dtype and got.shape == (rows, out)
    # the same quantized operands: only accumulation order (and bf16 output rounding) differ
    tol = dict(rtol=2e-2, atol=2e-2) if x_dtype == torch.bfloat16 else dict(rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(got, ref, **tol)


@pytest.mark.skipif(not FP8_OK, reason="float8 matmuls need compute capability 8.9")
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 64, 300])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_scaled_mm_matches_torch_path(rows, x_dtype):
    check(aq.E4M3, 1024, 4096, rows, x_dtype, "scaled_mm")


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 64, 300])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_int_mm_matches_torch_path(rows, x_dtype):
    check(torch.int8, 1024, 4096, rows, x_dtype, "int_mm")


@pytest.mark.parametrize("dtype", [torch.int8] + ([aq.E4M3] if FP8_OK else []))
def test_row_parallel_amax_and_odd_shapes(dtype):
    """The whole row's amax given by the caller; shapes the cuBLAS ops refuse fall back to the torch path."""
    check(dtype, 576, 192, 3, torch.bfloat16, "scaled_mm" if dtype == aq.E4M3 else "int_mm", amax=True)
    check(dtype, 100, 576, 3, torch.bfloat16, "torch")  # 100 outputs: not a multiple of 16
    q, s = weight(64, 0, dtype)  # a rank with no columns
    x = torch.randn(2, 0, device="cuda", dtype=torch.bfloat16)
    assert aq.route(x, q) == "torch"
    assert torch.equal(aq.act_quant_linear(x, q, s, torch.ones(2, 1, device="cuda")),
                       torch.zeros(2, 64, device="cuda", dtype=torch.bfloat16))


@pytest.mark.skipif(not FP8_OK, reason="float8 matmuls need compute capability 8.9")
def test_weight_only_route_below_the_measured_rows(monkeypatch):
    """Up to WEIGHT_ONLY_MAX_ROWS rows the fp8 weight-only kernel runs: x stays unquantized, so it is closer to the
    float product than the quantized path."""
    q, s = weight(1024, 4096, aq.E4M3)
    x = torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16)
    monkeypatch.setitem(aq.WEIGHT_ONLY_MAX_ROWS, aq.E4M3, 8)
    assert aq.route(x, q) == "weight-only" and aq.route(torch.randn(9, 4096, device="cuda"), q) == "scaled_mm"
    exact = x.float() @ (q.float() * s).t()
    torch.testing.assert_close(aq.act_quant_linear(x, q, s).float(), exact, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.int8] + ([aq.E4M3] if FP8_OK else []))
def test_inside_a_cuda_graph(dtype):
    q, s = weight(1024, 4096, dtype)
    x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
    eager = aq.act_quant_linear(x, q, s)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        aq.act_quant_linear(x, q, s)  # warm-up (cuBLAS workspaces) off the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = aq.act_quant_linear(x, q, s)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, aq.act_quant_linear(x, q, s), rtol=0, atol=0)
    assert not torch.equal(out, eager)


@pytest.mark.parametrize("quant", (["fp8-dynamic"] if FP8_OK else []) + ["w8a8"])
def test_graphed_decode_of_an_activation_quantized_model_matches_eager(quant):
    """The whole model (synthetic tiny, float32: _scaled_mm with unit scales, _int_mm) in the captured decode steps."""
    from tests.gpu.test_graphed_decode import generate

    model = f"synthetic:tiny@{quant}"
    assert generate(True, "hoststaged", model=model) == generate(False, "hoststaged", model=model)


@pytest.mark.skipif(aq.triton is None, reason="needs Triton")
@pytest.mark.parametrize("dtype", [torch.int8] + ([aq.E4M3] if FP8_OK else []))
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_triton_quantization_and_epilogue_give_the_torch_bits(dtype, x_dtype):
    """Rows of every magnitude, an all-zero row, values on rounding boundaries, a given amax, the padding rows."""
    x = torch.randn(37, 4096 + 16, device="cuda") * torch.logspace(-3, 3, 37, device="cuda")[:, None]
    x[5] = 0
    x[6] = torch.arange(4096 + 16, device="cuda") % 256 - 127.5  # amax 127.5: int8's scale 1, so halves to round
    x = x.to(x_dtype)
    for amax in (None, x.float().abs().amax(-1, keepdim=True) * 2):
        q, s = aq._quantize_padded(x, dtype, amax, 48)
        want_q, want_s = aq.quantize_per_token(x, dtype, amax)
        assert torch.equal(s[:37], want_s) and torch.equal(s[37:], torch.ones(11, 1, device="cuda"))
        assert torch.equal(q[:37].view(torch.int8), want_q.view(torch.int8))
        assert not q[37:].view(torch.int8).any()
    acc = torch.randint(-2 ** 24, 2 ** 24, (48, 1000), device="cuda", dtype=torch.int32)
    w_scale = torch.rand(1000, 1, device="cuda")
    got = aq._int_epilogue(acc, s, w_scale, 37, x_dtype)
    assert torch.equal(got, (acc[:37].float() * s[:37] * w_scale.t()).to(x_dtype))


@pytest.mark.skipif(dispatch.triton is None, reason="CUDA ranks repack only with the kernels on (Triton installed)")
@pytest.mark.parametrize("dtype", [torch.int8] + ([aq.E4M3] if FP8_OK else []))
@pytest.mark.parametrize("rows", [1, 3, 8, 16])
def test_weight_only_repacking_matches_the_act_quant_path(monkeypatch, dtype, rows):
    """--weight-only-act-quant: for_device repacks an ActQuantWeight on its GPU for the packed GEMV, whose CUDA kernel
    (x left in bfloat16) gives the act-quant path's product within what quantizing x changes, and the float product
    of the same weights within bfloat16's rounding."""
    monkeypatch.setattr(dispatch, "_weight_only_act_quant", True)  # restored after the test
    q, s = weight(1024, 4096, dtype)
    act_quant = ActQuantWeight(q, s)
    packed = for_device(act_quant, torch.bfloat16)
    assert isinstance(packed, PackedWeight) and packed.packed.kind == ("int8" if dtype == torch.int8 else "fp8")
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    assert runs_kernel(x, packed.packed)
    got, quantized = packed.apply(x).float(), act_quant.apply(x).float()
    exact = x.float() @ act_quant.dequantize().t()
    error = lambda y: ((y - exact).norm() / exact.norm()).item()  # noqa: E731
    # quantizing x per token moves the product by about 2.6% of its norm for e4m3 (3 mantissa bits), 0.9% for int8
    # (127 steps to a row's largest magnitude); the weight-only product only by bfloat16's roundings, 0.3%
    assert error(quantized) < (0.06 if dtype == aq.E4M3 else 0.02)
    assert error(got) < 0.01 and error(got) < error(quantized)
    torch.testing.assert_close(got, quantized, rtol=0, atol=(0.4 if dtype == aq.E4M3 else 0.15))
