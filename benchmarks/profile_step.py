"""Where one decode step's time goes on one GPU (no Ray): the engine's whole step, the graph replay alone,
the host work between replays, and the kernels inside the graph.

    python benchmarks/profile_step.py [synthetic:llama-3.1-8b] [--context 2048]

Prints one line per measurement, then torch.profiler's table of the CUDA kernels of a few replays.
"""

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from raytp.kernels.dispatch import set_triton
from raytp.parallel.comm.factory import PHASES, CommPlan, open_group
from raytp.runtime.engine import Add, RankEngine, Request, Stop
from raytp.runtime.options import RuntimeOptions
from raytp.model.llama import ShardedLlama
from raytp.parallel.plan import plan_shards
from raytp.runtime.sampling import SamplingParams
from raytp.weights.source import ModelSource

parser = argparse.ArgumentParser()
parser.add_argument("model", nargs="?", default="synthetic:llama-3.1-8b")
parser.add_argument("--context", type=int, default=2048, help="max context (the span a graph's attention reads)")
args = parser.parse_args()
set_triton(RuntimeOptions.from_env().triton)  # RAYTP_TRITON=0 (benchmarks/gpu_run4.sh) times the torch kernels

source = ModelSource.parse(args.model)
config = source.config()
plan = plan_shards(config, [("cuda", 120 << 30)], max_context=args.context, max_batch=1, dtype="bfloat16")
opening = open_group(CommPlan.make("hoststaged", [[0]], None, timeout_s=30), 0, torch.device("cuda"))
for phase in PHASES:  # one rank: the GPU host-staged path, whose sum of one is the identity
    opening.step(phase)
comm = opening.comm
with source.reader(torch.bfloat16, torch.device("cuda")) as reader:
    lm = ShardedLlama(config, plan.ranks[0], comm, reader, max_batch=1, max_context=args.context)
engine = RankEngine(lm, comm)


def engine_step_ms(tokens: int) -> float:
    """The token loop as the ranks run it: commands, inputs, decode, sampling, events."""
    stamps = []

    def emit(events):
        stamps.append(time.perf_counter())
        if any(e.finish for e in events):
            engine.inbox.put(Stop())

    engine.inbox.put(Add(Request("r", list(range(1, 129)), SamplingParams(max_tokens=tokens), [])))
    engine.run(emit)
    return (stamps[-1] - stamps[1]) / (len(stamps) - 2) * 1e3


def replay_ms(graph: torch.cuda.CUDAGraph, n: int = 50) -> float:
    """The batch-1 graph alone, back to back: the GPU's share of a step."""
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n * 1e3


read_bytes = plan.ranks[0].read_bytes
bandwidth_ms = read_bytes / 4.26e12 * 1e3  # the copy bandwidth the bench measures on an H200
print(f"weights read per step: {read_bytes / 1e9:.2f} GB = {bandwidth_ms:.2f} ms at 4.26 TB/s")
print(f"eager engine step: {engine_step_ms(32):.2f} ms")
engine.use_cuda_graphs()
step = engine_step_ms(64)  # the first step of a kind captures its graphs
graph = next(g for (b, _), (g, _) in engine.batch.graphs.graphs.items() if b == 1)
replay = replay_ms(graph)
print(f"graph engine step: {step:.2f} ms; graph replay alone: {replay:.2f} ms; host work around it: "
      f"{step - replay:.2f} ms")
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70))
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    engine_step_ms(8)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))
