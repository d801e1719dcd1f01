"""P2P all-reduce for the GPUs of one node that can reach each other's memory (NVLink, or PCIe peer-to-peer).

Built on an open NCCL group (raytp/parallel/comm/torchdist.py): its store meets torch's symmetric-memory rendezvous,
which maps one buffer of every rank into every other rank's address space; the all-reduces then run the kernels of
raytp/kernels/p2p_allreduce.py on the current stream (one-shot for decode sizes, two-shot above; CUDA graphs can
capture both). The NCCL group carries the rest: gathers and broadcasts (small, once per step, outside the graph),
and any all-reduce the kernels do not take (dtypes other than float32 and bfloat16, unaligned tensors).

Whether P2P can run is decided per node, every rank together (`p2p_unavailable` for what each rank can see, then
the rendezvous itself); where it cannot, the reason is logged and NCCL (or host-staged) is used instead. NVLink
multicast is never used: the kernels read and write plain peer memory.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Mapping, Sequence

import torch

from raytp.parallel.comm.base import CommError, Communicator
from raytp.parallel.comm.torchdist import TorchDistCommunicator


def p2p_unavailable(devices: Sequence[int], gpus: Sequence[int], can_access: Callable[[int, int], bool],
                    environ: Mapping[str, str] = os.environ) -> str | None:
    """Why the ranks of one node, on CUDA device `devices[r]` (as this process numbers them) and physical GPU
    `gpus[r]` (any id unique per GPU), cannot all-reduce over P2P; None when they can. Pure, so it is testable."""
    if environ.get("NCCL_P2P_DISABLE", "0") not in ("", "0"):
        return "NCCL_P2P_DISABLE is set: this host is treated as one without GPU peer-to-peer"
    if len(set(gpus)) < len(gpus):
        return (f"{len(gpus)} ranks share {len(set(gpus))} GPUs: P2P needs one rank per GPU")
    if len(set(devices)) < len(devices):
        return ("each rank sees only its own GPU (CUDA_VISIBLE_DEVICES narrowed per rank), so no rank can map "
                "its peers' memory")
    for mine in devices:
        for peer in devices:
            if peer != mine and not can_access(mine, peer):
                return f"cuda:{mine} cannot access cuda:{peer} (no peer-to-peer path between them)"
    return None


def gpu_id(device: torch.device) -> int:
    """A 63-bit id of the physical GPU behind `device`, the same in every process whatever it calls the device."""
    uuid = str(torch.cuda.get_device_properties(device).uuid)
    return int.from_bytes(hashlib.sha256(uuid.encode()).digest()[:8], "little") >> 1


class P2PCommunicator(Communicator):
    graph_safe = True
    gather_graph_safe = True  # gathers go to NCCL, which a graph captures

    def __init__(self, nccl: TorchDistCommunicator, device: torch.device, timeout_s: float = 30.0):
        """Collective: every rank of `nccl`'s group at once. Raises where the symmetric-memory rendezvous fails."""
        import torch.distributed._symmetric_memory as symm_mem

        from raytp.kernels import p2p_allreduce as kernel

        self.nccl, self.device, self.kernel = nccl, device, kernel
        self.rank, self.world_size = nccl.rank, nccl.world_size
        self.layout = kernel.Layout(self.world_size)
        self.buffer = symm_mem.empty(self.layout.nbytes, dtype=torch.uint8, device=device)
        with warnings.catch_warnings():  # needed by torch 2.11 (the GPU hosts'), a deprecated no-op since
            warnings.simplefilter("ignore", FutureWarning)
            symm_mem.enable_symm_mem_for_group(nccl.group.group_name)
        handle = symm_mem.rendezvous(self.buffer, nccl.group)
        self.peers = torch.tensor(handle.buffer_ptrs, dtype=torch.int64, device=device)
        blocks = max(self.layout.one_blocks, self.layout.two_blocks)
        self.counters = torch.zeros(2, blocks, dtype=torch.int32, device=device)
        self.error = torch.zeros(1, dtype=torch.int32, pin_memory=True)  # host memory the kernels can write
        self.timeout_us = min(int(timeout_s * 1e6), 2**31 - 1)
        self.buffer.zero_()  # flags start at 0 on every rank before any peer raises one
        torch.cuda.synchronize(device)
        nccl.barrier()

    def all_reduce(self, t):
        if self.world_size == 1:
            return t  # a sum of one
        if not self.kernel.fits(t):
            return self.nccl.all_reduce(t)
        self.reduce_in_place(t)
        return t

    def reduce_in_place(self, t: torch.Tensor) -> None:
        """The kernel path itself, for a tensor `kernel.fits` (tests call it directly)."""
        self.kernel.launch(t, self.peers, self.counters, self.error, rank=self.rank, world=self.world_size,
                           layout=self.layout, timeout_us=self.timeout_us)

    def check(self) -> None:
        if int(self.error[0]):
            raise CommError("a P2P all-reduce timed out waiting for a peer (dead or stuck)")

    def all_gather_equal(self, t):
        self.check()  # once per step, outside any graph: a timed-out kernel becomes an error here
        return self.nccl.all_gather_equal(t)

    def abort(self) -> None:
        self.error[0] = 1  # this rank's waiting kernels give up; peers time out
        self.nccl.abort()

    def release(self) -> None:
        """Give up the P2P path and keep the NCCL group it was built on (every rank falls back together).
        Idempotent."""
        if self.buffer is not None:
            torch.cuda.synchronize(self.device)  # no kernel of this rank still uses the buffer
        self.buffer = self.peers = None

    def close(self):
        self.release()
        self.nccl.close()
