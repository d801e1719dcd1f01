"""Collectives between the ranks of one tensor-parallel group.

Backends: `hoststaged` (partial sums meet in shared host memory, no GPU peer-to-peer), `gloo` and `nccl`
(torch.distributed), and `inprocess` (N ranks as threads of one process, for tests). `factory` opens a group's
communicator rank by rank, in phases, with `--comm auto`'s timing and size routing (`routed`, `timing`).
"""

from raytp.parallel.comm.base import CommError, Communicator
from raytp.parallel.comm.inprocess import InProcessGroup

__all__ = ["CommError", "Communicator", "InProcessGroup"]
