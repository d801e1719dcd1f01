"""raytp.kernels.moe_int_gemv, the routed Triton kernels of integer-quantized experts, under Triton's CPU interpreter
(TRITON_INTERPRET=1, read when a kernel is defined, hence a process of its own) against `grouped_experts` applying
each expert's IntWeight the torch way: 4- and 8-bit, groups and one scale per row, zero points, act-order group
indices, one token, a decode batch and two tiles of tokens, and an expert nobody chose."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

INTERPRETED = """
import torch
from raytp.kernels.moe_gemv import grouped_experts
from raytp.kernels.moe_int_gemv import StackedInt, routed_int_experts
from raytp.model.formats import IntWeight, pack

torch.manual_seed(0)
E, H, C, k = 6, 96, 64, 2


def weight(rows, cols, bits, group, zeros, act_order):
    group = group or cols
    groups = cols // group
    g_idx = (torch.arange(cols) // group)[torch.randperm(cols)].to(torch.int32) if act_order else None
    z = torch.randint(0, 1 << bits, (rows, groups)).float() if zeros else None
    q = torch.randint(0, 1 << bits, (rows, cols))
    return IntWeight(pack(q, bits), torch.rand(rows, groups) * 0.05 + 0.01, z, bits, group, 0, g_idx)


for bits, group, zeros, act_order in ((4, 32, False, False), (4, 16, True, True), (8, None, False, False),
                                      (8, 16, True, False)):
    gate_up = [weight(2 * C, H, bits, group, zeros, act_order) for _ in range(E)]
    down = [weight(H, C, bits, group, zeros, act_order) for _ in range(E)]
    for T in (1, 5, 19):
        x = torch.randn(T, H)
        logits = torch.randn(T, E)
        logits[:, E - 1] = -1e9  # an expert nobody chooses: its programs return at once
        w, ids = torch.softmax(logits, -1).topk(k, dim=-1)
        want = grouped_experts(x, ids, w, E, lambda e, t: gate_up[e].apply(t), lambda e, h: down[e].apply(h))
        got = routed_int_experts(x, ids, w, StackedInt.stack(gate_up), StackedInt.stack(down))
        # float32 sums in another order: a few ulps of the largest output (a wrong weight is off by its scale)
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err < 2e-6, (bits, group, zeros, act_order, T, err)
print("equal")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (its CPU interpreter)")
def test_routed_int_experts_equal_the_grouped_torch_experts_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "equal", done.stderr[-3000:]
