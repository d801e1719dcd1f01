"""`--comm auto`: which backend is chosen, and the per-size routing it sets up (fake timings, no GPU)."""

import torch

from raytp.actors.group import choose_backend
from raytp.parallel.comm import InProcessGroup
from raytp.parallel.comm.routed import SizeRoutedCommunicator, choose_cutoff
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


def test_cutoff_keeps_host_staged_while_it_wins():
    sizes = [4096, 16384, 65536, 262144]
    # measured H200 shape: host-staged ahead for decode sizes, NCCL for prefill sizes
    assert choose_cutoff(dict(zip(sizes, [9, 11, 40, 300])), dict(zip(sizes, [13, 14, 15, 30]))) == 16384
    assert choose_cutoff(dict(zip(sizes, [20, 30, 40, 50])), dict(zip(sizes, [10, 10, 10, 10]))) == 0
    assert choose_cutoff(dict(zip(sizes, [1, 2, 3, 4])), dict(zip(sizes, [10, 10, 10, 10]))) >= 1 << 62
    # a lucky win after the first loss does not reopen host-staged: one cut-off, not noise
    assert choose_cutoff(dict(zip(sizes, [9, 20, 9, 300])), dict(zip(sizes, [13, 14, 15, 30]))) == 4096


class Counting:
    """Wraps a communicator and counts the all-reduces it carried."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.rank, self.world_size, self.graph_safe = inner.rank, inner.world_size, False

    def all_reduce(self, t):
        self.calls += 1
        return self.inner.all_reduce(t)

    def all_gather_equal(self, t):
        return self.inner.all_gather_equal(t)

    def close(self):
        pass


def test_messages_take_the_backend_of_their_size_and_sums_stay_exact():
    small, large = InProcessGroup(3), InProcessGroup(3)

    def body(rank_comm):
        rank = rank_comm.rank
        routed = SizeRoutedCommunicator(Counting(small.communicator(rank)), Counting(large.communicator(rank)), 100)
        a = routed.all_reduce(torch.full((100,), float(rank + 1)))
        b = routed.all_reduce(torch.full((101,), float(rank + 1)))
        gathered = routed.all_gather_equal(torch.tensor([rank]))
        return a, b, gathered.view(-1).tolist(), routed.small.calls, routed.large.calls

    for a, b, gathered, small_calls, large_calls in run_ranks(3, InProcessGroup(3).communicator, body):
        assert torch.equal(a, torch.full((100,), 6.0)) and torch.equal(b, torch.full((101,), 6.0))
        assert gathered == [0, 1, 2]
        assert (small_calls, large_calls) == (1, 1)
