"""The model-dtype experts' GPU paths against the torch version (GPU host only): the routed Triton kernels, 1-16
tokens, several expert counts and top-k, eagerly and replayed from a CUDA graph (more tokens too); the torch
version's graph-safe path (Triton off) likewise; and StackedExperts' prefill, the grouped GEMM on Hopper and later,
the routed kernels before."""

import pytest
import torch

from raytp.kernels import dispatch, moe_gemv
from raytp.model.experts import StackedExperts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or moe_gemv.triton is None,
                                                 reason="needs CUDA and Triton")]

# (experts, top_k, hidden, columns): Mixtral's and Qwen3-MoE's routing, widths that fill no block exactly
SHAPES = [(8, 2, 512, 200), (128, 8, 256, 96), (6, 3, 200, 72), (60, 4, 128, 1)]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def inputs(tokens: int, experts: int, top_k: int, hidden: int, cols: int, dtype: torch.dtype, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(tokens, hidden, device="cuda", generator=g).to(dtype)
    ids = torch.rand(tokens, experts, device="cuda", generator=g).topk(top_k, dim=-1).indices
    weights = torch.rand(tokens, top_k, device="cuda", generator=g)
    gate_up = (torch.randn(experts, 2 * cols, hidden, device="cuda", generator=g) / hidden ** 0.5).to(dtype)
    down = (torch.randn(experts, hidden, cols, device="cuda", generator=g) / cols ** 0.5).to(dtype)
    return x, ids, weights, gate_up, down


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tokens", [1, 2, 5, 8, 16])
def test_kernel_matches_torch(tokens, shape, dtype):
    args = inputs(tokens, *shape, dtype, seed=tokens)
    torch.testing.assert_close(moe_gemv.routed_experts(*args), moe_gemv.routed_experts_torch(*args), **TOL[dtype])


def replay(run, args, fresh) -> torch.Tensor:
    """run(*args) captured in a CUDA graph, replayed after copying `fresh` into args' tokens, routing and weights."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run(*args)  # warm-up: compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run(*args)
    for static, new in zip(args[:3], fresh[:3]):  # new tokens, routing and weights; the same experts' weights
        static.copy_(new)
    graph.replay()
    return out


@pytest.mark.parametrize("triton_on", [True, False])
@pytest.mark.parametrize("tokens", [1, 16, 24])  # 24: past ROUTED_ROWS, still the decode path inside a graph
@pytest.mark.parametrize("shape", SHAPES[:2])
def test_captured_step_matches_torch(shape, tokens, triton_on):
    """StackedExperts (the routed kernels) and, Triton off, the torch version, which runs every expert in a graph."""
    args = inputs(tokens, *shape, torch.bfloat16, seed=1)
    fresh = inputs(tokens, *shape, torch.bfloat16, seed=2)
    if triton_on:
        out = replay(StackedExperts(*args[3:]), args[:3], fresh)
    else:
        dispatch.set_triton(False)
        try:
            out = replay(moe_gemv.routed_experts_torch, args, fresh)
        finally:
            dispatch.set_triton(True)
    torch.testing.assert_close(out, moe_gemv.routed_experts_torch(*fresh[:3], *args[3:]), **TOL[torch.bfloat16])


@pytest.mark.parametrize("grouped_mm", [True, False])
@pytest.mark.parametrize("capture", [False, True])
@pytest.mark.parametrize("tokens", [17, 64, 300])
@pytest.mark.parametrize("shape", [(128, 8, 256, 96), (8, 2, 512, 200)])
def test_prefill_matches_torch(shape, tokens, capture, grouped_mm):
    """StackedExperts' prefill past ROUTED_ROWS, eagerly and replayed from a graph (no host sync): the grouped GEMM
    (bfloat16, compute capability 9.0+, chosen at load) and the routed kernels (before 9.0)."""
    has_grouped_mm = torch.cuda.get_device_capability() >= dispatch.GROUPED_MM_CAPABILITY
    if grouped_mm and not has_grouped_mm:
        pytest.skip("torch._grouped_mm syncs with the host before compute capability 9.0: not used there")
    args = inputs(tokens, *shape, torch.bfloat16, seed=tokens)
    experts = StackedExperts(*args[3:])
    assert experts.grouped_mm == has_grouped_mm
    experts.grouped_mm = grouped_mm  # the choice of the other kind of GPU
    if capture:
        fresh = inputs(tokens, *shape, torch.bfloat16, seed=tokens + 1)
        out, args = replay(experts.prefill, args[:3], fresh), fresh[:3] + args[3:]
    else:
        out = experts(*args[:3])
    torch.testing.assert_close(out, moe_gemv.routed_experts_torch(*args), **TOL[torch.bfloat16])
