"""`--comm auto` on one node of GPUs: each all-reduce goes to whichever backend measured faster at its size.

Host-staged tends to win small (decode-sized) messages on hosts without fast peer-to-peer, NCCL over
NVLink wins large (prefill-sized) ones. The group times both at start-up on the same sizes and every rank
gets the same cut-off, so a given message always takes the same backend on all ranks (identical bits).
"""

from __future__ import annotations

from raytp.parallel.comm.base import Communicator


def choose_cutoff(small_us: dict[int, float], large_us: dict[int, float]) -> int:
    """Largest message size (elements) up to which `small` keeps winning; 0 if it loses at the smallest size.

    Above the first size where `large` is faster every message goes to `large`: one cut-off, not a patchwork
    of noisy per-size wins. Beyond the largest size measured, the winner at that size decides."""
    cutoff = 0
    for n in sorted(small_us):
        if small_us[n] > large_us[n]:
            return cutoff
        cutoff = n
    return 1 << 62  # small wins everywhere measured


class SizeRoutedCommunicator(Communicator):
    """All-reduces of at most `cutoff` elements go to `small`, larger ones to `large`; gathers and broadcasts
    (a few bytes per step: commands, sampling candidates) go to `small`."""

    def __init__(self, small: Communicator, large: Communicator, cutoff: int):
        assert (small.rank, small.world_size) == (large.rank, large.world_size)
        self.small, self.large, self.cutoff = small, large, cutoff
        self.rank, self.world_size = small.rank, small.world_size
        self.graph_safe = small.graph_safe and large.graph_safe
        self.gather_graph_safe = self.graph_safe and small.gather_graph_safe

    def all_reduce(self, t):
        return (self.small if t.numel() <= self.cutoff else self.large).all_reduce(t)

    def all_gather_equal(self, t):
        return self.small.all_gather_equal(t)

    def abort(self) -> None:
        self.small.abort()
        self.large.abort()

    def close(self):
        self.small.close()
        self.large.close()
