"""Opens a tensor-parallel group's communicator: one `CommPlan` for the group, one `open_group` per rank.

The group (raytp.actors.group) makes the plan once, then drives every rank through the phases below; each
phase runs on the ranks the plan names, all of them at once, and the next phase starts when it has returned:

    create   plan.creators: each node's first rank makes the node's shared-memory segment (hierarchical, several
             nodes: and joins the node leaders' gloo group); gloo and nccl: every rank joins its group
    attach   plan.attachers: the other ranks map their node's segment
    unlink   plan.creators, always, also after a failed create or attach: from here no segment name is left in
             /dev/shm, whatever happens to any rank later
    finish   every rank, collective: the GPU kernel path of host-staged, `auto`'s timing and size routing, the
             identity check; returns what was opened and why, for the group to log once

Where a backend cannot run on this host the opening says why and falls back, every rank together: the GPU
host-staged kernel where cudaHostRegister (or the kernel's rank limit) refuses, to the CPU-driven path; `auto`
where NCCL cannot run, to host-staged at every size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raytp.parallel.comm.base import CommError, Communicator, IdentityCheckingCommunicator
from raytp.parallel.comm.hierarchical import HierarchicalCommunicator
from raytp.parallel.comm.hoststaged import HostStagedCommunicator, segment_bytes
from raytp.parallel.comm.routed import SizeRoutedCommunicator, choose_cutoff
from raytp.parallel.comm.shm import SharedSegment, new_segment_name
from raytp.parallel.comm.timing import time_allreduce
from raytp.parallel.comm.torchdist import TorchDistCommunicator, nccl_unavailable

AUTO_SIZES = (4096, 16384, 65536, 262144, 1048576)  # elements: decode hidden states up to prefill chunks
AUTO_ITERS = 20  # all-reduces timed per size and backend at start-up
TORCH_BACKENDS = ("gloo", "nccl")
PHASES = ("create", "attach", "unlink", "finish")


@dataclass(frozen=True)
class CommPlan:
    """How one group's ranks meet: the same object reaches every rank."""

    backend: str  # hoststaged | gloo | nccl | hierarchical | measured (`auto` on one node of GPUs)
    node_ranks: tuple[tuple[int, ...], ...]  # global ranks by node (raytp.parallel.comm.hierarchical.node_layout)
    segments: tuple[str, ...]  # one shared-memory name per node; none for gloo and nccl
    init_method: str | None  # tcp://HOST:PORT where torch.distributed groups meet, if any is opened
    timeout_s: float  # a collective waiting longer than this for a peer fails
    gpu_hoststaged: bool = True  # see raytp.runtime.options.RuntimeOptions
    check_identical: bool = False  # likewise
    dtype: str = "bfloat16"  # what `measured` times, the model's own activations

    @classmethod
    def make(cls, backend: str, node_ranks, init_method: str | None, timeout_s: float, **options) -> CommPlan:
        """A plan with fresh, unguessable segment names for the backends that use shared memory."""
        node_ranks = tuple(tuple(ranks) for ranks in node_ranks)
        segments = () if backend in TORCH_BACKENDS else tuple(new_segment_name() for _ in node_ranks)
        return cls(backend, node_ranks, segments, init_method, timeout_s, **options)

    @property
    def world_size(self) -> int:
        return sum(len(ranks) for ranks in self.node_ranks)

    @property
    def creators(self) -> list[int]:
        if self.backend in TORCH_BACKENDS:
            return list(range(self.world_size))
        return [ranks[0] for ranks in self.node_ranks]

    @property
    def attachers(self) -> list[int]:
        if self.backend in TORCH_BACKENDS:
            return []
        return [r for ranks in self.node_ranks for r in ranks[1:]]


def open_group(plan: CommPlan, rank: int, device: torch.device) -> GroupOpening:
    """Rank `rank`'s side of the group in `plan`; advance it with `step` through the phases the group drives."""
    return GroupOpening(plan, rank, device)


class GroupOpening:
    def __init__(self, plan: CommPlan, rank: int, device: torch.device):
        self.plan, self.rank, self.device = plan, rank, device
        self.node = next(i for i, ranks in enumerate(plan.node_ranks) if rank in ranks)
        self.segment: SharedSegment | None = None
        self.comm: Communicator | None = None
        self.notes: list[str] = []  # backends that cannot run on this rank, and what every rank does instead

    def step(self, phase: str) -> dict | None:
        """Run `phase` (see the module docstring); `finish` returns {"backend", "why", "notes"}."""
        if phase == "create":
            self._create()
        elif phase == "attach":
            self._map_segment(create=False)
        elif phase == "unlink":
            if self.segment is not None:
                self.segment.unlink()
        elif phase == "finish":
            return self._finish()
        else:
            raise ValueError(f"unknown phase {phase!r}; the phases are {', '.join(PHASES)}")
        return None

    def _create(self) -> None:
        p = self.plan
        if p.backend in TORCH_BACKENDS:
            self.comm = TorchDistCommunicator(p.backend, p.init_method, self.rank, p.world_size, p.timeout_s)
        else:
            self._map_segment(create=True)

    def _map_segment(self, create: bool) -> None:
        p = self.plan
        mine = p.node_ranks[self.node]
        segment = (SharedSegment.create if create else SharedSegment.attach)(p.segments[self.node],
                                                                            segment_bytes(len(mine)))
        try:
            local = HostStagedCommunicator(segment, mine.index(self.rank), len(mine), timeout_s=p.timeout_s)
            if p.backend == "hierarchical":
                leaders = None
                if create and len(p.node_ranks) > 1:  # the node leaders' group: rank = node index
                    leaders = TorchDistCommunicator("gloo", p.init_method, self.node, len(p.node_ranks), p.timeout_s)
                self.comm = HierarchicalCommunicator(self.rank, [list(r) for r in p.node_ranks], local, leaders)
            else:
                self.comm = local
        except BaseException:
            segment.close()  # never leave a name in /dev/shm behind a failed open
            raise
        self.segment = segment

    def _finish(self) -> dict:
        p = self.plan
        backend, why = p.backend, ""
        if p.backend in ("hoststaged", "measured") and self.device.type == "cuda" and p.gpu_hoststaged:
            self.comm = self._kernel_path(self.comm)
        if p.backend == "measured":
            backend, why = self._route_by_size()
        if p.check_identical:
            self.comm = IdentityCheckingCommunicator(self.comm)
        return {"backend": backend, "why": why, "notes": self.notes}

    def _all_ranks_can(self, able: bool) -> bool:
        """Whether every rank is `able`, agreed over the open communicator: fall-backs happen on all or none."""
        flags = self.comm.all_gather_equal(torch.tensor([int(able)]))
        return bool(flags.min())

    def _kernel_path(self, cpu: HostStagedCommunicator) -> Communicator:
        """On GPUs, the host-staged all-reduce as a kernel that polls the mapped segment itself (graph-capturable,
        no CPU in the loop); the CPU-driven path where any rank cannot run it. Collective."""
        from raytp.parallel.comm.hoststaged_gpu import GpuHostStagedCommunicator

        torch.cuda.set_device(self.device)
        try:
            gpu = GpuHostStagedCommunicator(cpu, self.device, timeout_s=self.plan.timeout_s)
        except (ValueError, CommError) as e:  # too many ranks for the kernel, cudaHostRegister refused
            gpu = None
            self.notes.append(f"the GPU host-staged kernel cannot run ({e}); every rank uses the CPU-driven "
                              "host-staged path")
        if self._all_ranks_can(gpu is not None):
            return gpu
        if gpu is not None:
            gpu.release()
        return cpu

    def _route_by_size(self) -> tuple[str, str]:
        """`auto` on one node of GPUs: time host-staged (open) and NCCL (opened here) at AUTO_SIZES and send
        each all-reduce size to the faster; returns (backend, why). Collective."""
        p, small = self.plan, self.comm
        why_not = nccl_unavailable()
        if why_not:
            self.notes.append(f"{why_not}; every rank uses host-staged at every size")
        if not self._all_ranks_can(why_not is None):
            return "hoststaged", "NCCL cannot run on every rank: host-staged at every size"
        hoststaged = self._slowest(time_allreduce(small, self.device, AUTO_SIZES, AUTO_ITERS, p.dtype))
        large = TorchDistCommunicator("nccl", p.init_method, self.rank, p.world_size, p.timeout_s)
        nccl = self._slowest(time_allreduce(large, self.device, AUTO_SIZES, AUTO_ITERS, p.dtype))
        cutoff = choose_cutoff(hoststaged, nccl)
        self.comm = SizeRoutedCommunicator(small, large, cutoff)
        if cutoff == 0:
            backend, choice = "nccl", "NCCL at every size"
        elif cutoff >= max(AUTO_SIZES):
            backend, choice = "hoststaged", "host-staged at every size"
        else:
            backend, choice = f"hoststaged<={cutoff},nccl", f"host-staged up to {cutoff} elements, NCCL above"
        timings = ", ".join(f"{n}: {hoststaged[n]:.0f}/{nccl[n]:.0f}" for n in AUTO_SIZES)
        return backend, f"{choice}; measured us per all-reduce, host-staged/NCCL, by elements: {timings}"

    def _slowest(self, us: dict[int, float]) -> dict[int, float]:
        """Per size, the slowest rank's time (it sets the pace): the same figures, so the same cut-off, on every
        rank."""
        every = self.comm.all_gather_equal(torch.tensor([us[n] for n in AUTO_SIZES], dtype=torch.float64))
        return dict(zip(AUTO_SIZES, every.max(dim=0).values.tolist()))
