"""Hierarchical collectives without Ray: nodes are groups of threads sharing a host-staged segment, and the node
leaders talk through an in-process group standing in for gloo. The Ray test over two nodes is test_multinode.py."""

import pytest
import torch

from raytp.actors.group import ClusterError, choose_backend
from raytp.parallel.comm import InProcessGroup
from raytp.parallel.comm.hierarchical import HierarchicalCommunicator, node_layout
from raytp.parallel.devices import parse_devices
from tests.test_comm import hoststaged_factory, run_ranks

LAYOUTS = {
    "one node": [[0, 1, 2]],
    "one rank per node": [[0], [1]],
    "uneven, interleaved": [[0, 2, 3], [1], [4, 5]],
    "two by two": [[0, 3], [1, 2]],
}


def hierarchical_factory(layout, slot_bytes=4096):
    """rank -> HierarchicalCommunicator over `layout` (lists of global ranks per node)."""
    locals_ = [hoststaged_factory(len(ranks), slot_bytes) for ranks in layout]
    leaders = InProcessGroup(len(layout)) if len(layout) > 1 else None

    def make(rank):
        node = next(i for i, ranks in enumerate(layout) if rank in ranks)
        local_rank = layout[node].index(rank)
        lead = leaders.communicator(node) if leaders is not None and local_rank == 0 else None
        return HierarchicalCommunicator(rank, layout, locals_[node](local_rank), lead)

    return make


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def test_node_layout_groups_ranks_by_node_in_rank_order():
    assert node_layout(["b", "a", "b", "b", "c", "c"]) == [[0, 2, 3], [1], [4, 5]]
    assert node_layout(["x"]) == [[0]]


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_all_reduce_is_exact_and_bit_identical_on_every_rank(layout, dtype):
    world = sum(len(r) for r in layout)
    # integer values: every order of summation is exact, so the expected sum is unambiguous; 3000 float32
    # elements span three 4096-byte slots, so the chunked path runs too
    inputs = [torch.randint(-100, 100, (3, 1000)).to(dtype) for _ in range(world)]
    expected = torch.stack([x.to(torch.float64) for x in inputs]).sum(0)
    results = run_ranks(world, hierarchical_factory(layout), lambda c: c.all_reduce(inputs[c.rank].clone()))
    for r in results:
        assert r.dtype == dtype
        assert torch.equal(r, expected.to(dtype))  # one rounding, at the end (bfloat16 cannot hold every sum)
        assert bits(r) == bits(results[0])


def test_all_reduce_of_random_floats_is_bit_identical_across_nodes():
    layout = LAYOUTS["uneven, interleaved"]
    inputs = [torch.randn(8, 576) for _ in range(6)]
    results = run_ranks(6, hierarchical_factory(layout), lambda c: c.all_reduce(inputs[c.rank].clone()))
    assert all(bits(r) == bits(results[0]) for r in results)
    torch.testing.assert_close(results[0], torch.stack(inputs).sum(0))


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_all_gather_and_broadcast_return_global_rank_order(layout):
    world = sum(len(r) for r in layout)
    pieces = [torch.arange(r * 5, dtype=torch.float32).view(-1, 1).repeat(1, 3) + r for r in range(world)]

    def body(comm):
        gathered = comm.all_gather(pieces[comm.rank])
        return gathered, comm.broadcast(torch.tensor([comm.rank * 10 + 1]), src=world - 1)

    for gathered, bcast in run_ranks(world, hierarchical_factory(layout), body):
        assert [g.shape[0] for g in gathered] == [5 * r for r in range(world)]
        for g, p in zip(gathered, pieces):
            assert torch.equal(g, p)
        assert bcast.item() == (world - 1) * 10 + 1


def test_auto_and_hoststaged_become_hierarchical_across_nodes():
    cpu2 = tuple(parse_devices("cpu*2"))
    assert choose_backend("auto", cpu2, 1)[0] == "hoststaged"
    assert choose_backend("auto", cpu2, 2)[0] == "hierarchical"
    backend, why = choose_backend("hoststaged", cpu2, 3)
    assert backend == "hierarchical" and "3 nodes" in why
    assert choose_backend("gloo", cpu2, 2)[0] == "gloo"
    with pytest.raises(ClusterError, match="nccl needs every rank on a cuda device"):
        choose_backend("nccl", cpu2, 2)
