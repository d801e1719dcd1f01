"""Host-staged all-reduce driven by the GPUs themselves, so CUDA graphs can capture it.

Built on a running CPU host-staged group (raytp/parallel/comm/hoststaged.py): through it the ranks agree on a second
segment, map it, register it with the CUDA driver and unlink its name. All-reduces then run the kernel in
raytp/kernels/hoststaged_allreduce.py on the current stream; gathers and broadcasts (small, once per step,
outside the graph) keep using the CPU path, which is also where a kernel's timeout surfaces as CommError.
"""

from __future__ import annotations

import torch

from raytp.parallel.comm.base import CommError, Communicator
from raytp.parallel.comm.hoststaged import HostStagedCommunicator
from raytp.parallel.comm.shm import SharedSegment, new_segment_name
from raytp.kernels import hoststaged_allreduce as kernel

NAME_BYTES = 64
CUDA_HOST_REGISTER_PORTABLE_MAPPED = 3


class GpuHostStagedCommunicator(Communicator):
    graph_safe = True

    def __init__(self, cpu: HostStagedCommunicator, device: torch.device, *, max_elems: int = 1 << 20,
                 timeout_s: float = 30.0, chunk_bytes: int = kernel.DEFAULT_CHUNK_BYTES):
        self.cpu, self.rank, self.world_size = cpu, cpu.rank, cpu.world_size
        self.max_elems = max_elems
        # room for max_elems of float32, the widest dtype on the wire, padded to whole vectors
        max_bytes = -(-max_elems * 4 // kernel.VECTOR) * kernel.VECTOR
        self.layout = kernel.SegmentLayout(self.world_size, max_bytes, chunk_bytes)
        self.segment = self._rendezvous(self.layout.size)
        buf = torch.frombuffer(self.segment.buf, dtype=torch.uint8)
        err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel(), CUDA_HOST_REGISTER_PORTABLE_MAPPED)
        if int(err) != 0:
            self.segment.close()
            raise CommError(f"cudaHostRegister of the {buf.numel()}-byte host-staged segment failed ({err})")
        self._registered = buf.data_ptr()
        self.buf = buf
        self.error = buf[:4].view(torch.int32)
        self.counters = torch.zeros(self.layout.chunks, dtype=torch.int32, device=device)
        self.timeout_us = min(int(timeout_s * 1e6), 2**31 - 1)

    def _rendezvous(self, size: int) -> SharedSegment:
        """Rank 0 creates the segment; its name reaches the others over the CPU path; then it is unlinked."""
        name = torch.zeros(NAME_BYTES, dtype=torch.uint8)
        if self.rank == 0:
            segment = SharedSegment.create(new_segment_name(), size)
            name[: len(segment.name)] = torch.tensor(list(segment.name.encode()), dtype=torch.uint8)
        self.cpu.broadcast(name)
        if self.rank != 0:
            segment = SharedSegment.attach(bytes(name.tolist()).rstrip(b"\0").decode(), size)
        self.cpu.barrier()  # everyone has it mapped
        segment.unlink()
        return segment

    def all_reduce(self, t):
        if self.world_size == 1:
            return t  # a sum of one
        if t.dtype not in kernel.CTYPES:
            return self.cpu.all_reduce(t)  # e.g. float16 or integers: the CPU-driven path is exact too
        self.reduce_in_place(t.view(-1))  # each block reads and writes only its own chunk: in place is safe
        return t

    def reduce_in_place(self, flat: torch.Tensor) -> None:
        """The kernel path itself (also at one rank, for tests), in launches of at most max_elems."""
        for start in range(0, flat.numel(), self.max_elems):
            piece = flat[start : start + self.max_elems]
            if piece.data_ptr() % kernel.VECTOR or piece.numel() * piece.element_size() % kernel.VECTOR:
                # the kernel moves whole 16-byte vectors: sum an aligned copy padded with zeros (decode's hidden
                # sizes never come here)
                vectors = -(-piece.numel() * piece.element_size() // kernel.VECTOR)
                padded = piece.new_zeros(vectors * kernel.VECTOR // piece.element_size())
                padded[: piece.numel()] = piece
                self._launch(padded)
                piece.copy_(padded[: piece.numel()])
            else:
                self._launch(piece)

    def _launch(self, piece: torch.Tensor) -> None:
        kernel.launch(piece, piece, self.buf, self.counters, self.layout, rank=self.rank, timeout_us=self.timeout_us)

    def check(self) -> None:
        if int(self.error[0]):
            raise CommError("a GPU host-staged all-reduce timed out waiting for a peer (dead or stuck)")

    def all_gather_equal(self, t):
        self.check()  # once per step, outside any graph: a timed-out kernel becomes an error here
        return self.cpu.all_gather_equal(t)

    def abort(self) -> None:
        self.error[0] = 1
        self.cpu.abort()

    def release(self) -> None:
        """Give up the kernel path and keep the CPU group it was built on open: when one rank cannot run the
        kernel, every rank falls back to the CPU-driven path together. Idempotent."""
        if self._registered:
            torch.cuda.cudart().cudaHostUnregister(self._registered)
            self._registered = 0
        self.segment.close()

    def close(self):
        self.release()
        self.cpu.close()
