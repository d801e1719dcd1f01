"""The routed Triton kernels of integer-quantized experts (raytp.kernels.moe_int_gemv, behind RuntimeOptions
.triton_routed_int_experts until measured) against the grouped torch experts on the same IntWeights (GPU host only):
bfloat16, 1-16 tokens, Qwen3-30B-A3B's and Mixtral's routing, eagerly and replayed from a CUDA graph."""

import pytest
import torch

from raytp.kernels.moe_gemv import grouped_experts
from raytp.kernels.moe_int_gemv import StackedInt, routed_int_experts, triton
from raytp.model.formats import IntWeight, pack

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or triton is None,
                                                 reason="needs CUDA and Triton")]

# (experts, top_k, hidden, columns, bits, group, zero points): Qwen3-30B-A3B, Mixtral, 8-bit channel scales
SHAPES = [(128, 8, 512, 256, 4, 128, False), (8, 2, 512, 384, 4, 128, True), (16, 4, 256, 128, 8, None, False)]
TOL = dict(rtol=2e-2, atol=2e-2)


def weight(rows: int, cols: int, bits: int, group: int | None, zeros: bool, g: torch.Generator) -> IntWeight:
    group = group or cols
    q = torch.randint(0, 1 << bits, (rows, cols), device="cuda", generator=g)
    scale = (torch.rand(rows, cols // group, device="cuda", generator=g) + 0.5) * 2 / ((1 << bits) * cols ** 0.5)
    z = torch.randint(0, 1 << bits, scale.shape, device="cuda", generator=g).bfloat16() if zeros else None
    return IntWeight(pack(q, bits), scale.bfloat16(), z, bits, group)


def experts(shape, seed: int):
    E, k, H, C, bits, group, zeros = shape
    g = torch.Generator(device="cuda").manual_seed(seed)
    return ([weight(2 * C, H, bits, group, zeros, g) for _ in range(E)],
            [weight(H, C, bits, group, zeros, g) for _ in range(E)])


def routing(tokens: int, shape, seed: int):
    E, k, H = shape[:3]
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(tokens, H, device="cuda", generator=g).bfloat16()
    weights, ids = torch.rand(tokens, E, device="cuda", generator=g).softmax(-1).topk(k, dim=-1)
    return x, ids, weights


def grouped(x, ids, weights, gate_up, down):
    return grouped_experts(x, ids, weights, len(down), lambda e, t: gate_up[e].apply(t),
                           lambda e, h: down[e].apply(h))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tokens", [1, 2, 8, 16])
def test_kernel_matches_grouped_torch(tokens, shape):
    gate_up, down = experts(shape, seed=0)
    x, ids, weights = routing(tokens, shape, seed=tokens)
    got = routed_int_experts(x, ids, weights, StackedInt.stack(gate_up), StackedInt.stack(down))
    torch.testing.assert_close(got, grouped(x, ids, weights, gate_up, down), **TOL)


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_captured_step_matches_grouped_torch(shape):
    gate_up, down = experts(shape, seed=0)
    stacked = StackedInt.stack(gate_up), StackedInt.stack(down)
    args, fresh = routing(4, shape, seed=1), routing(4, shape, seed=2)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        routed_int_experts(*args, *stacked)  # warm-up: compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = routed_int_experts(*args, *stacked)
    for static, new in zip(args, fresh):
        static.copy_(new)
    graph.replay()
    torch.testing.assert_close(out, grouped(*fresh, gate_up, down), **TOL)
