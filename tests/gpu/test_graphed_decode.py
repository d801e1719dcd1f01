"""CUDA-graph decode gives the tokens eager decode gives (GPU host only)."""

import pytest
import torch

from raytp.parallel.comm.hoststaged_gpu import GpuHostStagedCommunicator
from raytp.runtime.engine import Add, RankEngine, Request, Stop
from raytp.model.graphs import GraphedDecode
from raytp.model.llama import ShardedLlama
from raytp.parallel.plan import plan_shards
from raytp.runtime.sampling import SamplingParams
from raytp.weights.source import ModelSource
from tests.test_comm import hoststaged_factory

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def generate(graphed: bool, prompts, dtype=torch.float32):
    source = ModelSource.parse("synthetic:tiny")
    config = source.config()
    plan = plan_shards(config, [("cuda", 8 << 30)], max_context=256, max_batch=4, dtype=str(dtype)[6:])
    comm = GpuHostStagedCommunicator(hoststaged_factory(1)(0), torch.device("cuda"))
    with source.reader(dtype, torch.device("cuda")) as reader:
        lm = ShardedLlama(config, plan.ranks[0], comm, reader, max_batch=4, max_context=256)
    engine = RankEngine(lm, comm, decode=GraphedDecode(lm) if graphed else None)
    out = {f"r{i}": [] for i in range(len(prompts))}
    for i, p in enumerate(prompts):
        engine.inbox.put(Add(Request(f"r{i}", p, SamplingParams(max_tokens=20 + 3 * i), [])))

    def emit(events):
        for e in events:
            if e.token_id is not None:
                out[e.request_id].append(e.token_id)
        if sum(len(v) for v in out.values()) == sum(20 + 3 * i for i in range(len(prompts))):
            engine.inbox.put(Stop())

    engine.run(emit)
    comm.close()
    return out


def test_graphed_decode_matches_eager_for_every_batch_bucket():
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [100], [42, 43]]  # 3 then fewer active rows: buckets 4, 2, 1
    assert generate(True, prompts) == generate(False, prompts)
