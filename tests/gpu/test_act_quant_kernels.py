"""FP8_DYNAMIC and W8A8 weights on a GPU (GPU host only): repacked for the weight-only packed GEMV, which every GPU
group runs, against the activation-quantized product the checkpoint's config describes and the float product; the
activation-quantized torch path (what --no-triton runs) on CUDA tensors; the whole model in captured decode steps."""

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


@pytest.mark.parametrize("dtype", [torch.int8, aq.E4M3])
def test_torch_path_on_cuda_equals_the_cpu_arithmetic(dtype):
    """--no-triton's path on a GPU: the CPU's arithmetic, a row-parallel amax given by the caller, a rank with no
    columns."""
    q, s = weight(576, 192, dtype)
    x = torch.randn(3, 192, device="cuda", dtype=torch.bfloat16)
    amax = x.float().abs().amax(-1, keepdim=True) * 1.5  # a row wider than this rank's part
    torch.testing.assert_close(aq.act_quant_linear(x, q, s, amax).cpu(),
                               aq.act_quant_linear(x.cpu(), q.cpu(), s.cpu(), amax.cpu()), rtol=1e-3, atol=1e-3)
    q, s = weight(64, 0, dtype)
    assert torch.equal(aq.act_quant_linear(torch.randn(2, 0, device="cuda", dtype=torch.bfloat16), q, s,
                                           torch.ones(2, 1, device="cuda")),
                       torch.zeros(2, 64, device="cuda", dtype=torch.bfloat16))


@pytest.mark.parametrize("quant", (["fp8-dynamic"] if FP8_OK else []) + ["w8a8"])
def test_graphed_decode_of_an_activation_quantized_model_matches_eager(quant):
    """The whole model (synthetic tiny, float32), weight-only as every GPU group runs it, in captured decode steps."""
    from tests.gpu.test_graphed_decode import generate, load

    model = f"synthetic:tiny@{quant}"
    lm, comm = load(model, "hoststaged")
    comm.close()
    layer = lm.layers[0]
    assert not layer.attention.o_proj.row_amax and not isinstance(layer.attention.o_proj.weight, ActQuantWeight)
    assert generate(True, "hoststaged", model=model) == generate(False, "hoststaged", model=model)


@pytest.mark.skipif(dispatch.triton is None, reason="CUDA ranks repack only with the kernels on (Triton installed)")
@pytest.mark.parametrize("dtype", [torch.int8] + ([aq.E4M3] if FP8_OK else []))
@pytest.mark.parametrize("rows", [1, 3, 8, 16])
def test_weight_only_repacking_matches_the_act_quant_path(dtype, rows):
    """for_device repacks an ActQuantWeight on its GPU for the packed GEMV, whose CUDA kernel (x left in bfloat16)
    gives the act-quant path's product within what quantizing x changes, and the float product of the same weights
    within bfloat16's rounding."""
    q, s = weight(1024, 4096, dtype)
    act_quant = ActQuantWeight(q, s)
    packed = for_device(act_quant, torch.bfloat16, act_quant_weight_only=True)
    assert isinstance(packed, PackedWeight) and packed.packed.kind.name == ("int8" if dtype == torch.int8 else "fp8")
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
