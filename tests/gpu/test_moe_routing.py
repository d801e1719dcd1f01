"""raytp.kernels.moe_routing's Triton kernels against their torch versions on a GPU (GPU host only): routing
(Qwen3-MoE's 128 experts top 8, Mixtral's 8 top 2, model-dtype and float32 logits) and combining, eagerly and replayed
from a CUDA graph."""

import pytest
import torch

from raytp.kernels import moe_routing

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or moe_routing.triton is None,
                                                 reason="needs CUDA and Triton")]

CASES = [(1, 128, 8, True), (16, 128, 8, False), (8, 8, 2, True), (3, 60, 4, False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,experts,top_k,normalize", CASES)
def test_routing_kernel_matches_torch(tokens, experts, top_k, normalize, dtype):
    g = torch.Generator(device="cuda").manual_seed(tokens * experts)
    logits = (torch.randn(tokens, experts, device="cuda", generator=g) * 2).to(dtype)
    weights, ids = moe_routing.top_k_routing(logits, top_k, normalize)
    want_weights, want_ids = moe_routing.top_k_routing_torch(logits, top_k, normalize)
    if dtype == torch.bfloat16:  # bfloat16 logits tie often: compare the probabilities picked, ties in any order
        torch.testing.assert_close(weights, want_weights, rtol=1e-6, atol=0)
    else:
        assert torch.equal(ids, want_ids)
        torch.testing.assert_close(weights, want_weights, rtol=1e-6, atol=0)


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("y_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,top_k", [(1, 8), (16, 8), (5, 2)])
def test_combine_kernel_matches_torch(tokens, top_k, y_dtype, weighted):
    """Within float32 rounding before the one rounding to bfloat16: the GPU may fuse multiply and add."""
    g = torch.Generator(device="cuda").manual_seed(tokens)
    y = torch.randn(tokens, top_k, 2048, device="cuda", generator=g).to(y_dtype)
    w = torch.rand(tokens, top_k, device="cuda", generator=g) if weighted else None
    got = moe_routing.combine_choices(y, w, torch.float32)
    torch.testing.assert_close(got, moe_routing.combine_choices_torch(y, w, torch.float32), rtol=1e-6, atol=1e-6)


def test_both_kernels_replay_from_a_cuda_graph():
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(4, 128, device="cuda", generator=g)
    y = torch.randn(4, 8, 2048, device="cuda", generator=g)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles the kernels outside the capture
        moe_routing.combine_choices(y, moe_routing.top_k_routing(logits, 8, True)[0], torch.bfloat16)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        weights, ids = moe_routing.top_k_routing(logits, 8, True)
        out = moe_routing.combine_choices(y, weights, torch.bfloat16)
    logits.copy_(torch.randn(4, 128, device="cuda", generator=g))
    graph.replay()
    want_weights, want_ids = moe_routing.top_k_routing_torch(logits, 8, True)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(out, moe_routing.combine_choices_torch(y, want_weights, torch.bfloat16))
