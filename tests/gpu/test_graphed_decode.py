"""The device-resident decode loop replayed from CUDA graphs gives the tokens of the eager loop (GPU host only),
for greedy, temperature, top-p and top-k with repetition penalty, in batch buckets 4, 2 and 1; and the same
log-probabilities."""

import dataclasses

import pytest
import torch

from raytp.parallel.comm.factory import PHASES, CommPlan, open_group
from raytp.runtime.engine import Add, RankEngine, Request, Stop
from raytp.model.llama import ShardedLlama
from raytp.model.pieces import plan_model
from raytp.runtime.sampling import SamplingParams
from raytp.weights.source import ModelSource
from tests.util import free_port

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13], [100], [42, 43]]  # 4, then fewer active rows: buckets 4, 2, 1
PARAMS = [SamplingParams(max_tokens=20), SamplingParams(temperature=0.8, seed=3, max_tokens=23),
          SamplingParams(temperature=1.0, top_p=0.9, seed=4, max_tokens=26),
          SamplingParams(temperature=0.7, top_k=20, repetition_penalty=1.3, seed=5, max_tokens=29)]


def load(model: str, backend: str, kv_dtype: str = "auto", dtype: str = "float32") -> tuple[ShardedLlama, object]:
    """`model` on one GPU (4 slots of 256 positions) and its one-rank communicator."""
    source = ModelSource.parse(model)
    config = source.config()
    device = torch.device("cuda")
    plan = plan_model(config, [("cuda", 8 << 30)], max_context=256, max_batch=4, dtype=dtype, kv_dtype=kv_dtype)
    opening = open_group(CommPlan.make(backend, [[0]], f"tcp://127.0.0.1:{free_port()}", timeout_s=60), 0, device)
    for phase in PHASES:
        opening.step(phase)
    with source.reader(getattr(torch, dtype), device) as reader:
        lm = ShardedLlama(config, plan.ranks[0], opening.comm, reader, max_batch=4, max_context=256,
                          kv_dtype=kv_dtype)
    return lm, opening.comm


def load_draft(model: str, comm) -> ShardedLlama:
    """`model` again on the same GPU and communicator, as a draft model (4 slots of 256 positions)."""
    source = ModelSource.parse(model)
    config = source.config()
    plan = plan_model(config, [("cuda", 8 << 30)], max_context=256, max_batch=4, dtype="float32")
    with source.reader(torch.float32, torch.device("cuda")) as reader:
        return ShardedLlama(config, plan.ranks[0], comm, reader, max_batch=4, max_context=256)


def generate(graphed: bool, backend: str, kv_dtype: str = "auto", model: str = "synthetic:tiny",
             params: list[SamplingParams] = PARAMS, logprobs: dict | None = None,
             draft: str | None = None) -> dict[str, list[int]]:
    """The tokens of PROMPTS drawn with `params`; each token's (log-probability, top) go to `logprobs` if given;
    `draft` the draft model of `speculate: draft` rows."""
    lm, comm = load(model, backend, kv_dtype)
    engine = RankEngine(lm, comm, draft=None if draft is None else load_draft(draft, comm))
    if graphed:
        engine.use_cuda_graphs()
    out = {f"r{i}": [] for i in range(len(PROMPTS))}

    def emit(events):
        for e in events:
            if e.token_id is not None:
                out[e.request_id].append(e.token_id)
                if logprobs is not None:
                    logprobs.setdefault(e.request_id, []).append((e.logprob, e.top_logprobs))
        if sum(map(len, out.values())) == sum(p.max_tokens for p in params):
            engine.inbox.put(Stop())

    for i, (p, row) in enumerate(zip(PROMPTS, params)):
        engine.inbox.put(Add(Request(f"r{i}", p, row, [])))
    engine.run(emit)
    comm.close()
    assert all(len(out[f"r{i}"]) == p.max_tokens for i, p in enumerate(params))
    return out


def test_forward_graphs_match_eager_steps():
    """GPU host-staged: its gathers run on the host, so the graphs hold the forward and the sampler follows."""
    assert generate(True, "hoststaged") == generate(False, "hoststaged")


def test_whole_step_graphs_match_eager_steps():
    """NCCL: the sampler's exchange is captured too, so one replay is the whole step."""
    assert generate(True, "nccl") == generate(False, "nccl")


@pytest.mark.parametrize("backend", ["hoststaged", "nccl"])
def test_logprobs_in_graphs_match_eager_steps(backend):
    """Rows asking for logprobs next to rows that do not: the logprob variant of the graphs gives the eager
    tokens and log-probabilities (fixed TOP_LOGPROBS_MAX buffers, whatever N a row wants)."""
    params = [dataclasses.replace(p, logprobs=n) for p, n in zip(PARAMS, [5, None, 20, 0])]
    graphed, eager = {}, {}
    assert generate(True, backend, params=params, logprobs=graphed) == generate(False, backend, params=params,
                                                                                logprobs=eager)
    assert graphed.keys() == eager.keys() == {"r0", "r1", "r2", "r3"}
    for rid in graphed:
        for (chosen, top), (want, want_top) in zip(graphed[rid], eager[rid]):
            if want is None:  # r1 did not ask
                assert chosen is None and top is None
                continue
            assert chosen == pytest.approx(want, abs=1e-4)
            assert [i for i, _ in top] == [i for i, _ in want_top]
            assert [v for _, v in top] == pytest.approx([v for _, v in want_top], abs=1e-4)
