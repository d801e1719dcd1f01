"""One rank: a plain `Worker` class (testable without Ray) and `WorkerActor`, its thin Ray wrapper.

The device is touched only inside the worker's own process. A GPU rank sees every GPU of its node (the group asks
Ray not to narrow CUDA_VISIBLE_DEVICES: P2P needs the peers' devices) and selects the one Ray assigned it before
anything else touches CUDA (`assigned_gpu`). The driver calls, in order: `describe` (what
this device really has), `open_comm` (once per phase), `load` (the shard of the plan), `run` (the token
loop; blocks until stopped) and, on the leader only, `submit` and `poll_events` while `run` is going. Before a
constrained request's `submit`, every rank compiles its grammar (`prepare_grammar`, on a thread of its own). A
benchmark may hand any rank a step watcher (`watch_steps`, then `watched`) while `run` is going.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import platform
import queue
import socket
import time
from collections.abc import Callable
from dataclasses import replace

import psutil
import ray
import torch

from raytp.kernels.dispatch import set_triton
from raytp.parallel.comm import CommError, Communicator
from raytp.parallel.comm.factory import CommPlan, GroupOpening, open_group
from raytp.model.config import ModelConfig
from raytp.model.formats.act_quant import runs_weight_only
from raytp.parallel.devices import DeviceSpec, format_bytes
from raytp.runtime.constraints import Grammars
from raytp.runtime.engine import Command, RankEngine, TokenEvent
from raytp.runtime.errors import RequestError
from raytp.runtime.options import RuntimeOptions
from raytp.model.llama import ShardedLlama
from raytp.parallel.plan import ShardPlan
from raytp.weights.source import ModelSource


STEP_TIMES_KEPT = 10_000  # loop iterations' times a rank keeps for /metrics between two scrapes


class MemoryBudgetError(RuntimeError):
    """A rank's shard does not fit the memory it was given."""


class Worker:
    def __init__(self, rank: int, device: DeviceSpec, local_ranks: int = 1,
                 options: RuntimeOptions = RuntimeOptions()):
        self.rank, self.spec, self.options = rank, device, options
        # once for this process, before any kernel runs
        set_triton(options.triton)
        self.device = assigned_gpu() if device.kind == "cuda" else torch.device("cpu")
        if device.kind == "cuda":
            self._on_device()  # before anything else touches CUDA
        else:
            # Several CPU ranks share one host: split its cores instead of oversubscribing them.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
        self.comm: Communicator | None = None
        self._opening: GroupOpening | None = None  # between the first and the last phase of open_comm
        self.engine: RankEngine | None = None
        self.events: queue.Queue[TokenEvent] = queue.Queue()
        self._watcher: Callable[[list[TokenEvent]], object] | None = None  # see watch_steps
        self._watched: concurrent.futures.Future = concurrent.futures.Future()
        # each loop iteration's wall time, kept until the driver takes them for /metrics (bounded: nobody may ask)
        self.step_seconds: collections.deque[float] = collections.deque(maxlen=STEP_TIMES_KEPT)

    def _on_device(self) -> None:
        """Make this rank's GPU the current device of the calling thread. Ray runs the methods of this (threaded)
        actor on a pool of threads, and the current CUDA device is per thread: without this a method would work on
        cuda:0, and NCCL, symmetric memory and the kernels all use the current device."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def describe(self) -> dict:
        """The node, the real device behind this rank, and its memory (free now, and total)."""
        self._on_device()
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info()
            name = torch.cuda.get_device_name()
            gpu = str(torch.cuda.get_device_properties(self.device).uuid)  # ranks packed on one GPU share it
        else:
            vm = psutil.virtual_memory()
            free, total, name = vm.available, vm.total, platform.processor() or platform.machine() or "CPU"
            gpu = None
        return {"rank": self.rank, "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local",
                "ip": _node_ip(), "device_name": name, "gpu_uuid": gpu, "free_bytes": free, "total_bytes": total,
                "pid": os.getpid()}

    # ---- communication -------------------------------------------------------------------------------------

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def open_comm(self, phase: str, plan: CommPlan) -> dict | None:
        """One phase of opening this rank's communicator; the group drives the phases over the ranks
        (raytp.parallel.comm.factory). `finish` leaves the communicator in `self.comm`."""
        self._on_device()
        if phase == "create" or (phase == "attach" and self.rank not in plan.creators):
            # this rank's first phase: a new opening, whatever an earlier one left
            self._opening = open_group(plan, self.rank, self.device)
        opened = self._opening.step(phase)
        if phase == "finish":
            self.comm, self._opening = self._opening.comm, None
        return opened

    def on_rank(self, fn: Callable, *args):
        """`fn(comm, device, *args)` here, e.g. a raytp.bench.microbench measurement. Between `open_comm` and
        `run` only: the token loop owns the communicator once it starts."""
        self._on_device()
        return fn(self.comm, self.device, *args)

    # ---- model -----------------------------------------------------------------------------------------

    def load(self, model: str, config: ModelConfig, plan: ShardPlan, progress: bool = True,
             draft: tuple[str, ModelConfig, ShardPlan] | None = None) -> dict:
        """Load this rank's shard, allocate its KV cache, enforce its budget; returns the bytes used. With `draft`
        (source, config, plan), the draft model's shard too (speculative decoding), within the same budget."""
        self._on_device()
        if self.device.type == "cuda" and self.spec.mem_bytes is not None:
            # make an @MEM cap real, so mismatched cards can be emulated on identical ones
            total = torch.cuda.mem_get_info()[1]
            torch.cuda.set_per_process_memory_fraction(min(1.0, self.spec.mem_bytes / total))
        lm = self._load_shard(model, config, plan, progress)
        draft_lm = None if draft is None else self._load_shard(*draft, progress)
        loaded = [m for m in (lm, draft_lm) if m is not None]
        used = sum(_tensor_bytes(m.weights()) + _tensor_bytes(m.cache_tensors()) for m in loaded)
        budget = (plan if draft is None else draft[2]).ranks[self.rank].budget_bytes  # the draft's: the whole
        if used > budget:
            raise MemoryBudgetError(f"rank {self.rank} ({self.spec}) needs {format_bytes(used)} for weights and "
                                    f"KV cache{' of both models' if draft else ''}, its budget is "
                                    f"{format_bytes(budget)}")
        source = ModelSource.parse(model)
        # constrained decoding needs the tokenizer's vocabulary, read here: llguidance holds the GIL while it reads
        # it (seconds for a large vocabulary), which would stall the token loop at the first constrained request
        grammars = None if source.tokenizer_dir is None else \
            Grammars.for_model(source.tokenizer_dir, config, lm.vocab_start, lm.lm_head.width)
        self.engine = RankEngine(lm, lm.comm, grammars=grammars, draft=draft_lm)
        return {"rank": self.rank, "used_bytes": used}

    def _load_shard(self, model: str, config: ModelConfig, plan: ShardPlan, progress: bool) -> ShardedLlama:
        with ModelSource.parse(model).reader(getattr(torch, plan.dtype), self.device, progress=progress,
                                             desc=f"rank {self.rank} loading") as reader:
            kinds = ["cuda" if r.device.startswith("cuda") else "cpu" for r in plan.ranks]  # every rank's, alike
            return ShardedLlama(config, plan.ranks[self.rank], self.comm, reader, max_batch=plan.max_batch,
                                max_context=plan.max_context, kv_dtype=plan.kv_dtype,
                                act_quant_weight_only=runs_weight_only(kinds, self.options.triton))

    # ---- token loop -------------------------------------------------------------------------------------

    def run(self) -> None:
        self._on_device()  # the token loop's thread: graphs, kernels and collectives all run on it
        try:
            if self.device.type == "cuda" and self.engine.comm.graph_safe and self.options.cuda_graphs:
                self.engine.use_cuda_graphs()  # captured inside the loop, where every rank is at the same step
            self.engine.run(self._emit)
        except CommError:
            self.comm.abort()  # peers waiting on this rank fail now, not at their timeout
            raise
        finally:
            self.close()

    def _emit(self, events: list[TokenEvent]) -> None:
        now = time.perf_counter()  # one stamp per step, so benchmarks time steps without Ray's latency
        self.step_seconds.append(now - self.engine.iteration_started)
        watcher = self._watcher
        if watcher is not None:
            try:
                result = watcher(events)
            except Exception as e:  # noqa: BLE001 - a failed measurement goes to `watched`; the loop goes on
                self._watcher = None
                self._watched.set_exception(e)
            else:
                if result is not None:
                    self._watcher = None
                    self._watched.set_result(result)
        for e in events:
            self.events.put((now, e))

    def watch_steps(self, watcher: Callable[[list[TokenEvent]], object]) -> None:
        """Have the token loop call `watcher(events)` on its own thread at the end of every step that made events,
        until it returns something other than None; `watched` returns that. For measurements of the running loop
        from inside it (raytp.bench.profile.StepProfiler), with no Ray call per step."""
        self._watched = concurrent.futures.Future()
        self._watcher = watcher

    def watched(self, timeout_s: float = 300.0):
        """What the watcher of `watch_steps` returned (or raised), once it has."""
        return self._watched.result(timeout_s)

    def take_step_seconds(self) -> list[float]:
        """The wall time of each loop iteration with work since the last call (at most STEP_TIMES_KEPT)."""
        kept = self.step_seconds
        return [kept.popleft() for _ in range(len(kept))]  # popleft: the loop appends from its own thread

    def heartbeat(self) -> int:
        """Answered on a thread of its own while `run` steps: the driver's sign that this process still runs."""
        return self.rank

    @ray.method(concurrency_group="grammars")
    def prepare_grammar(self, request_id: str, grammar: str) -> str | None:
        """Compile a request's grammar before it is submitted (seconds for a large schema, beside the token loop, in
        a concurrency group of its own so that heartbeats and polls never wait for it); the error's message if it
        cannot be compiled."""
        try:
            self.engine.prepare_grammar(request_id, grammar)
        except RequestError as e:
            return str(e)
        return None

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

    def close(self) -> None:
        if self.comm is not None:
            self.comm.close()


def assigned_gpu(environ=os.environ) -> torch.device:
    """The GPU Ray assigned this actor, numbered as this process sees the node's GPUs.

    Ray's GPU ids are the node's ids, as listed in the CUDA_VISIBLE_DEVICES Ray itself was started with (left
    unchanged in the rank: RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES), so the device index is the id's position
    there, or the id itself when that is unset. Ranks packed on one GPU get the same one. Outside Ray (tests):
    cuda:0."""
    ids = ray.get_gpu_ids() if ray.is_initialized() else []
    if not ids:
        return torch.device("cuda", 0)
    gpu, visible = str(ids[0]), environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return torch.device("cuda", int(gpu))
    listed = [v.strip() for v in visible.split(",")]
    if gpu not in listed:
        raise RuntimeError(f"Ray assigned GPU {gpu}, which CUDA_VISIBLE_DEVICES={visible!r} does not list")
    return torch.device("cuda", listed.index(gpu))


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() not in seen:  # tied embedding and lm_head are one tensor
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _node_ip() -> str:
    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


# max_concurrency: `run` occupies one thread for the actor's life; submit/poll need others. Grammars compile one at
# a time, on a thread of their own: a compile takes one core from the rank, never more.
WorkerActor = ray.remote(max_concurrency=4, concurrency_groups={"grammars": 1})(Worker)
