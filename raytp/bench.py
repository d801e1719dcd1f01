"""`raytp bench`: decode speed, all-reduce latency and memory bandwidth of one group, as a table and JSON.

What is measured, on the group the other commands would build:

    all-reduce   mean microseconds of one `comm.all_reduce` per message size, every rank in lock-step, on the
                 rank's own device in the run's dtype (rank 0's figure and the slowest rank's)
    bandwidth    each rank's device memory bandwidth: a large copy, bytes read plus written per second
    decode       for each batch size, that many requests of random token ids (greedy, EOS ignored) run together;
                 ms per step is timed on the leader between the step in which the last request got its first token
                 and the step in which the first one finished, so every timed step decodes the whole batch
    roofline     the bytes each rank must read per decode step (its weights bar the embedding, plus its KV cache at
                 the mean context) over its measured bandwidth; the slowest rank's time over the measured ms/step
                 is the fraction of the memory roofline reached

Both micro-benchmarks run after the communicator opens and before the shards load (the token loop owns the
communicator once it starts), so they see an idle device.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict

import ray
import torch

from raytp.actors.group import GroupSettings, WorkerGroup
from raytp.config import ModelConfig
from raytp.engine import Request
from raytp.plan import DTYPE_BYTES, ShardPlan
from raytp.sampling import SamplingParams

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
        self.allreduce = ray.get([w.bench_allreduce.remote(self.sizes, self.iters, wire) for w in self.workers])
        self.bandwidth = ray.get([w.bench_bandwidth.remote(self.bandwidth_bytes) for w in self.workers])


def _requests(batch: int, prompt_len: int, decode_tokens: int, vocab: int, tag: str) -> list[Request]:
    g = torch.Generator().manual_seed(0)  # the same prompts in every run, so runs can compare tokens
    params = SamplingParams(temperature=0.0, max_tokens=decode_tokens)
    return [Request(f"{tag}-{i}", torch.randint(vocab, (prompt_len,), generator=g).tolist(), params, [])
            for i in range(batch)]


def _run_batch(group: WorkerGroup, requests: list[Request], timeout_s: float = 600.0) -> dict:
    """Submit `requests` together; return the timed decode window and each request's tokens."""
    ray.get([group.leader.submit.remote(("add", asdict(r))) for r in requests])
    tokens = {r.id: [] for r in requests}
    first, finished, step_times = {}, {}, set()
    deadline = time.monotonic() + timeout_s
    while len(finished) < len(requests):
        if time.monotonic() > deadline:
            raise TimeoutError(f"benchmark requests did not finish within {timeout_s:.0f} s")
        for e in ray.get(group.leader.poll_events.remote(0.5)):
            rid, t = e["request_id"], e["t"]
            if e.get("error"):
                raise RuntimeError(f"request {rid} failed: {e['error']}")
            if e["token_id"] is not None:
                tokens[rid].append(e["token_id"])
            first.setdefault(rid, t)
            step_times.add(t)
            if e["finish"]:
                finished[rid] = t
    start, end = max(first.values()), min(finished.values())
    steps = sum(1 for t in step_times if start < t <= end)
    return {"steps": steps, "seconds": end - start, "tokens": [tokens[r.id] for r in requests]}


def _read_bytes_per_step(config: ModelConfig, plan: ShardPlan, batch: int, context: float) -> list[int]:
    """Bytes each rank reads in one decode step: weights except the embedding table, plus its KV cache."""
    nbytes = DTYPE_BYTES[plan.dtype]
    out = []
    for r in plan.ranks:
        embed = 0 if config.tie_word_embeddings else len(r.vocab_rows) * config.hidden_size * nbytes
        kv = int(batch * context * 2 * config.num_layers * len(r.kv_heads) * config.head_dim * nbytes)
        out.append(r.weight_bytes - embed + kv)
    return out


def run_bench(settings: GroupSettings, config: ModelConfig, *, batches: list[int], prompt_len: int,
              decode_tokens: int, repeats: int = 3, allreduce_sizes=ALLREDUCE_SIZES, allreduce_iters: int = 200,
              bandwidth_bytes: int | None = None) -> dict:
    """Build the group, measure, tear it down; returns the JSON-ready results (see the module docstring)."""
    if decode_tokens < 4:
        raise ValueError(f"--decode-tokens must be at least 4 to time whole-batch steps, got {decode_tokens}")
    if bandwidth_bytes is None:
        bandwidth_bytes = (4 << 30) if all(d.kind == "cuda" for d in settings.devices) else (256 << 20)
    group = _BenchGroup(settings, config, allreduce_sizes, allreduce_iters, bandwidth_bytes)
    started = time.perf_counter()
    try:
        group.build()
        build_s = time.perf_counter() - started
        _run_batch(group, _requests(batches[0], prompt_len, min(decode_tokens, 8), config.vocab_size, "warmup"))
        decode = []
        for batch in batches:
            runs = [_run_batch(group, _requests(batch, prompt_len, decode_tokens, config.vocab_size, f"b{batch}r{k}"))
                    for k in range(repeats)]
            ms = statistics.median(1000 * r["seconds"] / r["steps"] for r in runs if r["steps"])
            reads = _read_bytes_per_step(config, group.plan, batch, prompt_len + decode_tokens / 2)
            roofline_ms = max(1000 * b / bw for b, bw in zip(reads, group.bandwidth))
            decode.append({
                "batch": batch, "ms_per_step": ms, "ms_per_token": ms, "tokens_per_s": 1000 * batch / ms,
                "steps_timed": [r["steps"] for r in runs],
                "ms_per_step_runs": [1000 * r["seconds"] / r["steps"] if r["steps"] else None for r in runs],
                "read_bytes_per_step": reads, "roofline_ms": roofline_ms, "roofline_fraction": roofline_ms / ms,
                "greedy_tokens": runs[0]["tokens"][0],
            })
        sizes = [str(n) for n in allreduce_sizes]
        return {
            "model": settings.model, "devices": [str(d) for d in settings.devices], "backend": group.backend,
            "dtype": settings.dtype, "prompt_len": prompt_len, "decode_tokens": decode_tokens, "repeats": repeats,
            "build_s": build_s,
            "ranks": group.ranks, "plan": group.plan.to_dict(),
            "bandwidth_bytes_per_s": group.bandwidth,
            "allreduce_us": {"dtype": settings.dtype, "iters": allreduce_iters,
                             "rank0": {n: group.allreduce[0][int(n)] for n in sizes},
                             "slowest_rank": {n: max(a[int(n)] for a in group.allreduce) for n in sizes}},
            "decode": decode,
        }
    finally:
        group.shutdown()


def format_results(res: dict) -> str:
    gbs = ", ".join(f"{b / 1e12:.2f}" for b in res["bandwidth_bytes_per_s"])
    lines = [f"{res['model']} on {','.join(res['devices'])}, {res['backend']}, {res['dtype']}, "
             f"prompt {res['prompt_len']}, {res['decode_tokens']} decode tokens",
             f"device bandwidth (TB/s, copy read+write) per rank: {gbs}",
             "all-reduce us (rank 0): " + ", ".join(f"{n}: {us:.1f}" for n, us in res["allreduce_us"]["rank0"].items()),
             f"{'batch':>5}  {'ms/token':>9}  {'tokens/s':>10}  {'roofline ms':>11}  {'of roofline':>11}"]
    for d in res["decode"]:
        lines.append(f"{d['batch']:>5}  {d['ms_per_step']:>9.2f}  {d['tokens_per_s']:>10.1f}  "
                     f"{d['roofline_ms']:>11.3f}  {100 * d['roofline_fraction']:>10.1f}%")
    return "\n".join(lines)


def write_results(res: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(res, f, indent=2)
