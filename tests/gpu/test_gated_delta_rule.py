"""The gated delta rule on GPUs (GPU host with fla-core only): fla-core's chunked and recurrent kernels against the
torch versions, and a decode update captured in a CUDA graph and replayed on new inputs."""

import pytest
import torch

from raytp.kernels import gated_delta_rule as gdr

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or gdr._fla_module() is None,
                                                 reason="needs CUDA and fla-core (the fla extra)")]

TOL = {torch.float32: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def inputs(batch: int, length: int, dtype: torch.dtype, seed: int, key_heads=16, value_heads=48, dim=128):
    """Qwen3.5-27B's head counts and dims."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=g)

    q, k = randn(batch, length, key_heads, dim).to(dtype), randn(batch, length, key_heads, dim).to(dtype)
    v = randn(batch, length, value_heads, dim).to(dtype)
    decay = -torch.rand(batch, length, value_heads, device="cuda", generator=g)
    beta = torch.rand(batch, length, value_heads, device="cuda", generator=g).to(dtype)
    state = randn(batch, value_heads, dim, dim) * 0.1
    return q, k, v, decay, beta, state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel,torch_version,length", [
    (gdr.chunk_gated_delta_rule, gdr._torch_chunk, 2 * gdr.CHUNK + 37),
    (gdr.recurrent_gated_delta_rule, gdr._torch_recurrent, 1)])
def test_fla_matches_torch(kernel, torch_version, length, dtype):
    args = inputs(2, length, dtype, seed=length)
    out, state = kernel(*args)
    ref_out, ref_state = torch_version(*args)
    torch.testing.assert_close(out.float(), ref_out.float(), **TOL[dtype])
    torch.testing.assert_close(state, ref_state, **TOL[dtype])


def test_decode_update_replays_from_a_cuda_graph():
    args = inputs(4, 1, torch.bfloat16, seed=1)
    static = [a.clone() for a in args]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        gdr.recurrent_gated_delta_rule(*static)  # warm-up: Triton compiles outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, state = gdr.recurrent_gated_delta_rule(*static)
    fresh = inputs(4, 1, torch.bfloat16, seed=2)
    for s, f in zip(static, fresh):
        s.copy_(f)
    graph.replay()
    ref_out, ref_state = gdr._torch_recurrent(*fresh)
    torch.testing.assert_close(out.float(), ref_out.float(), **TOL[torch.bfloat16])
    torch.testing.assert_close(state, ref_state, **TOL[torch.bfloat16])
