"""Per-token cost of the Ray runtime on CPU: the same greedy decode in one process vs through `raytp generate`.

    python benchmarks/cpu_overhead.py            # SmolLM2, float32, cpu*1 and cpu@3GiB,cpu@2GiB,cpu@1GiB

CPU figures are for regressions, not claims: two cores shared by every rank.
"""

import json
import subprocess
import sys
import time

import torch

from raytp.parallel.comm import InProcessGroup
from raytp.model.config import ModelConfig
from raytp.runtime.engine import Add, RankEngine, Request, Stop
from raytp.weights.checkpoint import SafetensorsReader
from raytp.model.llama import ShardedLlama
from raytp.weights.smollm2 import pull_smollm2
from raytp.parallel.plan import plan_shards
from raytp.runtime.sampling import SamplingParams

TOKENS = 64
PROMPT = "The capital of France is"


def direct_tokens_per_s(model_dir) -> float:
    """One rank, no Ray, no driver: the engine loop alone."""
    config = ModelConfig.from_file(model_dir)
    plan = plan_shards(config, [("cpu", 8 << 30)], max_context=2048, max_batch=1, dtype="float32")
    comm = InProcessGroup(1).communicator(0)
    with SafetensorsReader(model_dir, torch.float32, torch.device("cpu")) as reader:
        engine = RankEngine(ShardedLlama(config, plan.ranks[0], comm, reader, max_batch=1, max_context=2048), comm)
    stamps = []

    def emit(events):
        stamps.extend(time.perf_counter() for e in events if e.token_id is not None)
        if any(e.finish for e in events):
            engine.inbox.put(Stop())

    engine.inbox.put(Add(Request("r", [1, 504, 3575, 282, 4649, 314], SamplingParams(max_tokens=TOKENS))))
    engine.run(emit)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def raytp_tokens_per_s(devices: str) -> float:
    out = subprocess.run([sys.executable, "-m", "raytp", "generate", "--model", "smollm2", "--devices", devices,
                          "--prompt", PROMPT, "--temperature", "0", "--dtype", "float32", "--max-tokens",
                          str(TOKENS), "--json"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["tokens_per_s"]


if __name__ == "__main__":
    model_dir = pull_smollm2()
    direct = direct_tokens_per_s(model_dir)
    one, three = raytp_tokens_per_s("cpu"), raytp_tokens_per_s("cpu@3GiB,cpu@2GiB,cpu@1GiB")
    print(f"direct engine, 1 rank:         {direct:6.1f} tokens/s")
    print(f"raytp generate, cpu*1:         {one:6.1f} tokens/s  ({(1 / one - 1 / direct) * 1e3:+.2f} ms/token vs direct)")
    print(f"raytp generate, 3 ranks 3:2:1: {three:6.1f} tokens/s")
