"""N ranks as threads of one process: lets tests run a whole sharded model without Ray or sockets."""

from __future__ import annotations

import threading

import torch

from raytp.parallel.comm.base import Communicator


class InProcessGroup:
    """Shared state of one group; `group.communicator(rank)` is what rank `rank`'s thread uses."""

    def __init__(self, world_size: int, timeout_s: float = 60.0):
        self.world_size = world_size
        self.slots: list[torch.Tensor | None] = [None] * world_size
        self.barrier = threading.Barrier(world_size, timeout=timeout_s)

    def communicator(self, rank: int) -> Communicator:
        return _InProcessCommunicator(self, rank)


class _InProcessCommunicator(Communicator):
    def __init__(self, group: InProcessGroup, rank: int):
        self.group, self.rank, self.world_size = group, rank, group.world_size

    def _exchange(self, t: torch.Tensor) -> list[torch.Tensor]:
        self.group.slots[self.rank] = t.detach().clone()
        self.group.barrier.wait()
        pieces = list(self.group.slots)
        self.group.barrier.wait()  # nobody overwrites a slot before every rank has taken its copy
        return pieces

    def all_reduce(self, t):
        pieces = self._exchange(t)
        acc = pieces[0].to(torch.float32 if t.is_floating_point() else t.dtype)
        for p in pieces[1:]:  # fixed rank order: identical bits on every rank
            acc = acc + p
        t.copy_(acc)
        return t

    def all_gather_equal(self, t):
        return torch.stack(self._exchange(t))
