"""Opens a tensor-parallel group's communicator: one `CommPlan` for the group, one `open_group` per rank.

The group (raytp.actors.group) makes the plan once, then drives every rank through the phases below; each
phase runs on the ranks the plan names, all of them at once, and the next phase starts when it has returned:

    create   plan.creators: each node's first rank makes the node's shared-memory segment (hierarchical, several
             nodes: and joins the node leaders' gloo group); gloo, nccl and p2p: every rank joins its group
    attach   plan.attachers: the other ranks map their node's segment
    unlink   plan.creators, always, also after a failed create or attach: from here no segment name is left in
             /dev/shm, whatever happens to any rank later
    finish   every rank, collective: the GPU kernel path of host-staged, P2P on top of NCCL, `auto`'s timing and
             size routing (and the timing of every backend that `raytp bench` reports), the identity check;
             returns what was opened and why, for the group to log once

Where a backend cannot run on this host the opening says why and falls back, every rank together: the GPU
host-staged kernel where cudaHostRegister (or the kernel's rank limit) refuses, to the CPU-driven path; P2P where
GPUs cannot reach each other (raytp.parallel.comm.p2p.p2p_unavailable) or the rendezvous fails, to NCCL; `auto`
to the backends that can run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raytp.parallel.comm.base import CommError, Communicator, IdentityCheckingCommunicator
from raytp.parallel.comm.hierarchical import HierarchicalCommunicator
from raytp.parallel.comm.hoststaged import HostStagedCommunicator, segment_bytes
from raytp.parallel.comm.p2p import P2PCommunicator, gpu_id, p2p_unavailable
from raytp.parallel.comm.routed import SizeRoutedCommunicator, choose_routes, routes_table
from raytp.parallel.comm.shm import SharedSegment, new_segment_name
from raytp.parallel.comm.timing import time_allreduce_in_graph
from raytp.parallel.comm.torchdist import TorchDistCommunicator, nccl_unavailable

AUTO_SIZES = (4096, 8192, 16384, 65536, 262144, 1048576)  # elements: decode hidden states up to prefill chunks
AUTO_ITERS = 20  # all-reduces timed per size and backend at start-up, captured in one CUDA graph on GPUs
TORCH_BACKENDS = ("gloo", "nccl", "p2p")  # every rank joins a torch.distributed group at create (p2p: an nccl one)
PHASES = ("create", "attach", "unlink", "finish")


@dataclass(frozen=True)
class CommPlan:
    """How one group's ranks meet: the same object reaches every rank."""

    backend: str  # hoststaged | gloo | nccl | p2p | hierarchical | measured (`auto` on one node of GPUs)
    node_ranks: tuple[tuple[int, ...], ...]  # global ranks by node (raytp.parallel.comm.hierarchical.node_layout)
    segments: tuple[str, ...]  # one shared-memory name per node, where host-staged is opened (or timed)
    init_method: str | None  # tcp://HOST:PORT where torch.distributed groups meet, if any is opened
    timeout_s: float  # a collective waiting longer than this for a peer fails
    # GPU ranks run host-staged as a kernel polling mapped host memory (raytp.parallel.comm.hoststaged_gpu); not
    # where ranks share GPUs, whose spinning kernels would hold a GPU from the rank beside them: the CPU drives it
    gpu_hoststaged: bool = True
    check_identical: bool = False  # see raytp.runtime.options.RuntimeOptions
    dtype: str = "bfloat16"  # what `measured` times, the model's own activations
    # time every backend that can run here at AUTO_SIZES, as `measured` does, and report them (`raytp bench`); the
    # group still uses `backend`
    time_backends: bool = False

    @classmethod
    def make(cls, backend: str, node_ranks, init_method: str | None, timeout_s: float, **options) -> CommPlan:
        """A plan with fresh, unguessable segment names where host-staged is opened or timed."""
        node_ranks = tuple(tuple(ranks) for ranks in node_ranks)
        hoststaged = backend not in TORCH_BACKENDS or options.get("time_backends", False)
        segments = tuple(new_segment_name() for _ in node_ranks) if hoststaged else ()
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
        if not self.segments:
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
        self.hoststaged: Communicator | None = None  # the node's host-staged group, where a segment is planned
        self.comm: Communicator | None = None
        self.notes: list[str] = []  # backends that cannot run on this rank, and what every rank does instead

    def step(self, phase: str) -> dict | None:
        """Run `phase` (see the module docstring); `finish` returns {"backend", "why", "notes", "timings", "table"}."""
        if phase == "create":
            self._create()
        elif phase == "attach":
            if self.plan.segments and self.segment is None:  # the rank that created the segment has it mapped
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
        if p.segments and self.rank == p.node_ranks[self.node][0]:
            self._map_segment(create=True)
        if p.backend in TORCH_BACKENDS:
            torch_backend = "nccl" if p.backend == "p2p" else p.backend
            self.comm = TorchDistCommunicator(torch_backend, p.init_method, self.rank, p.world_size, p.timeout_s)

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
                local = HierarchicalCommunicator(self.rank, [list(r) for r in p.node_ranks], local, leaders)
        except BaseException:
            segment.close()  # never leave a name in /dev/shm behind a failed open
            raise
        self.segment, self.hoststaged = segment, local
        if p.backend not in TORCH_BACKENDS:
            self.comm = local

    def _finish(self) -> dict:
        p = self.plan
        backend, why, timings, table = p.backend, "", {}, []
        if self.hoststaged is not None and p.backend != "hierarchical" and self.device.type == "cuda" \
                and p.gpu_hoststaged:
            self.hoststaged = self._kernel_path(self.hoststaged)
            if p.backend in ("hoststaged", "measured"):
                self.comm = self.hoststaged
        if p.backend == "p2p":
            p2p = self._open_p2p(self.comm)
            if p2p is None:
                backend, why = "nccl", "P2P cannot run on every rank: NCCL instead"
            else:
                self.comm = p2p
        if p.backend == "measured" or p.time_backends:
            candidates = self._candidates()
            if len(candidates) > 1 or p.time_backends:
                timings = {name: self._slowest(time_allreduce_in_graph(c, self.device, AUTO_SIZES, AUTO_ITERS,
                                                                       p.dtype))
                           for name, c in candidates.items()}
            if p.backend == "measured":
                backend, why, table = self._route(candidates, timings)
            elif timings:
                table = routes_table(timings, choose_routes(timings))
            self._close_unused(candidates)
        if p.check_identical:
            self.comm = IdentityCheckingCommunicator(self.comm)
        return {"backend": backend, "why": why, "notes": self.notes, "timings": timings, "table": table}

    def _all_ranks_can(self, able: bool, comm: Communicator | None = None) -> bool:
        """Whether every rank is `able`, agreed over an open communicator (the plan's own by default): fall-backs
        happen on all or none."""
        flags = (comm or self.comm).all_gather_equal(torch.tensor([int(able)]))
        return bool(flags.min())

    def _kernel_path(self, cpu: HostStagedCommunicator) -> Communicator:
        """On GPUs, the host-staged all-reduce as a kernel that polls the mapped segment itself (graph-capturable,
        no CPU in the loop); the CPU-driven path where any rank cannot run it. Collective."""
        from raytp.parallel.comm.hoststaged_gpu import GpuHostStagedCommunicator

        if self.device.index is not None:  # an index-less "cuda" is already the current device
            torch.cuda.set_device(self.device)
        try:
            gpu = GpuHostStagedCommunicator(cpu, self.device, timeout_s=self.plan.timeout_s)
        except (ValueError, CommError) as e:  # too many ranks for the kernel, cudaHostRegister refused
            gpu = None
            self.notes.append(f"the GPU host-staged kernel cannot run ({e}); every rank uses the CPU-driven "
                              "host-staged path")
        if self._all_ranks_can(gpu is not None, cpu):
            return gpu
        if gpu is not None:
            gpu.release()
        return cpu

    def _open_p2p(self, nccl: TorchDistCommunicator) -> P2PCommunicator | None:
        """P2P on top of the open NCCL group where every rank can run it, else None (the reason in the notes).
        Collective over `nccl`."""
        if len(self.plan.node_ranks) > 1:
            self.notes.append("P2P cannot run: the ranks span several nodes")
            return None  # the same on every rank: nothing to agree on
        mine = torch.tensor([[self.device.index or 0, gpu_id(self.device)]], dtype=torch.int64)
        every = nccl.all_gather_equal(mine).view(-1, 2)
        reason = p2p_unavailable(every[:, 0].tolist(), every[:, 1].tolist(), torch.cuda.can_device_access_peer)
        p2p = None
        if reason is None:
            try:
                p2p = P2PCommunicator(nccl, self.device, self.plan.timeout_s)
            except RuntimeError as e:  # torch reports a failed symmetric-memory rendezvous as RuntimeError
                reason = f"the symmetric-memory rendezvous failed: {str(e).splitlines()[0]}"
        if reason is not None:
            self.notes.append(f"P2P cannot run ({reason})")
        if self._all_ranks_can(p2p is not None, nccl):
            return p2p
        if p2p is not None:
            p2p.release()
        return None

    def _candidates(self) -> dict[str, Communicator]:
        """Every backend that can run on all ranks, open: P2P, host-staged, NCCL (those the plan opened are reused,
        the others opened here). Collective."""
        out, own, nccl = {}, self.comm, None
        if isinstance(own, P2PCommunicator):
            out["p2p"], nccl = own, own.nccl
        elif isinstance(own, TorchDistCommunicator) and own.backend == "nccl":
            nccl = own
        else:
            why_not = nccl_unavailable()
            if why_not:
                self.notes.append(f"{why_not}; NCCL and P2P are not used")
            if self._all_ranks_can(why_not is None):
                p = self.plan
                nccl = TorchDistCommunicator("nccl", p.init_method, self.rank, p.world_size, p.timeout_s)
        if nccl is not None and "p2p" not in out and self.plan.backend != "p2p":  # a p2p plan tried already
            p2p = self._open_p2p(nccl)
            if p2p is not None:
                out["p2p"] = p2p
        if self.hoststaged is not None:
            out["hoststaged"] = self.hoststaged
        if nccl is not None:
            out["nccl"] = nccl
        return out

    def _route(self, candidates: dict[str, Communicator], timings) -> tuple[str, str, list[str]]:
        """`auto`: every message size to the backend measured fastest there; returns (backend, why, table)."""
        if not timings:
            (name, comm), = candidates.items()
            self.comm = comm
            return name, f"only {name} can run on every rank: {name} at every size", []
        routes = choose_routes(timings)
        self.comm = (candidates[routes[0][1]] if len(routes) == 1
                     else SizeRoutedCommunicator([(bound, candidates[name]) for bound, name in routes]))
        backend = ",".join(name if i == len(routes) - 1 else f"{name}<={bound}"
                           for i, (bound, name) in enumerate(routes))
        return backend, f"each message size takes the backend measured fastest ({', '.join(timings)} timed)", \
            routes_table(timings, routes)

    def _close_unused(self, candidates: dict[str, Communicator]) -> None:
        """Close what was opened only to be timed; an NCCL group under a P2P one in use stays open."""
        comms = self.comm.comms if isinstance(self.comm, SizeRoutedCommunicator) else [self.comm]
        keep = {id(c) for c in comms} | {id(c.nccl) for c in comms if isinstance(c, P2PCommunicator)}
        for c in candidates.values():
            if id(c) in keep:
                continue
            if isinstance(c, P2PCommunicator):
                c.release()  # its NCCL group is a candidate of its own
            else:
                c.close()

    def _slowest(self, us: dict[int, float]) -> dict[int, float]:
        """Per size, the slowest rank's time (it sets the pace): the same figures, so the same routes, on every
        rank."""
        every = self.comm.all_gather_equal(torch.tensor([us[n] for n in AUTO_SIZES], dtype=torch.float64))
        return dict(zip(AUTO_SIZES, every.view(-1, len(AUTO_SIZES)).max(dim=0).values.tolist()))
