"""torch.distributed backends: gloo (CPU tensors, any host) and nccl (CUDA tensors, one rank per GPU)."""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from raytp.parallel.comm.base import CommError, Communicator


class TorchDistCommunicator(Communicator):
    """One process group per process, joined over TCP at `init_method` (e.g. tcp://10.0.0.1:29500)."""

    def __init__(self, backend: str, init_method: str, rank: int, world_size: int, timeout_s: float = 30.0):
        self.backend, self.rank, self.world_size = backend, rank, world_size
        self.graph_safe = backend == "nccl"
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
        # NCCL needs CUDA tensors; gloo works on host memory, so CUDA tensors are staged through it.
        self._device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    def all_reduce(self, t):
        if self.world_size == 1:
            return t  # a sum of one
        # gloo sums half precision poorly (and slowly): accumulate in float32 as the host-staged path does
        wire = torch.float32 if self.backend == "gloo" and t.is_floating_point() else t.dtype
        staged = t if (t.device, t.dtype) == (self._device, wire) else t.to(self._device, wire)
        try:
            dist.all_reduce(staged)
        except RuntimeError as e:  # gloo/nccl report dead peers and timeouts as RuntimeError
            raise CommError(f"{self.backend} all-reduce failed: {e}") from e
        if staged is not t:
            t.copy_(staged)
        return t

    def all_gather_equal(self, t):
        staged = t.contiguous().to(self._device)
        out = torch.empty((self.world_size, *t.shape), dtype=t.dtype, device=self._device)
        try:
            dist.all_gather_into_tensor(out, staged) if self.backend == "nccl" else dist.all_gather(list(out.unbind(0)), staged)
        except RuntimeError as e:
            raise CommError(f"{self.backend} all-gather failed: {e}") from e
        return out.to(t.device)

    def close(self):
        if dist.is_initialized():
            dist.destroy_process_group()
