"""`--comm auto` and `--comm p2p`: which backend is chosen, and the per-size routing auto sets up (fake timings, no
GPU)."""

import pytest
import torch

from raytp.actors.group import ClusterError, choose_backend
from raytp.parallel.comm import InProcessGroup
from raytp.parallel.comm.routed import EVERY_SIZE, SizeRoutedCommunicator, choose_routes, routes_table
from raytp.parallel.devices import parse_devices
from tests.test_comm import run_ranks


def test_auto_measures_on_one_node_of_whole_gpus_only():
    gpus, cpus = tuple(parse_devices("cuda*4")), tuple(parse_devices("cpu*2"))
    assert choose_backend("auto", gpus, 1)[0] == "measured"
    assert choose_backend("auto", gpus, 1, shared_gpus=True)[0] == "hoststaged"  # NCCL refuses shared GPUs
    assert choose_backend("auto", gpus, 2)[0] == "hierarchical"
    assert choose_backend("auto", tuple(parse_devices("cuda")), 1)[0] == "hoststaged"  # one rank: nothing to time
    assert choose_backend("auto", cpus, 1)[0] == "hoststaged"
    assert choose_backend("nccl", gpus, 1) == ("nccl", "requested")


def test_p2p_is_for_one_node_of_whole_gpus_and_says_what_runs_instead():
    gpus = tuple(parse_devices("cuda*4"))
    assert choose_backend("p2p", gpus, 1) == ("p2p", "requested")
    backend, why = choose_backend("p2p", gpus, 2)
    assert backend == "nccl" and "2 nodes" in why
    backend, why = choose_backend("p2p", gpus, 1, shared_gpus=True)
    assert backend == "hoststaged" and "share GPUs" in why
    with pytest.raises(ClusterError, match="--comm p2p needs every rank on a cuda device"):
        choose_backend("p2p", tuple(parse_devices("cuda,cpu")), 1)


SIZES = [4096, 8192, 65536, 1048576]


def timings(**us):
    return {name: dict(zip(SIZES, v)) for name, v in us.items()}


def test_each_size_takes_the_fastest_backend_and_neighbours_merge():
    # the shape measured on 4x H200: P2P ahead at decode sizes, NCCL for prefill sizes, host-staged nowhere
    us = timings(p2p=[7, 7.4, 8.7, 60], hoststaged=[37, 43, 180, 3000], nccl=[20, 22, 23, 38])
    routes = choose_routes(us)
    assert routes == ((65536, "p2p"), (EVERY_SIZE, "nccl"))
    # without P2P (NCCL through host memory): host-staged wins small messages, NCCL large ones
    assert choose_routes(timings(hoststaged=[9, 10, 20, 212], nccl=[37, 39, 40, 77])) == \
        ((65536, "hoststaged"), (EVERY_SIZE, "nccl"))
    assert choose_routes(timings(nccl=[1, 1, 1, 1], hoststaged=[2, 2, 2, 2])) == ((EVERY_SIZE, "nccl"),)
    assert choose_routes(timings(a=[5, 5, 5, 5], b=[5, 5, 5, 5])) == ((EVERY_SIZE, "a"),)  # ties: the first named
    # a win in between is its own route: every rank has the same (slowest-rank) figures, so the same routes
    assert choose_routes(timings(a=[1, 9, 1, 9], b=[5, 5, 5, 5])) == \
        ((4096, "a"), (8192, "b"), (65536, "a"), (EVERY_SIZE, "b"))


def test_the_logged_table_has_one_line_per_size_with_every_backend_and_the_pick():
    us = timings(p2p=[7, 7.4, 8.7, 60], nccl=[20, 22, 23, 38])
    table = routes_table(us, choose_routes(us))
    assert len(table) == len(SIZES)
    assert table[0] == "    4096 elements: p2p 7.0 us, nccl 20.0 us -> p2p"
    assert table[-1].endswith("p2p 60.0 us, nccl 38.0 us -> nccl")


class Counting:
    """Wraps a communicator and counts the all-reduces and gathers it carried."""

    def __init__(self, inner):
        self.inner, self.calls, self.gathers = inner, 0, 0
        self.rank, self.world_size, self.graph_safe, self.gather_graph_safe = inner.rank, inner.world_size, False, False

    def all_reduce(self, t):
        self.calls += 1
        return self.inner.all_reduce(t)

    def all_gather_equal(self, t):
        self.gathers += 1
        return self.inner.all_gather_equal(t)

    def check(self):
        self.inner.check()

    def close(self):
        pass


def test_messages_take_the_backend_of_their_size_and_sums_stay_exact():
    groups = [InProcessGroup(3) for _ in range(3)]

    def body(rank_comm):
        rank = rank_comm.rank
        small, middle, large = (Counting(g.communicator(rank)) for g in groups)
        routed = SizeRoutedCommunicator([(100, small), (1000, middle), (EVERY_SIZE, large)])
        sums = [routed.all_reduce(torch.full((n,), float(rank + 1))) for n in (100, 101, 1000, 1001, 5000)]
        gathered = routed.all_gather_equal(torch.tensor([rank]))
        return sums, gathered.view(-1).tolist(), (small.calls, middle.calls, large.calls)

    for sums, gathered, calls in run_ranks(3, InProcessGroup(3).communicator, body):
        assert all(torch.equal(s, torch.full_like(s, 6.0)) for s in sums)
        assert gathered == [0, 1, 2]  # gathers take the first route's backend
        assert calls == (1, 2, 2)


def test_gathers_go_to_the_backend_a_cuda_graph_can_capture():
    """With host-staged routed for small sizes and NCCL (or p2p) above, the sampler's exchange must take the
    capturable backend, or the step cannot be one graph replay (measured: 3.29 vs 2.54 ms/token, 8B on 4 H200)."""
    groups = [InProcessGroup(2) for _ in range(2)]

    def body(rank_comm):
        host, capturable = (Counting(g.communicator(rank_comm.rank)) for g in groups)
        capturable.gather_graph_safe = True
        routed = SizeRoutedCommunicator([(4096, host), (EVERY_SIZE, capturable)])
        routed.all_gather_equal(torch.tensor([rank_comm.rank]))
        return capturable.gathers, host.gathers

    for capturable_gathers, host_gathers in run_ranks(2, InProcessGroup(2).communicator, body):
        assert (capturable_gathers, host_gathers) == (1, 0)
