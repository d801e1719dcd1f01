"""raytp.kernels.moe_routing on CPU: the torch routing equals transformers' routers (Qwen3-MoE and Mixtral), and the
Triton kernels under Triton's CPU interpreter (TRITON_INTERPRET=1, read when a kernel is defined, hence a process of
its own) against the torch versions: the same experts in the same order, weights and the combined output within
float32 rounding (torch's sum over the choices adds in an order of its own); and the routed experts' tiled kernels
against the per-expert matmuls; the grouped-GEMM prefill likewise."""

import importlib.util

import pytest
import torch

from raytp.kernels import moe_routing


# (tokens, experts, top_k, normalize): Qwen3-30B-A3B (128, 8, renormalized), Qwen1.5-MoE-like (60, 4, not),
# Mixtral (8, 2, renormalized), a power of two of choices and not
CASES = [(1, 128, 8, True), (5, 128, 8, False), (3, 60, 4, False), (7, 8, 2, True), (2, 6, 3, True)]


def logits_for(tokens: int, experts: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, experts, generator=g) * 2).to(dtype)


@pytest.mark.parametrize("tokens,experts,top_k,normalize", CASES)
def test_torch_routing_equals_transformers_routers(tokens, experts, top_k, normalize):
    """Qwen3MoeTopKRouter (norm_topk_prob either way) and, for Mixtral's renormalized top-k, MixtralTopKRouter."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    hidden = 16
    config = Qwen3MoeConfig(hidden_size=hidden, num_experts=experts, num_experts_per_tok=top_k,
                            norm_topk_prob=normalize)
    router = Qwen3MoeTopKRouter(config)
    torch.nn.init.normal_(router.weight, generator=torch.Generator().manual_seed(tokens))
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(experts))
    _, want_weights, want_ids = router(x)
    weights, ids = moe_routing.top_k_routing_torch(torch.nn.functional.linear(x, router.weight), top_k, normalize)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_weights.float(), rtol=0, atol=0)
    if normalize:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

        mixtral = MixtralTopKRouter(MixtralConfig(hidden_size=hidden, num_local_experts=experts,
                                                  num_experts_per_tok=top_k))
        mixtral.weight.data.copy_(router.weight)
        _, mixtral_weights, mixtral_ids = mixtral(x)
        assert torch.equal(ids, mixtral_ids)
        torch.testing.assert_close(weights, mixtral_weights.float(), rtol=2e-7, atol=0)


INTERPRETED = """
import torch

from raytp.kernels import moe_routing
from tests.test_moe_routing import CASES, logits_for

# the dispatch asks for CUDA tensors; the interpreter runs the kernels on CPU ones
moe_routing.use_triton = lambda t: True
for dtype in (torch.float32, torch.float16):
    for seed, (tokens, experts, top_k, normalize) in enumerate(CASES):
        logits = logits_for(tokens, experts, dtype, seed)
        case = (dtype, tokens, experts, top_k, normalize)
        weights, ids = moe_routing.top_k_routing(logits, top_k, normalize)
        want_weights, want_ids = moe_routing.top_k_routing_torch(logits, top_k, normalize)
        assert ids.dtype == torch.int64 and torch.equal(ids, want_ids), case
        torch.testing.assert_close(weights, want_weights, rtol=3e-7, atol=0)
        for y_dtype in (torch.float32, dtype):
            y = torch.randn(tokens, top_k, 2100, generator=torch.Generator().manual_seed(seed)).to(y_dtype)
            for w in (want_weights, None):
                got = moe_routing.combine_choices(y, w, dtype)  # in choice order; torch in its own
                want = moe_routing.combine_choices_torch(y, w, dtype)
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=str((case, y_dtype, w is None)))

# the routed experts' tiled kernels (every decode step's, and prefill's before Hopper) against the per-expert
# matmuls: float32 accumulation order aside, the same rounding (each projection to the model dtype)
from raytp.kernels import moe_gemv
for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
    for tokens, experts, top_k, hidden, cols in ((1, 128, 8, 96, 40), (3, 8, 2, 200, 72), (17, 6, 3, 64, 1)):
        g = torch.Generator().manual_seed(experts)
        x = torch.randn(tokens, hidden, generator=g).to(dtype)
        ids = torch.rand(tokens, experts, generator=g).topk(top_k, dim=-1).indices
        w = torch.rand(tokens, top_k, generator=g)
        gate_up = (torch.randn(experts, 2 * cols, hidden, generator=g) / hidden ** 0.5).to(dtype)
        down = (torch.randn(experts, hidden, cols, generator=g) / cols ** 0.5).to(dtype)
        got = moe_gemv.routed_experts(x, ids, w, gate_up, down, moe_gemv.Launch(16, 32, 4), moe_gemv.Launch(16, 64, 4))
        want = moe_gemv.routed_experts_torch(x, ids, w, gate_up, down)
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)

# equal probabilities: the lowest expert ids first
tied = torch.tensor([[0.0, 3.0, 1.0, 3.0, 3.0, 1.0]])
weights, ids = moe_routing.top_k_routing(tied, 4, True)
assert ids.tolist() == [[1, 3, 4, 2]], ids
assert abs(weights.sum().item() - 1) < 1e-6
print("equal")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (its CPU interpreter)")
@pytest.mark.triton_interpreter(INTERPRETED)
def test_routing_kernels_equal_the_torch_versions_in_the_interpreter(interpreted):
    """float32 and float16 logits and outputs: the interpreter rounds to bfloat16 by truncation, unlike a GPU and
    torch."""
    printed, error = interpreted
    assert not error and printed.strip() == "equal", error[-3000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,experts,top_k", [(20, 16, 4), (33, 8, 2), (17, 128, 8)])
def test_grouped_mm_experts_equal_one_matmul_per_expert(tokens, experts, top_k, dtype):
    """The bfloat16 prefill of Hopper GPUs (torch._grouped_mm, which has a CPU version too) against the per-expert
    matmuls, experts nobody chose included: the same rows up to float32 accumulation order."""
    from raytp.kernels import moe_gemv

    g = torch.Generator().manual_seed(tokens)
    hidden, cols = 64, 48
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    ids = torch.rand(tokens, experts, generator=g).topk(top_k, dim=-1).indices
    weights = torch.rand(tokens, top_k, generator=g)
    gate_up = (torch.randn(experts, 2 * cols, hidden, generator=g) / hidden ** 0.5).to(dtype)
    down = (torch.randn(experts, hidden, cols, generator=g) / cols ** 0.5).to(dtype)
    got = moe_gemv.grouped_mm_experts(x, ids, weights, gate_up, down)
    want = moe_gemv.routed_experts_torch(x, ids, weights, gate_up, down)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(got, want, **tol)
