"""The routed launch of the packed GEMV (raytp.kernels.routed_packed_gemv, every GPU rank's quantized experts:
raytp.model.experts.PackedExperts) against the grouped experts, each expert its own packed GEMV (the dense kernel,
tested in test_packed_gemv.py), on the same weights (GPU host only): int4 with and without zero points and act-order,
int8 per channel, FP8; bfloat16; 1-16 tokens; eagerly and replayed from a CUDA graph; prefill in chunks of tokens."""

import pytest
import torch

from raytp.kernels.moe_gemv import grouped_experts
from raytp.kernels.routed_packed_gemv import StackedMMA, routed_packed_experts
from raytp.model import experts as experts_backends
from raytp.model.formats import FP8Weight, IntWeight, for_device, pack

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# (experts, top_k, hidden, columns, format, group, zero points, act-order): Qwen3-30B-A3B's routing, Mixtral's,
# 8-bit channel scales, FP8, act-order groups (each expert its own input order)
SHAPES = [(128, 8, 512, 256, "int4", 128, False, False), (8, 2, 512, 384, "int4", 128, True, False),
          (16, 4, 256, 128, "int8", None, False, False), (16, 4, 256, 128, "fp8", None, False, False),
          (16, 4, 512, 256, "int4", 128, False, True)]
TOL = dict(rtol=2e-2, atol=2e-2)


def weight(rows: int, cols: int, fmt: str, group: int | None, zeros: bool, act_order: bool, g: torch.Generator):
    if fmt == "fp8":
        w = (torch.randn(rows, cols, device="cuda", generator=g) * 100).to(torch.float8_e4m3fn)
        return FP8Weight(w, torch.rand(rows, 1, device="cuda", generator=g) / (100 * cols ** 0.5))
    bits = 4 if fmt == "int4" else 8
    group = group or cols
    q = torch.randint(0, 1 << bits, (rows, cols), device="cuda", generator=g)
    scale = (torch.rand(rows, cols // group, device="cuda", generator=g) + 0.5) * 2 / ((1 << bits) * cols ** 0.5)
    z = torch.randint(0, 1 << bits, scale.shape, device="cuda", generator=g).bfloat16() if zeros else None
    g_idx = (torch.randperm(cols, device="cuda", generator=g) // group).int() if act_order else None
    return IntWeight(pack(q, bits), scale.bfloat16(), z, bits, group, g_idx=g_idx)


def experts(shape, seed: int):
    E, k, H, C, fmt, group, zeros, act_order = shape
    g = torch.Generator(device="cuda").manual_seed(seed)
    held = lambda rows, cols: for_device(weight(rows, cols, fmt, group, zeros, act_order, g),  # noqa: E731
                                         torch.bfloat16, False)
    return [held(2 * C, H) for _ in range(E)], [held(H, C) for _ in range(E)]


def routing(tokens: int, shape, seed: int):
    E, k, H = shape[:3]
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(tokens, H, device="cuda", generator=g).bfloat16()
    weights, ids = torch.rand(tokens, E, device="cuda", generator=g).softmax(-1).topk(k, dim=-1)
    return x, ids, weights


def stacked(gate_up, down):
    stacks = StackedMMA.stack([w.packed for w in gate_up]), StackedMMA.stack([w.packed for w in down])
    assert None not in stacks
    return stacks


def grouped(x, ids, weights, gate_up, down):
    return grouped_experts(x, ids, weights, len(down), lambda e, t: gate_up[e].apply(t),
                           lambda e, h: down[e].apply(h))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[4]}-e{s[0]}k{s[1]}-z{int(s[6])}-act{int(s[7])}")
@pytest.mark.parametrize("tokens", [1, 2, 8, 16])
def test_routed_gemv_matches_grouped_experts(tokens, shape):
    gate_up, down = experts(shape, seed=0)
    x, ids, weights = routing(tokens, shape, seed=tokens)
    got = routed_packed_experts(x, ids, weights, *stacked(gate_up, down))
    torch.testing.assert_close(got, grouped(x, ids, weights, gate_up, down), **TOL)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[4]}-e{s[0]}k{s[1]}-z{int(s[6])}-act{int(s[7])}")
@pytest.mark.parametrize("tokens", [17, 200])
def test_prefill_sorted_by_expert_matches_grouped_experts(tokens, shape):
    """Prefill's routed launch, the pairs sorted by expert and put back (the module docstring)."""
    gate_up, down = experts(shape, seed=0)
    x, ids, weights = routing(tokens, shape, seed=tokens)
    got = routed_packed_experts(x, ids, weights, *stacked(gate_up, down), sort=True)
    torch.testing.assert_close(got, grouped(x, ids, weights, gate_up, down), **TOL)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[4]], ids=["int4", "int4-act-order"])
def test_prefill_in_chunks_of_tokens_matches_grouped_experts(monkeypatch, shape):
    """PackedExperts runs a prefill longer than one launch takes as launches over chunks of tokens."""
    gate_up, down = experts(shape, seed=0)
    backend = experts_backends.PackedExperts(*stacked(gate_up, down))
    monkeypatch.setattr(experts_backends, "prefill_pairs", lambda stack: 5 * shape[1])  # 5 tokens a launch
    x, ids, weights = routing(37, shape, seed=5)
    torch.testing.assert_close(backend(x, ids, weights), grouped(x, ids, weights, gate_up, down), **TOL)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[4]], ids=["int4", "int4-act-order"])
def test_captured_step_matches_grouped_experts(shape):
    gate_up, down = experts(shape, seed=0)
    stacks = stacked(gate_up, down)
    args, fresh = routing(4, shape, seed=1), routing(4, shape, seed=2)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        routed_packed_experts(*args, *stacks)  # warm-up: compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = routed_packed_experts(*args, *stacks)
    for static, new in zip(args, fresh):
        static.copy_(new)
    graph.replay()
    torch.testing.assert_close(out, grouped(*fresh, gate_up, down), **TOL)
