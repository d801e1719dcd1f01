"""One rank: a plain `Worker` class (testable without Ray) and `WorkerActor`, its thin Ray wrapper.

The device is touched only inside the worker's own process, after Ray has set CUDA_VISIBLE_DEVICES, so
`cuda` here always means the one GPU Ray gave this actor. The driver calls, in order: `describe` (what
this device really has), `open_comm`, `load` (the shard of the plan), `run` (the token loop; blocks until
stopped) and, on the leader only, `submit` and `poll_events` while `run` is going.
"""

from __future__ import annotations

import os
import platform
import queue
import socket
import time
from dataclasses import replace

import psutil
import ray
import torch

from raytp.parallel.comm import CommError, Communicator
from raytp.parallel.comm.base import maybe_check_identical
from raytp.model.config import ModelConfig
from raytp.parallel.devices import DeviceSpec, format_bytes
from raytp.runtime.engine import Command, RankEngine, TokenEvent
from raytp.model.llama import ShardedLlama
from raytp.parallel.plan import ShardPlan
from raytp.weights.source import load_weights


class MemoryBudgetError(RuntimeError):
    """A rank's shard does not fit the memory it was given."""


class Worker:
    def __init__(self, rank: int, device: DeviceSpec, local_ranks: int = 1):
        self.rank, self.spec = rank, device
        self.device = torch.device("cuda", 0) if device.kind == "cuda" else torch.device("cpu")
        if device.kind == "cpu":
            # Several CPU ranks share one host: split its cores instead of oversubscribing them.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
        self.comm: Communicator | None = None
        self._stashed: Communicator | None = None  # set aside while `--comm auto` times a second backend
        self.engine: RankEngine | None = None
        self.events: queue.Queue[TokenEvent] = queue.Queue()

    def describe(self) -> dict:
        """The node, the real device behind this rank, and its memory (free now, and total)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            free, total = torch.cuda.mem_get_info()
            name = torch.cuda.get_device_name()
        else:
            vm = psutil.virtual_memory()
            free, total, name = vm.available, vm.total, platform.processor() or platform.machine() or "CPU"
        return {"rank": self.rank, "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local",
                "ip": _node_ip(), "device_name": name, "free_bytes": free, "total_bytes": total,
                "pid": os.getpid()}

    # ---- communication -------------------------------------------------------------------------------------

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def open_hoststaged(self, name: str, size: int, world_size: int, create: bool, timeout_s: float) -> None:
        from raytp.parallel.comm.hoststaged import HostStagedCommunicator
        from raytp.parallel.comm.shm import SharedSegment

        segment = (SharedSegment.create if create else SharedSegment.attach)(name, size)
        self.comm = HostStagedCommunicator(segment, self.rank, world_size, timeout_s=timeout_s)

    def finish_comm(self) -> None:
        """Once every rank's communicator is open: on GPUs, let the host-staged all-reduce run as a kernel
        that polls the mapped segment itself (graph-capturable, no CPU in the loop). Collective."""
        from raytp.parallel.comm.hoststaged import HostStagedCommunicator

        if (self.device.type == "cuda" and isinstance(self.comm, HostStagedCommunicator)
                and os.environ.get("RAYTP_GPU_HOSTSTAGED", "1") != "0"):
            from raytp.parallel.comm.hoststaged_gpu import GpuHostStagedCommunicator

            torch.cuda.set_device(self.device)
            self.comm = GpuHostStagedCommunicator(self.comm, self.device, timeout_s=self.comm.timeout_s)

    def stash_comm(self) -> None:
        """Set the open communicator aside so a second one can open (`--comm auto` compares two)."""
        self._stashed, self.comm = self.comm, None

    def route_comm(self, cutoff: int) -> None:
        """All-reduces up to `cutoff` elements through the stashed communicator, larger ones the current one."""
        from raytp.parallel.comm.routed import SizeRoutedCommunicator

        self.comm = SizeRoutedCommunicator(self._stashed, self.comm, cutoff)
        self._stashed = None

    def unlink_segment(self) -> None:
        """Called once every rank of the node has mapped the segment: from now on no name can leak."""
        self.comm.segment.unlink()

    def open_torchdist(self, backend: str, init_method: str, world_size: int, timeout_s: float) -> None:
        from raytp.parallel.comm.torchdist import TorchDistCommunicator

        self.comm = TorchDistCommunicator(backend, init_method, self.rank, world_size, timeout_s)

    def open_hierarchical(self, segment_name: str, node_ranks: list[list[int]], create: bool,
                          leaders_init: str | None, timeout_s: float) -> None:
        """Host-staged among this node's ranks, gloo among the node leaders (see raytp.parallel.comm.hierarchical)."""
        from raytp.parallel.comm.hierarchical import open_hierarchical

        self.comm = open_hierarchical(self.rank, node_ranks, segment_name, create, leaders_init, timeout_s)

    # ---- model -----------------------------------------------------------------------------------------

    def load(self, model: str, config: ModelConfig, plan: ShardPlan, progress: bool = True) -> dict:
        """Load this rank's shard, allocate its KV cache, enforce its budget; returns the bytes used."""
        shard = plan.ranks[self.rank]
        dtype = getattr(torch, plan.dtype)
        if self.device.type == "cuda" and self.spec.mem_bytes is not None:
            # make an @MEM cap real, so mismatched cards can be emulated on identical ones
            total = torch.cuda.mem_get_info()[1]
            torch.cuda.set_per_process_memory_fraction(min(1.0, self.spec.mem_bytes / total))
        weights = load_weights(model, config, shard, dtype=dtype, device=self.device, progress=progress)
        lm = ShardedLlama(config, shard, maybe_check_identical(self.comm), weights,
                          max_batch=plan.max_batch, max_context=plan.max_context)
        used = _tensor_bytes(weights.values()) + _tensor_bytes([lm.k_cache, lm.v_cache])
        if used > shard.budget_bytes:
            raise MemoryBudgetError(f"rank {self.rank} ({self.spec}) needs {format_bytes(used)} for weights and "
                                    f"KV cache, its budget is {format_bytes(shard.budget_bytes)}")
        self.engine = RankEngine(lm, lm.comm)
        return {"rank": self.rank, "used_bytes": used}

    # ---- token loop -------------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            lm = self.engine.model
            if self.device.type == "cuda" and lm.comm.graph_safe and os.environ.get("RAYTP_CUDA_GRAPHS", "1") != "0":
                from raytp.model.graphs import GraphedDecode

                # captured here, where every rank starts at once (after all loaded): collectives must match
                self.engine.decode_step = GraphedDecode(lm)
            self.engine.run(self._emit)
        except CommError:
            self._abort()
            raise
        finally:
            self.close()

    def _emit(self, events: list[TokenEvent]) -> None:
        now = time.perf_counter()  # one stamp per step, so benchmarks time steps without Ray's latency
        for e in events:
            self.events.put((now, e))

    def _abort(self) -> None:
        abort = getattr(self.comm, "abort", None)
        if abort:
            abort()

    def submit(self, command: Command) -> None:
        """Leader only: `Add`, `Cancel` or `Stop`, taken at the next step."""
        self.engine.inbox.put(command)

    def submit_timed(self, command: Command) -> float:
        """`submit`, returning this process's perf_counter when the command was queued: benchmarks time a
        request against the `t` of its events, which come from the same clock."""
        queued = time.perf_counter()
        self.submit(command)
        return queued

    def poll_events(self, timeout_s: float = 0.2, max_events: int = 4096) -> list[TokenEvent]:
        """Leader only: block until at least one event (or timeout), then return all that are waiting."""
        out = []
        try:
            out.append(self.events.get(timeout=timeout_s))
            while len(out) < max_events:
                out.append(self.events.get_nowait())
        except queue.Empty:
            pass
        return [replace(e, t=t) for t, e in out]

    # ---- benchmarks (call between open_comm and run: the token loop owns the communicator) -------------------

    def bench_allreduce(self, sizes: list[int], iters: int, dtype: str = "bfloat16") -> dict[int, float]:
        """Mean microseconds of one `comm.all_reduce` of each size (elements) on this rank's device.

        Every rank runs the same calls in lock-step; a barrier-like warm-up precedes each size."""
        out = {}
        for n in sizes:
            t = torch.ones(n, dtype=getattr(torch, dtype), device=self.device)
            for _ in range(max(3, iters // 10)):
                self.comm.all_reduce(t.fill_(1))
            self._sync()
            start = time.perf_counter()
            for _ in range(iters):
                self.comm.all_reduce(t)
            self._sync()
            out[n] = (time.perf_counter() - start) / iters * 1e6
        return out

    def bench_bandwidth(self, nbytes: int = 1 << 31, iters: int = 10) -> float:
        """Device memory bandwidth in bytes/s from a large copy, counting bytes read and written."""
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device=self.device).fill_(1)
        dst = torch.empty_like(src)
        dst.copy_(src)
        self._sync()
        start = time.perf_counter()
        for _ in range(iters):
            dst.copy_(src)
        self._sync()
        elapsed = time.perf_counter() - start
        del src, dst
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return 2 * (nbytes // 2) * iters / elapsed

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        if self.comm is not None:
            self.comm.close()


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() not in seen:  # tied embedding and lm_head are one tensor
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _node_ip() -> str:
    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


# max_concurrency: `run` occupies one thread for the actor's life; submit/poll need others.
WorkerActor = ray.remote(max_concurrency=4)(Worker)
