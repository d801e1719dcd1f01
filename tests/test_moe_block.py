"""One rank's MoE block, summed over uneven column splits, against transformers' Qwen3-MoE and Mixtral blocks."""

import threading

import pytest
import torch
import transformers

from raytp.model.experts import TorchExperts
from raytp.model.formats import DenseWeight
from raytp.model.moe import Routing, SparseMoeBlock
from raytp.parallel.comm import InProcessGroup
from raytp.parallel.comm.base import IdentityCheckingCommunicator

HIDDEN, COLS = 48, 40  # expert width 40: no split below divides it evenly


def qwen3_moe(norm_topk_prob: bool, experts: int = 10, top_k: int = 3):
    config = transformers.Qwen3MoeConfig(hidden_size=HIDDEN, moe_intermediate_size=COLS, num_experts=experts,
                                         num_experts_per_tok=top_k, norm_topk_prob=norm_topk_prob)
    return transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock(config), \
        Routing(top_k, norm_topk_prob)


def mixtral(experts: int = 6, top_k: int = 2):
    config = transformers.MixtralConfig(hidden_size=HIDDEN, intermediate_size=COLS, num_local_experts=experts,
                                        num_experts_per_tok=top_k)
    return transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(config), Routing(top_k, True)


FAMILIES = {"qwen3-moe-normalized": lambda: qwen3_moe(True), "qwen3-moe": lambda: qwen3_moe(False),
            "mixtral": mixtral}
# Column boundaries per rank count: uneven, and ranks that hold no columns of any expert
SPLITS = {1: [0, 40], 2: [0, 16, 40], 3: [0, 24, 24, 40], 5: [0, 8, 8, 32, 40, 40]}
SHAPES = {"batch 1": (1, 1), "batch 8": (8, 1), "prefill": (2, 13)}


def random_block(make):
    torch.manual_seed(0)
    block, routing = make()
    with torch.no_grad():  # transformers' experts start as torch.empty and the Qwen3 router as zeros
        for p in block.parameters():
            p.normal_(0, 0.3)
    return block.eval(), routing


def rank_blocks(block, routing: Routing, bounds: list[int], comms) -> list[SparseMoeBlock]:
    """Each rank's block: columns [bounds[r], bounds[r + 1]) of every expert, sliced from transformers' tensors."""
    gate_up = block.experts.gate_up_proj.detach()  # (experts, 2 * COLS, HIDDEN): gate rows, then up rows
    down = block.experts.down_proj.detach()  # (experts, HIDDEN, COLS)
    gate, up = gate_up[:, :COLS], gate_up[:, COLS:]
    def experts(a: int, b: int) -> TorchExperts:
        gate_up_ab = torch.cat((gate[:, a:b], up[:, a:b]), dim=1)
        return TorchExperts([DenseWeight(w) for w in gate_up_ab], [DenseWeight(w) for w in down[:, :, a:b]])

    return [SparseMoeBlock(block.gate.weight.detach(), experts(a, b) if b > a else None, routing, comm)
            for a, b, comm in zip(bounds, bounds[1:], comms)]


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("ranks", list(SPLITS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_partials_sum_to_transformers_block(family, ranks, shape):
    block, routing = random_block(FAMILIES[family])
    x = torch.randn(*SHAPES[shape], HIDDEN, generator=torch.Generator().manual_seed(ranks))
    with torch.no_grad():
        expected = block(x)
    parts = rank_blocks(block, routing, SPLITS[ranks], [None] * ranks)
    assert any(p.experts is None for p in parts) == (ranks >= 3)
    torch.testing.assert_close(sum(p.partial(x) for p in parts), expected, rtol=1e-5, atol=1e-5)


def test_ranks_hold_identical_bits_after_the_all_reduce():
    block, routing = random_block(mixtral)
    bounds = SPLITS[3]
    group = InProcessGroup(3)
    comms = [IdentityCheckingCommunicator(group.communicator(r)) for r in range(3)]
    parts = rank_blocks(block, routing, bounds, comms)
    x = torch.randn(4, 5, HIDDEN, generator=torch.Generator().manual_seed(3))
    outs = [None] * 3
    threads = [threading.Thread(target=lambda r=r: outs.__setitem__(r, parts[r](x))) for r in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert all(c.checked == 1 for c in comms)  # the checker raised in its thread otherwise, leaving outs unset
    with torch.no_grad():
        torch.testing.assert_close(outs[0], block(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen3-moe-normalized", "mixtral"])
def test_tied_router_probabilities_select_experts_as_transformers_does(family):
    """top_k + 1 experts get identical router rows that dominate every token: equal probabilities compete for the
    top-k places, and only transformers' tie-breaking gives its output."""
    block, routing = random_block(FAMILIES[family])
    with torch.no_grad():
        block.gate.weight[:routing.top_k + 1] = 2.0
    x = torch.rand(8, 1, HIDDEN, generator=torch.Generator().manual_seed(1)) + 0.5  # positive: the tied rows dominate
    with torch.no_grad():
        probs = torch.softmax(x.view(-1, HIDDEN) @ block.gate.weight.T, dim=-1)
        top = probs.topk(routing.top_k + 1).values
        assert torch.equal(top[:, routing.top_k - 1], top[:, routing.top_k])  # a tie at the boundary, every token
        expected = block(x)
    parts = rank_blocks(block, routing, SPLITS[2], [None] * 2)
    torch.testing.assert_close(sum(p.partial(x) for p in parts), expected, rtol=1e-5, atol=1e-5)
