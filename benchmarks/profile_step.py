"""Where one decode step's time goes on one GPU (no Ray): eager vs CUDA-graph step, then torch.profiler
of the graph-mode steps (host work around each replay, and the kernels inside it).

    python benchmarks/profile_step.py synthetic:llama-3.1-8b
"""

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from raytp.comm.hoststaged_gpu import GpuHostStagedCommunicator
from raytp.engine import RankEngine, Request
from raytp.graphs import GraphedDecode
from raytp.model import ShardedLlama
from raytp.plan import plan_shards
from raytp.sampling import SamplingParams
from raytp.source import load_weights, model_config
from tests.test_comm import hoststaged_factory

model = sys.argv[1] if len(sys.argv) > 1 else "synthetic:llama-3.1-8b"
config = model_config(model)
plan = plan_shards(config, [("cuda", 120 << 30)], max_context=1024, max_batch=1, dtype="bfloat16")
comm = GpuHostStagedCommunicator(hoststaged_factory(1)(0), torch.device("cuda"))
weights = load_weights(model, config, plan.ranks[0], dtype=torch.bfloat16, device=torch.device("cuda"), progress=False)
lm = ShardedLlama(config, plan.ranks[0], comm, weights, max_batch=1, max_context=1024)
engine = RankEngine(lm, comm)
steps = []


def run(tokens):
    stamps = []

    def emit(events):
        stamps.append(time.perf_counter())
        if any(e.finish for e in events):
            engine.inbox.put(("stop",))

    engine.inbox.put(("add", Request("r", list(range(1, 129)), SamplingParams(max_tokens=tokens), [])))
    engine.run(emit)
    return (stamps[-1] - stamps[1]) / (len(stamps) - 2) * 1e3


print(f"eager step: {run(64):.2f} ms/token")
engine.decode_step = GraphedDecode(lm)
print(f"CUDA-graph step: {run(64):.2f} ms/token")
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    run(16)  # graph mode: what is left on the host around each replay
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12))
