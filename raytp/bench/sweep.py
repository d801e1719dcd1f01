"""`raytp bench`: decode and prefill speed, all-reduce latency and memory bandwidth, over a sweep of configurations.

A sweep is every combination of device set (`--devices-sweep "cuda*1;cuda*2;..."`), weight quantization
(`--quant none,w4a16`), backend (`--comm`), prompt length (`--prompt-len`) and batch size (`--batch`). One group is
built per (device set, quantization, backend, prompt length), its KV cache sized to that prompt, and runs every
batch size. A group that cannot exist is skipped with the reason (the model does not fit: PlanError or a rank over
its budget; the cluster lacks the devices: ClusterError) and the sweep goes on. `raytp.bench.report` turns the
results into CSV, JSON, a markdown summary and plots.

What is measured on each group:

    all-reduce   mean microseconds of one `comm.all_reduce` per message size, every rank in lock-step, on the
                 rank's own device in the run's dtype (rank 0's figure and the slowest rank's); the sizes asked
                 for plus batch x hidden, the decode step's own message
    backends     on one node of several GPUs, every all-reduce backend that can run there (p2p, host-staged, nccl),
                 whichever the group uses, timed at start-up inside a CUDA graph (raytp.parallel.comm.factory);
                 `--no-p2p` emulates a host without GPU peer-to-peer
    bandwidth    each rank's device memory bandwidth: a large copy, bytes read plus written per second
    decode       after one warm-up run per batch size, `repeats` runs per batch size: that many requests of random
                 token ids (greedy, EOS ignored) run together; ms per step is timed on the leader between the step
                 in which the last request got its first token and the step in which the first one finished, so
                 every timed step decodes the whole batch; the median run is kept. Every run of a batch size has
                 the same prompts: with the benchmark drafter (`--speculate oracle:RATE[:K]`,
                 raytp.runtime.oracle) the warm-up decodes as many tokens as the timed runs, plainly (nothing is
                 scripted yet), and its tokens are their script; `same_tokens_as_plain` says whether they kept to it
    prefill      one request of the prompt length, from the moment the leader queues it to its first token, on the
                 leader's clock (median of `repeats`)
    roofline     the bytes each rank must read per decode step (its weights bar the embedding, as the planner counts
                 them in the group's quantization, plus the state a step reads at the mean context: KV caches up to
                 it, window caches up to their window, recurrent states whole) over its measured
                 bandwidth; the slowest rank's time over the measured ms/step is the fraction of the memory
                 roofline reached
    breakdown    an estimate, not a profile: compute = the roofline time, all-reduce = the measured latency at the
                 decode message size x the all-reduces of one step (2 per layer + the embedding's), overhead = the
                 measured step minus both
    profile      with `profile_steps`, after everything above, one more run per batch size in which every rank
                 profiles that many decode steps with torch.profiler (raytp.bench.profile): ms per step in weight
                 GEMMs, attention, all-reduce, small kernels and idle; with `trace_dir`, each rank's chrome trace
                 is saved there

Both micro-benchmarks run after the communicator opens and before the shards load (the token loop owns the
communicator once it starts), so they see an idle device.
"""

from __future__ import annotations

import logging
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import ray
import torch

from raytp.actors.group import ClusterError, GroupSettings, WorkerGroup, choose_backend
from raytp.actors.worker import MemoryBudgetError
from raytp.bench import microbench, profile
from raytp.model.config import ModelConfig, quant_name
from raytp.model.pieces import decode_read_bytes
from raytp.parallel.devices import DeviceSpec
from raytp.runtime.engine import Add, Request
from raytp.runtime.errors import error_summary
from raytp.runtime.options import RuntimeOptions
from raytp.parallel.plan import PlanError
from raytp.runtime.sampling import SamplingParams
from raytp.runtime.speculation import ORACLE, speculate_option
from raytp.weights.source import ModelSource

log = logging.getLogger("raytp")

ALLREDUCE_SIZES = (4096, 8192, 131072, 2097152)  # elements: decode hidden states up to a prefill chunk


class _BenchGroup(WorkerGroup):
    """A WorkerGroup that times its communicator and devices before loading the shards."""

    def __init__(self, settings: GroupSettings, config: ModelConfig, sizes, iters: int, bandwidth_bytes: int):
        super().__init__(settings, config)
        self.sizes, self.iters, self.bandwidth_bytes = list(sizes), iters, bandwidth_bytes
        self.allreduce: list[dict] = []
        self.bandwidth: list[float] = []

    def _open_comm(self) -> None:
        super()._open_comm()
        wire = self.settings.dtype
        self.allreduce = ray.get([w.on_rank.remote(microbench.allreduce_us, self.sizes, self.iters, wire)
                                  for w in self.workers])
        self.bandwidth = ray.get([w.on_rank.remote(microbench.copy_bandwidth, self.bandwidth_bytes)
                                  for w in self.workers])


def random_requests(batch: int, prompt_len: int, decode_tokens: int, vocab: int, tag: str,
                    speculate: str = "off") -> list[Request]:
    g = torch.Generator().manual_seed(0)  # the same prompts in every run, so runs can compare tokens
    params = SamplingParams(temperature=0.0, max_tokens=decode_tokens, speculate=speculate)
    return [Request(f"{tag}-{i}", torch.randint(vocab, (prompt_len,), generator=g).tolist(), params, [])
            for i in range(batch)]


def _events(group: WorkerGroup, deadline: float, timeout_s: float):
    """The leader's token events as they come, until the caller stops; errors and timeouts raise."""
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError(f"benchmark requests did not finish within {timeout_s:.0f} s")
        for e in ray.get(group.leader.poll_events.remote(0.5)):
            if e.error:
                raise RuntimeError(f"request {e.request_id} failed: {e.error}")
            yield e


def _run_batch(group: WorkerGroup, requests: list[Request], timeout_s: float = 600.0) -> dict:
    """Submit `requests` together; return the timed decode window (its steps, seconds and tokens), each request's
    tokens, and the drafted and accepted tokens of all verify steps (raytp.runtime.speculation) with the number of
    those steps that rejected one."""
    ray.get([group.leader.submit.remote(Add(r)) for r in requests])
    tokens = {r.id: [] for r in requests}
    first, finished, step_times, token_times = {}, {}, set(), []
    drafted = accepted = rejected = 0
    for e in _events(group, time.monotonic() + timeout_s, timeout_s):
        rid, t = e.request_id, e.t
        if e.token_id is not None:
            tokens[rid].append(e.token_id)
            token_times.append(t)
        drafted, accepted = drafted + e.drafted, accepted + e.accepted
        rejected += e.accepted < e.drafted  # the verify step stopped at a wrong token (the bench ignores EOS, and
        # drafts never run past max_tokens)
        first.setdefault(rid, t)
        step_times.add(t)
        if e.finish:
            finished[rid] = t
            if len(finished) == len(requests):
                break
    start, end = max(first.values()), min(finished.values())
    steps = sum(1 for t in step_times if start < t <= end)
    return {"steps": steps, "seconds": end - start, "window_tokens": sum(1 for t in token_times if start < t <= end),
            "tokens": [tokens[r.id] for r in requests], "drafted": drafted, "accepted": accepted,
            "rejected": rejected}


def _prefill_seconds(group: WorkerGroup, request: Request, timeout_s: float = 600.0) -> float:
    """From the leader queuing `request` (max_tokens 1) to its first token, both on the leader's clock."""
    queued = ray.get(group.leader.submit_timed.remote(Add(request)))
    for e in _events(group, time.monotonic() + timeout_s, timeout_s):
        if e.request_id == request.id and e.finish:
            return e.t - queued


def _profile_decode(group: WorkerGroup, batch: int, prompt_len: int, steps: int,
                    trace_dir: Path | None, name: str) -> list[dict]:
    """One run of `batch` requests in which every rank profiles `steps` decode steps; one summary per rank
    (raytp.bench.profile.summarize), its chrome trace written to `trace_dir` as NAME_rankR.json.gz if given."""
    # the profile counts from the step in which the last request joined; the first ones are a few steps ahead, so
    # each gets tokens to spare and the batch stays whole through the profiled steps
    requests = random_requests(batch, prompt_len, profile.tokens_for(steps) + 2 * batch, group.config.vocab_size,
                               f"profile{batch}")
    ids = [r.id for r in requests]
    ray.get([w.watch_steps.remote(profile.StepProfiler(ids, steps, d.kind, trace_dir is not None))
             for w, d in zip(group.workers, group.settings.devices)])
    _run_batch(group, requests)
    ranks = ray.get([w.watched.remote() for w in group.workers])
    if trace_dir is not None:
        trace_dir.mkdir(parents=True, exist_ok=True)
        for rank, p in enumerate(ranks):
            path = trace_dir / f"{name}_rank{rank}.json.gz"
            path.write_bytes(p.pop("trace_gz"))
            p["trace"] = path.name
    return ranks


def allreduces_per_step(config: ModelConfig) -> int:
    """All-reduces of one forward (raytp.model.llama): the embedding's, then o_proj's and down_proj's in every layer."""
    return 1 + 2 * config.num_layers


def run_bench(settings: GroupSettings, config: ModelConfig, *, batches: list[int], prompt_len: int,
              decode_tokens: int, repeats: int = 3, allreduce_sizes=ALLREDUCE_SIZES, allreduce_iters: int = 200,
              bandwidth_bytes: int | None = None, profile_steps: int = 0, trace_dir: Path | None = None,
              name: str = "run") -> dict:
    """Build one group, measure, tear it down; returns the JSON-ready results (see the module docstring)."""
    if bandwidth_bytes is None:
        bandwidth_bytes = (4 << 30) if all(d.kind == "cuda" for d in settings.devices) else (256 << 20)
    step_sizes = {b: b * config.hidden_size for b in batches}  # elements of one decode all-reduce
    measured = sorted(set(allreduce_sizes) | set(step_sizes.values()))
    group = _BenchGroup(settings, config, measured, allreduce_iters, bandwidth_bytes)
    started = time.perf_counter()
    try:
        group.build()
        build_s = time.perf_counter() - started
        vocab = config.vocab_size
        speculate = settings.speculate
        drafting = speculate_option(settings.draft_model, speculate)  # as --speculate gives it, the draft model named
        # the oracle's script is the warm-up's tokens: it decodes all of them (raytp.runtime.oracle)
        oracle = speculate.partition(":")[0] == ORACLE
        warm = {batch: _run_batch(group, random_requests(batch, prompt_len, decode_tokens if oracle else
                                                         min(decode_tokens, 4), vocab, f"warm{batch}", speculate))
                for batch in batches}  # every batch size once (allocator, kernels, caches at this shape)
        n_allreduce = allreduces_per_step(config)
        slowest = {n: max(a[n] for a in group.allreduce) for n in measured}
        decode = []
        for batch in batches:
            runs = [_run_batch(group, random_requests(batch, prompt_len, decode_tokens, vocab, f"b{batch}r{k}",
                                                      speculate)) for k in range(repeats)]
            timed = [r for r in runs if r["steps"]]
            ms = statistics.median(1000 * r["seconds"] / r["steps"] for r in timed)
            tokens_per_s = statistics.median(r["window_tokens"] / r["seconds"] for r in timed)
            drafted, accepted = sum(r["drafted"] for r in runs), sum(r["accepted"] for r in runs)
            reads = decode_read_bytes(config, group.plan, batch, prompt_len + decode_tokens / 2)
            roofline_ms = max(1000 * b / bw for b, bw in zip(reads, group.bandwidth))
            allreduce_ms = n_allreduce * slowest[step_sizes[batch]] / 1000
            decode.append({
                "batch": batch, "ms_per_step": ms, "ms_per_token": 1000 * batch / tokens_per_s,
                "tokens_per_s": tokens_per_s, "speculate": drafting,
                # of a row, in the timed steps; above 1 only where verify steps accepted drafted tokens
                "tokens_per_step": statistics.median(r["window_tokens"] / (r["steps"] * batch) for r in timed),
                "acceptance": accepted / drafted if drafted else None,
                # a drafted token's chance of acceptance where every one before it in its draft was accepted: the
                # tokens checked are the accepted ones and the first wrong one of each draft (oracle: RATE)
                "position_acceptance": (accepted / (accepted + sum(r["rejected"] for r in runs))
                                        if drafted else None),
                "steps_timed": [r["steps"] for r in runs],
                "ms_per_step_runs": [1000 * r["seconds"] / r["steps"] if r["steps"] else None for r in runs],
                "read_bytes_per_step": reads, "roofline_ms": roofline_ms, "roofline_fraction": roofline_ms / ms,
                "allreduce_elements": step_sizes[batch], "allreduce_us": slowest[step_sizes[batch]],
                "compute_ms": roofline_ms, "allreduce_ms": allreduce_ms, "overhead_ms": ms - roofline_ms - allreduce_ms,
                "greedy_tokens": runs[0]["tokens"][0],
                # oracle: whether every timed run decoded the warm-up's (plain) tokens, its script; where one left
                # it (a verify step broke a near tie otherwise than a plain step), that row drafted no further
                "same_tokens_as_plain": all(r["tokens"] == warm[batch]["tokens"] for r in runs) if oracle else None,
            })
        prefill_s = statistics.median(
            _prefill_seconds(group, random_requests(1, prompt_len, 1, vocab, f"prefill{k}")[0])
            for k in range(repeats))
        for d in decode if profile_steps else []:  # last: the profiler must not disturb the timed runs
            d["profile"] = _profile_decode(group, d["batch"], prompt_len, profile_steps, trace_dir,
                                           f"{name}_b{d['batch']}")
        sizes = [str(n) for n in allreduce_sizes]
        return {
            "model": settings.model, "devices": [str(d) for d in settings.devices], "backend": group.backend,
            "dtype": settings.dtype, "kv_dtype": settings.kv_dtype, "options": asdict(settings.options),
            "prompt_len": prompt_len, "decode_tokens": decode_tokens, "repeats": repeats,
            "build_s": build_s, "nodes": len({r["node_id"] for r in group.ranks}),
            "ranks": group.ranks, "plan": group.plan.to_dict(),
            "bandwidth_bytes_per_s": group.bandwidth,
            "allreduce_us": {"dtype": settings.dtype, "iters": allreduce_iters,
                             "rank0": {n: group.allreduce[0][int(n)] for n in sizes},
                             "slowest_rank": {n: max(a[int(n)] for a in group.allreduce) for n in sizes},
                             "by_size": {str(n): {"rank0": group.allreduce[0][n], "slowest_rank": slowest[n]}
                                         for n in measured}},
            "allreduces_per_step": n_allreduce,
            # every backend timed at start-up in a CUDA graph, slowest rank: backend -> elements -> us
            "backend_us": {name: {str(n): us for n, us in by_size.items()}
                           for name, by_size in group.backend_us.items()},
            "prefill": {"prompt_len": prompt_len, "ms": 1000 * prefill_s, "tokens_per_s": prompt_len / prefill_s},
            "decode": decode,
        }
    finally:
        group.shutdown()


# ---- sweeps -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sweep:
    """Every combination of these is one configuration (one row of results.csv)."""

    models: tuple[str, ...]  # the --model spec of each quantization compared: synthetic:NAME, synthetic:NAME@w4a16
    device_sets: tuple[tuple[str, tuple[DeviceSpec, ...]], ...]  # (the SPEC as typed, its parsed devices)
    comms: tuple[str, ...]
    batches: tuple[int, ...]
    prompt_lens: tuple[int, ...]
    dtype: str = "bfloat16"
    kv_dtype: str = "auto"  # the KV cache's storage (raytp.kernels.kv_fp8 for fp8)
    decode_tokens: int = 64
    repeats: int = 3
    max_context: int = 2048  # the KV cache holds at least this, and always prompt + decode tokens
    max_batch: int = 0  # likewise at least the largest batch
    allreduce_sizes: tuple[int, ...] = ALLREDUCE_SIZES
    allreduce_iters: int = 200
    options: RuntimeOptions = RuntimeOptions()  # the same run-time switches in every configuration
    splits: tuple[str | None, ...] = (None,)  # "memory", "speed", or None: the group's default
    share_gpus: bool = False  # let more cuda ranks than GPUs share them (emulates slower devices), not skip
    speculate: str = "off"  # the requests' drafting (raytp.runtime.speculation)
    draft_model: str | None = None  # the draft model `speculate: draft` drafts with, on every configuration's ranks
    profile_steps: int = 0  # decode steps each rank profiles per batch size (raytp.bench.profile); 0: none
    trace_dir: str | None = None  # where the profiled steps' chrome traces go; None: not kept
    no_p2p: bool = False  # emulate a host without GPU peer-to-peer (raytp.actors.group.NO_P2P_ENV)

    @property
    def size(self) -> int:
        return (len(self.device_sets) * len(self.models) * len(self.comms) * len(self.splits) * len(self.prompt_lens)
                * len(self.batches))


def _skip_reason(e: BaseException) -> str | None:
    """Why a configuration cannot run on this cluster (then it is skipped, not failed); None for real failures."""
    cause = getattr(e, "cause", None) or e  # a RayTaskError carries the rank's exception as `cause`
    if isinstance(cause, torch.OutOfMemoryError):
        return f"OutOfMemoryError: {str(cause).splitlines()[0]}"
    if isinstance(cause, (PlanError, MemoryBudgetError, ClusterError)):
        return f"{type(cause).__name__}: {' '.join(ln.strip() for ln in str(cause).splitlines() if ln.strip())}"
    return None


def _file_name(text: str) -> str:
    """`text` with every run of characters a file name should not hold replaced by one underscore."""
    return re.sub(r"[^A-Za-z0-9.@=-]+", "_", text)


def _check_devices(devices: tuple[DeviceSpec, ...], comm: str, share_gpus: bool) -> None:
    """Skip at once what cannot run, before any actor starts: a backend the devices cannot use, and, unless
    `share_gpus`, more cuda ranks than the cluster has GPUs (a plain group would pack several ranks on one GPU,
    and the sweep would measure them as if they were separate GPUs)."""
    choose_backend(comm, devices, 1)  # raises ClusterError for nccl on cpu ranks whatever the node count
    want = sum(d.kind == "cuda" for d in devices)
    have = int(ray.cluster_resources().get("GPU", 0))
    if want > have and not (share_gpus and have):
        raise ClusterError(f"needs {want} GPUs, the Ray cluster has {have}" + ("" if share_gpus else
                           " (--share-gpus lets ranks share them)"))


def run_sweep(sweep: Sweep, *, on_row: Callable[[dict], None] | None = None,
              on_run: Callable[[dict], None] | None = None,
              on_config: Callable[[dict], None] | None = None) -> dict:
    """Run every configuration of `sweep`. Returns {"runs": [run_bench results], "outcomes": [one per configuration]}.

    An outcome is {"devices", "quant", "comm", "split", "prompt_len", "batch", "status": "ok" | "skipped" | "failed",
    "reason"} and, when ok, the index of its run; "quant" names the model's quantization (raytp.model.config.
    quant_name). `on_row` sees each outcome as it is decided, `on_run` each finished run, and `on_config` the whole
    result so far after each configuration (so an interrupted sweep keeps what it did)."""
    runs, outcomes = [], []
    configs = {model: ModelSource.parse(model).config() for model in sweep.models}

    def decide(spec: str, quant: str, comm: str, split: str | None, prompt_len: int, status: str, reason: str = "",
               run: int | None = None):
        for batch in sweep.batches:
            outcome = {"devices": spec, "quant": quant, "comm": comm, "split": split, "prompt_len": prompt_len,
                       "batch": batch, "status": status, "reason": reason, "run": run}
            outcomes.append(outcome)
            if on_row:
                on_row(outcome)
        if on_config:
            on_config({"runs": runs, "outcomes": outcomes})

    profile_tokens = profile.tokens_for(sweep.profile_steps)
    configurations = ((spec, devices, model, comm, split, prompt_len) for spec, devices in sweep.device_sets
                      for model in sweep.models for comm in sweep.comms for split in sweep.splits
                      for prompt_len in sweep.prompt_lens)
    for spec, devices, model, comm, split, prompt_len in configurations:
        config, quant = configs[model], quant_name(configs[model].quant)
        settings = GroupSettings(
            model=model, devices=devices, dtype=sweep.dtype, kv_dtype=sweep.kv_dtype, comm=comm,
            max_context=max(sweep.max_context, prompt_len + max(sweep.decode_tokens, profile_tokens) + 1),
            max_batch=max(sweep.max_batch, *sweep.batches), progress=False, options=sweep.options,
            split=split, no_p2p=sweep.no_p2p, time_backends=True, speculate=sweep.speculate,
            draft_model=sweep.draft_model)
        try:
            _check_devices(devices, comm, sweep.share_gpus)
            res = run_bench(settings, config, batches=list(sweep.batches), prompt_len=prompt_len,
                            decode_tokens=sweep.decode_tokens, repeats=sweep.repeats,
                            allreduce_sizes=sweep.allreduce_sizes, allreduce_iters=sweep.allreduce_iters,
                            profile_steps=sweep.profile_steps,
                            trace_dir=Path(sweep.trace_dir) if sweep.trace_dir else None,
                            name=_file_name(f"{spec}_{quant}_{comm}_{split or 'default'}_p{prompt_len}"))
        except Exception as e:  # noqa: BLE001 - one configuration's failure must not end the sweep
            reason = _skip_reason(e)
            if reason is None:
                log.error("%s %s --comm %s prompt %d failed: %s", spec, quant, comm, prompt_len, e)
            decide(spec, quant, comm, split, prompt_len, "failed" if reason is None else "skipped",
                   reason or error_summary(e))
            continue
        res |= {"spec": spec, "quant": quant, "comm": comm}
        runs.append(res)
        if on_run:
            on_run(res)
        decide(spec, quant, comm, res["plan"]["split"], prompt_len, "ok", run=len(runs) - 1)
    return {"runs": runs, "outcomes": outcomes}


def format_results(res: dict) -> str:
    gbs = ", ".join(f"{b / 1e12:.2f}" for b in res["bandwidth_bytes_per_s"])
    lines = [f"{res['model']} on {','.join(res['devices'])}, {res['backend']}, {res['dtype']}, "
             f"quantization {res['quant']}, prompt {res['prompt_len']}, {res['decode_tokens']} decode tokens",
             f"device bandwidth (TB/s, copy read+write) per rank: {gbs}",
             "all-reduce us (rank 0): " + ", ".join(f"{n}: {us:.1f}" for n, us in res["allreduce_us"]["rank0"].items()),
             *(f"{name} all-reduce us in a CUDA graph (slowest rank): " + ", ".join(f"{n}: {us:.1f}" for n, us in
               by_size.items()) for name, by_size in res["backend_us"].items()),
             f"prefill: {res['prefill']['tokens_per_s']:.1f} tokens/s ({res['prefill']['ms']:.1f} ms)",
             f"{'batch':>5}  {'ms/token':>9}  {'tokens/s':>10}  {'roofline ms':>11}  {'of roofline':>11}"]
    for d in res["decode"]:
        lines.append(f"{d['batch']:>5}  {d['ms_per_step']:>9.2f}  {d['tokens_per_s']:>10.1f}  "
                     f"{d['roofline_ms']:>11.3f}  {100 * d['roofline_fraction']:>10.1f}%")
    for d in res["decode"]:
        for rank, p in enumerate(d.get("profile", [])):
            parts = ", ".join(f"{profile.LABELS[c]} {p[f'{c}_ms']:.2f}" for c in profile.CLASSES)
            lines.append(f"profile batch {d['batch']} rank {rank} ({p['decode']}): {p['step_ms']:.2f} ms = {parts}")
    return "\n".join(lines)


def cluster_line(runs: list[dict]) -> str:
    res = ray.cluster_resources()
    names = sorted({r["device_name"] for run in runs for r in run["ranks"]})
    return (f"Ray cluster of {len([n for n in ray.nodes() if n['Alive']])} node(s), {int(res.get('GPU', 0))} GPU(s), "
            f"{int(res.get('CPU', 0))} CPU slot(s)" + (f"; devices: {', '.join(names)}" if names else ""))
