"""The step profiler on a GPU (raytp.bench.profile): the kernels of a CUDA graph replay are traced one by one and
classed, as are eager kernels; the classes add up to the step (GPU host only)."""

import pytest
import torch
import torch.nn.functional as F

from raytp.bench.profile import CLASSES, SKIP_STEPS, StepProfiler
from raytp.runtime.engine import TokenEvent

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def profiled(step, steps: int = 3) -> dict:
    """Run `step` as a rank's loop does (work, then a host sync reading the result, then the end-of-step call)."""
    profiler = StepProfiler("r", steps, "cuda")
    for n in range(1, SKIP_STEPS + steps + 2):
        step().sum().item()
        result = profiler([TokenEvent("r", n)])
        if result is not None:
            return result
    raise AssertionError("the profiler did not finish")


@pytest.mark.parametrize("graphed", [True, False], ids=["graph", "eager"])
def test_graph_and_eager_kernels_are_classed(graphed):
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(4096, 4096, device="cuda", generator=g, dtype=torch.bfloat16)
    x = torch.randn(1, 4096, device="cuda", generator=g, dtype=torch.bfloat16)
    q, k, v = (torch.randn(1, 32, 1, 128, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))

    def forward():
        h = F.relu(F.linear(x, w))
        return h + F.scaled_dot_product_attention(q, k, v).reshape(1, -1)

    step = forward
    if graphed:
        forward()  # warm-up outside the capture (cuBLAS workspace, SDPA backend choice)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = forward()

        def step():
            graph.replay()
            return out
    result = profiled(step)
    assert result["decode"] == ("graph" if graphed else "eager") and not result["kernels_unseen"]
    for s in result["steps"]:
        assert s["gemm_ms"] > 0 and s["attention_ms"] > 0 and s["small_ms"] > 0, s
        assert all(s[f"{c}_ms"] >= 0 for c in CLASSES)
        assert sum(s[f"{c}_ms"] for c in CLASSES) == pytest.approx(s["step_ms"])
