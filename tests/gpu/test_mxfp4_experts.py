"""gpt-oss's MXFP4 experts on a GPU (GPU host only): the routed Triton kernels (token tiles, and per-pair GEMVs)
against the torch experts, 1-16 tokens and a prefill, gpt-oss-20b's and -120b's routing (32 and 128 experts, 4 per
token) at their widths, eagerly and replayed from a CUDA graph."""

import pytest
import torch

from raytp.kernels import mxfp4

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or mxfp4.triton is None,
                                                 reason="needs CUDA and Triton")]

ALPHA, LIMIT = 1.702, 7.0


def inputs(tokens: int, experts: int, hidden: int, width: int, dtype: torch.dtype, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(tokens, hidden, device="cuda", generator=g).to(dtype)
    ids = torch.rand(tokens, experts, device="cuda", generator=g).topk(4, dim=-1).indices
    weights = torch.softmax(torch.rand(tokens, 4, device="cuda", generator=g), dim=-1)

    def projection(out: int, inp: int):
        blocks = torch.randint(0, 256, (experts, out, inp // 2), device="cuda", generator=g, dtype=torch.uint8)
        scales = torch.randint(118, 122, (experts, out, inp // 32), device="cuda", generator=g, dtype=torch.uint8)
        return blocks, scales, torch.randn(experts, out, device="cuda", generator=g).to(dtype)

    return x, ids, weights, projection(2 * width, hidden), projection(hidden, width)


@pytest.mark.parametrize("pairs_up_to", [0, 1 << 20], ids=["tiles", "pairs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("experts,hidden,width", [(32, 2880, 2880), (128, 2880, 1440), (8, 96, 32)])
@pytest.mark.parametrize("tokens", [1, 2, 8, 16, 40])
def test_routed_kernels_match_torch(tokens, experts, hidden, width, dtype, pairs_up_to):
    args = inputs(tokens, experts, hidden, width, dtype, seed=tokens)
    want = mxfp4.mxfp4_experts_torch(*args, ALPHA, LIMIT)
    got = mxfp4.mxfp4_routed_experts(*args, ALPHA, LIMIT, pairs_up_to=pairs_up_to)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()))


def test_routed_kernels_replay_from_a_cuda_graph():
    args = inputs(8, 32, 2880, 2880, torch.bfloat16, seed=1)
    fresh = inputs(8, 32, 2880, 2880, torch.bfloat16, seed=2)
    run = lambda: mxfp4.mxfp4_routed_experts(*args, ALPHA, LIMIT)  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for old, new in zip(args[:3], fresh[:3]):
        old.copy_(new)
    graph.replay()
    want = mxfp4.mxfp4_experts_torch(*args, ALPHA, LIMIT)
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))
