"""Builds and tears down the ranks: placement group, one actor per device, plan, communicator, shards.

Everything here is control plane (a handful of Ray calls per build); tokens never pass through it.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raytp.actors.worker import WorkerActor
from raytp.parallel.comm.factory import CommPlan
from raytp.parallel.comm.hierarchical import node_layout
from raytp.model.config import ModelConfig
from raytp.parallel.devices import DeviceSpec, format_bytes
from raytp.model.pieces import plan_model, plan_with_draft
from raytp.parallel.plan import ShardPlan
from raytp.runtime.bandwidth import CACHE_FILE, cached_bandwidths, copy_bandwidth, remember_bandwidths
from raytp.runtime.engine import Stop
from raytp.runtime.options import RuntimeOptions
from raytp.weights.source import ModelSource

log = logging.getLogger("raytp")

COMM_BACKENDS = ("auto", "hoststaged", "gloo", "nccl", "p2p", "hierarchical")
GPU_RESERVE = 0.92  # of a GPU's free memory: the rest is CUDA context, allocator slack, other tenants
# of an @MEM cap on a GPU: the cap bounds PyTorch's allocator, whose fragmentation, CUDA-graph pool and cuBLAS
# workspaces the plan does not itemize (a plan that fills a cap to its last MiB runs out of memory while the
# allocator holds hundreds of MiB it cannot use)
GPU_CAP_RESERVE = 0.96
# Keep NVLink multicast off in every rank: on shared hosts it can take GPUs out of service. Expandable segments:
# loading leaves differently sized temporaries behind, and without them the allocator holds gigabytes it cannot
# reuse on a card planned full.
RANK_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
            "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
# GPU ranks see every GPU of their node: Ray leaves CUDA_VISIBLE_DEVICES alone and each rank selects the GPU Ray
# assigned it (raytp.actors.worker.assigned_gpu). P2P maps peers' memory onto their own devices, and torch's
# symmetric memory refuses ranks that all call their GPU cuda:0.
GPU_RANK_ENV = RANK_ENV | {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}
# `--no-p2p`: a host without GPU peer-to-peer, emulated: NCCL goes through host memory, the p2p backend declines
NO_P2P_ENV = {"NCCL_P2P_DISABLE": "1"}


class ClusterError(RuntimeError):
    """The cluster cannot host the requested devices."""


@dataclass(frozen=True)
class GroupSettings:
    model: str
    devices: tuple[DeviceSpec, ...]
    dtype: str = "bfloat16"
    kv_dtype: str = "auto"  # the KV cache's storage: auto (the model dtype) or fp8 (raytp.kernels.kv_fp8)
    comm: str = "auto"
    max_context: int = 2048
    max_batch: int = 8
    timeout_s: float = 30.0  # a collective waiting longer than this for a peer fails
    # a rank that leaves a heartbeat unanswered this long is stopped or stuck: the group is rebuilt without waiting
    # for timeout_s (`--rank-timeout`)
    heartbeat_s: float = 5.0
    progress: bool = True
    options: RuntimeOptions = RuntimeOptions()  # run-time switches every rank obeys (raytp.runtime.options)
    split: str | None = None  # "memory" | "speed"; None: speed where every rank's bandwidth is known
    no_p2p: bool = False  # emulate a host without GPU peer-to-peer (NO_P2P_ENV in every rank)
    time_backends: bool = False  # time every all-reduce backend at start-up (raytp bench), whichever is used
    speculate: str = "off"  # drafting of a request that names none (`--speculate`, raytp.runtime.speculation)
    # the draft model's source (`--speculate draft:PATH`), loaded beside the model on every rank; None: none
    draft_model: str | None = None


def _copy_bandwidth(comm, device) -> float:
    """Run on a rank (Worker.on_rank) before its communicator opens."""
    return copy_bandwidth(device)


def choose_backend(requested: str, devices: tuple[DeviceSpec, ...], nodes: int,
                   shared_gpus: bool = False) -> tuple[str, str]:
    """(backend, why). Pure, so the choice is testable; `auto` is logged once by the caller.

    Across nodes, `auto` and `hoststaged` both mean `hierarchical`: host-staged shared memory within each node,
    gloo between one leader per node (raytp.parallel.comm.hierarchical)."""
    if requested not in COMM_BACKENDS:
        raise ValueError(f"unknown --comm {requested!r}; choose one of {', '.join(COMM_BACKENDS)}")
    if requested in ("nccl", "p2p") and any(d.kind != "cuda" for d in devices):
        raise ClusterError(f"--comm {requested} needs every rank on a cuda device; use hoststaged or gloo for cpu "
                           "ranks")
    if requested in ("auto", "hoststaged") and nodes > 1:
        return "hierarchical", (f"ranks span {nodes} nodes: host-staged shared memory within each node, gloo "
                                "between one leader per node")
    if requested == "p2p" and nodes > 1:
        return "nccl", f"--comm p2p: ranks span {nodes} nodes and P2P reaches only the GPUs of one; NCCL instead"
    if requested == "p2p" and shared_gpus:
        return "hoststaged", ("--comm p2p: ranks share GPUs and P2P (like NCCL) needs one rank per GPU; host-staged "
                              "instead")
    if requested != "auto":
        return requested, "requested"
    if len(devices) > 1 and all(d.kind == "cuda" for d in devices) and not shared_gpus:
        return "measured", ("one node of GPUs: P2P, host-staged and NCCL are timed now, each message size takes "
                            "the fastest")
    return "hoststaged", "all ranks on one node: partial sums meet in shared host memory, no peer-to-peer needed"


class WorkerGroup:
    def __init__(self, settings: GroupSettings, config: ModelConfig):
        self.settings, self.config = settings, config
        self.workers: list = []
        self.pg = None
        self.plan: ShardPlan | None = None
        self.draft_plan: ShardPlan | None = None  # the draft model's, on the same ranks (settings.draft_model)
        self.ranks: list[dict] = []  # describe() of each rank
        self.backend = ""
        self.run_refs: list = []
        self.gpu_share = 1.0  # of a GPU per cuda rank; below 1 when ranks are packed onto shared GPUs
        self.backend_us: dict[str, dict[int, float]] = {}  # backend -> elements -> us, where backends were timed

    @property
    def leader(self):
        return self.workers[0]

    def build(self) -> None:
        s = self.settings
        self._check_resources()
        gpu = self.gpu_share = self._gpu_share()
        bundles = [{"GPU": gpu} if d.kind == "cuda" else {"CPU": 1} for d in s.devices]
        log.info("placing %d rank%s", len(bundles), "" if len(bundles) == 1 else "s")
        self.pg = placement_group(bundles, strategy="PACK")
        try:
            ray.get(self.pg.ready(), timeout=60)
        except ray.exceptions.GetTimeoutError:
            raise ClusterError(f"Ray could not place {len(bundles)} ranks ({bundles}) within 60 s") from None
        n_cpu = sum(d.kind == "cpu" for d in s.devices)
        self.workers = [
            WorkerActor.options(
                num_gpus=gpu if d.kind == "cuda" else 0, num_cpus=0 if d.kind == "cuda" else 1,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
                runtime_env={"env_vars": self._rank_env(d)},
            ).remote(i, d, n_cpu, s.options)
            for i, d in enumerate(s.devices)
        ]
        self.ranks = ray.get([w.describe.remote() for w in self.workers])
        shape = dict(max_context=s.max_context, max_batch=s.max_batch, dtype=s.dtype, bandwidths=self._bandwidths(),
                     split=s.split, kv_dtype=s.kv_dtype)
        draft = None
        if s.draft_model is None:
            self.plan = plan_model(self.config, self._budgets(), **shape)
        else:
            draft_config = ModelSource.parse(s.draft_model).config()
            self.plan, self.draft_plan = plan_with_draft(self.config, draft_config, self._budgets(), **shape)
            draft = (s.draft_model, draft_config, self.draft_plan)
            log.info("draft model %s on every rank: %s", s.draft_model, ", ".join(
                f"rank {r.rank} {format_bytes(r.weight_bytes + r.kv_cache_bytes + r.overhead_bytes)}"
                for r in self.draft_plan.ranks))
        if self.plan.step_seconds is not None:
            log.info("%s split: predicted decode step %.2f ms (weights / bandwidth), rank %d paces it",
                     self.plan.split, 1000 * self.plan.step_seconds, self.plan.pacing_rank)
        self._open_comm()
        log.info("loading weights%s", " and capturing CUDA graphs" if any(d.kind == "cuda" for d in s.devices) else "")
        ray.get([w.load.remote(s.model, self.config, self.plan, s.progress, draft) for w in self.workers])
        self.run_refs = [w.run.remote() for w in self.workers]

    def _rank_env(self, device: DeviceSpec) -> dict[str, str]:
        env = GPU_RANK_ENV if device.kind == "cuda" else RANK_ENV
        return env | NO_P2P_ENV if self.settings.no_p2p else env

    def _gpu_share(self) -> float:
        """1 GPU per cuda rank; with more cuda ranks than GPUs, 1/k of one so that k ranks pack on each GPU.

        Packed ranks are time-sliced on their GPU: for correctness tests at many ranks, never for speed (and NCCL
        refuses two ranks on one GPU: use --comm hoststaged)."""
        n = sum(d.kind == "cuda" for d in self.settings.devices)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if n <= gpus or gpus == 0:
            return 1
        k = -(-n // gpus)
        log.warning("%d cuda ranks on %d GPUs: packing %d ranks per GPU (correct but slow)", n, gpus, k)
        return 1 / k

    def _check_resources(self) -> None:
        want = Counter("GPU" if d.kind == "cuda" else "CPU" for d in self.settings.devices)
        have = ray.cluster_resources()
        if have.get("GPU", 0) >= 1:  # extra cuda ranks share GPUs (see _gpu_share)
            want["GPU"] = min(want["GPU"], int(have["GPU"]))
        for kind, n in want.items():
            if n > have.get(kind, 0):
                raise ClusterError(f"--devices asks for {n} {'cuda' if kind == 'GPU' else 'cpu'} ranks, the Ray "
                                   f"cluster has {int(have.get(kind, 0))} {kind}s; use fewer devices or add nodes")

    def _budgets(self) -> list[tuple[str, int]]:
        cpu_ranks_per_node = Counter(r["node_id"] for r, d in zip(self.ranks, self.settings.devices) if d.kind == "cpu")
        budgets = []
        for r, d in zip(self.ranks, self.settings.devices):
            if d.kind == "cuda":
                budget = usable = int(r["free_bytes"] * GPU_RESERVE)
                if d.mem_bytes is not None:
                    budget = min(int(d.mem_bytes * GPU_CAP_RESERVE), usable)
                    if d.mem_bytes > usable:  # a cap is an upper bound, never a promise the card cannot keep
                        log.warning("rank %d %s: %s (%s) has %s usable; planning with that", r["rank"], d,
                                    r["device_name"], format_bytes(r["total_bytes"]), format_bytes(usable))
            elif d.mem_bytes is not None:
                budget = d.mem_bytes
            else:  # CPU ranks of one node share its free memory
                budget = r["free_bytes"] // cpu_ranks_per_node[r["node_id"]]
            budgets.append((str(d), budget))
        return budgets

    def _bandwidths(self) -> list[float] | None:
        """Each rank's memory bandwidth (bytes/s): from the device spec (~RATE), else on GPUs the copy bandwidth of
        its card model (cached, or measured now on the first rank holding one), shared among the ranks packed on
        one GPU. None where a CPU rank has none in its spec: CPU ranks share the host's memory bus in ways a
        figure per rank would not capture."""
        devices = self.settings.devices
        if any(d.bandwidth is None and d.kind != "cuda" for d in devices):
            return None
        per_model = cached_bandwidths()
        unknown = {r["device_name"]: r["rank"] for r, d in zip(self.ranks, devices)
                   if d.bandwidth is None and r["device_name"] not in per_model}
        if unknown:
            for name, rank in unknown.items():  # one at a time: ranks sharing a GPU must not halve each other
                per_model[name] = ray.get(self.workers[rank].on_rank.remote(_copy_bandwidth))
                log.info("measured %s: %.2f TB/s copy bandwidth (cached in %s)", name, per_model[name] / 1e12,
                         CACHE_FILE)
            remember_bandwidths({name: per_model[name] for name in unknown})
        sharing = Counter((r["node_id"], r["gpu_uuid"]) for r in self.ranks)
        return [d.bandwidth or per_model[r["device_name"]] / sharing[(r["node_id"], r["gpu_uuid"])]
                for r, d in zip(self.ranks, devices)]

    def _open_comm(self) -> None:
        """Choose the backend, then take every rank through the phases of raytp.parallel.comm.factory."""
        s = self.settings
        layout = node_layout([r["node_id"] for r in self.ranks])
        backend, why = choose_backend(s.comm, s.devices, len(layout), shared_gpus=self.gpu_share < 1)
        # `raytp bench` times every backend where the group is one node of several whole GPUs
        time_backends = s.time_backends and backend in ("hoststaged", "nccl", "p2p", "measured") \
            and len(layout) == 1 and len(s.devices) > 1 and all(d.kind == "cuda" for d in s.devices) \
            and self.gpu_share == 1
        init = None
        if backend in ("gloo", "nccl", "p2p", "measured") or (backend == "hierarchical" and len(layout) > 1) \
                or time_backends:
            init = f"tcp://{self.ranks[0]['ip']}:{ray.get(self.leader.free_port.remote())}"  # meet at rank 0
        if len(layout) > 1:
            log.info("nodes and their ranks: %s", "; ".join(
                f"{self.ranks[ranks[0]]['ip']} ({self.ranks[ranks[0]]['node_id'][:8]}): {ranks}" for ranks in layout))
        plan = CommPlan.make(backend, layout, init, s.timeout_s, gpu_hoststaged=self.gpu_share == 1,
                             check_identical=s.options.check_identical, dtype=s.dtype, time_backends=time_backends)

        def on(ranks: list[int], phase: str) -> list:
            return ray.get([self.workers[r].open_comm.remote(phase, plan) for r in ranks])

        try:
            on(plan.creators, "create")  # at once: torch.distributed joins wait for every member
            on(plan.attachers, "attach")
        finally:  # every rank mapped its node's segment, or something failed: either way no name may outlive this
            for ref in [self.workers[r].open_comm.remote("unlink", plan) for r in plan.creators]:
                try:
                    ray.get(ref)
                except ray.exceptions.RayError:  # that rank is gone; the error that matters is already raised
                    pass
        opened = on(list(range(len(self.workers))), "finish")
        self.backend = opened[0]["backend"]
        self.backend_us = opened[0]["timings"]
        log.info("all-reduce backend: %s (%s)", self.backend, opened[0]["why"] or why)
        for line in opened[0]["table"]:  # every rank's table is the same: the slowest rank's figures
            log.info("all-reduce %s", line)
        ranks_by_note: dict[str, list[int]] = {}
        for rank, o in enumerate(opened):
            for note in o["notes"]:
                ranks_by_note.setdefault(note, []).append(rank)
        for note, ranks in ranks_by_note.items():  # each reason once, however many ranks it holds for
            log.warning("ranks %s: %s", ranks, note)

    def shutdown(self, graceful: bool = True) -> None:
        """Stop the loop (if `graceful`), then end every actor and free the placement group. Idempotent.

        After a rank died the others are stuck in a collective: pass graceful=False to kill them at once."""
        if self.run_refs and graceful:
            try:
                self.leader.submit.remote(Stop())
                ray.wait(self.run_refs, num_returns=len(self.run_refs), timeout=5)
            except Exception:  # noqa: BLE001 - the group may be half dead; killing below is what matters
                pass
        for w in self.workers:
            ray.kill(w)
        if self.pg is not None:
            remove_placement_group(self.pg)
        self.workers, self.run_refs, self.pg = [], [], None
