"""The routed-experts Triton kernels against the torch version (GPU host only): 1-16 tokens, several expert counts and
top-k, eagerly and replayed from a CUDA graph; and the torch version's graph-safe path (Triton off) likewise; the
one-token GEMVs of --fused-moe and the grouped GEMM prefill of --grouped-mm-experts."""

import pytest
import torch

from raytp.kernels import dispatch, moe_gemv

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


def replay(args, fresh) -> torch.Tensor:
    """routed_experts captured in a CUDA graph on `args`, replayed after copying `fresh` into them."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        moe_gemv.routed_experts(*args)  # warm-up: compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_gemv.routed_experts(*args)
    for static, new in zip(args[:3], fresh[:3]):  # new tokens, routing and weights; the same experts' weights
        static.copy_(new)
    graph.replay()
    return out


@pytest.mark.parametrize("triton_on", [True, False])
@pytest.mark.parametrize("tokens", [1, 16, 24])  # 24: past ROUTED_ROWS, still the kernels inside a graph
@pytest.mark.parametrize("shape", SHAPES[:2])
def test_captured_step_matches_torch(shape, tokens, triton_on):
    args = inputs(tokens, *shape, torch.bfloat16, seed=1)
    fresh = inputs(tokens, *shape, torch.bfloat16, seed=2)
    dispatch.set_triton(triton_on)
    try:
        out = replay(args, fresh)
    finally:
        dispatch.set_triton(True)
    torch.testing.assert_close(out, moe_gemv.routed_experts_torch(*fresh[:3], *args[3:]), **TOL[torch.bfloat16])


@pytest.mark.parametrize("capture", [False, True])
@pytest.mark.parametrize("tokens", [17, 64, 300])
@pytest.mark.parametrize("shape", [(128, 8, 256, 96), (8, 2, 512, 200)])
def test_grouped_mm_prefill_matches_torch(monkeypatch, shape, tokens, capture):
    """--grouped-mm-experts (bfloat16, compute capability 9.0+) past ROUTED_ROWS, eagerly and replayed from a graph
    (no host sync)."""
    if torch.cuda.get_device_capability() < dispatch.GROUPED_MM_CAPABILITY:
        pytest.skip("torch._grouped_mm syncs with the host before compute capability 9.0: not used there")
    monkeypatch.setattr(dispatch, "_grouped_mm_experts", True)  # what --grouped-mm-experts sets
    args = inputs(tokens, *shape, torch.bfloat16, seed=tokens)
    if capture:
        fresh = inputs(tokens, *shape, torch.bfloat16, seed=tokens + 1)
        out, args = replay(args, fresh), fresh[:3] + args[3:]
    else:
        out = moe_gemv.routed_experts(*args)
    torch.testing.assert_close(out, moe_gemv.routed_experts_torch(*args), **TOL[torch.bfloat16])


@pytest.mark.parametrize("capture", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_one_token_gemvs_match_torch(monkeypatch, shape, dtype, capture):
    """--fused-moe's one-token path: GEMVs over the token's choices, the weighted sum inside the down projection."""
    monkeypatch.setattr(dispatch, "_fused_moe", True)  # what --fused-moe sets
    args = inputs(1, *shape, dtype, seed=3)
    if capture:
        fresh = inputs(1, *shape, dtype, seed=4)
        out, args = replay(args, fresh), fresh[:3] + args[3:]
    else:
        out = moe_gemv.routed_experts(*args)
    torch.testing.assert_close(out, moe_gemv.routed_experts_torch(*args), **TOL[dtype])
