"""Test helper: run one sharded model on N in-process ranks (threads), the way the workers run it."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from raytp.parallel.comm import InProcessGroup
from raytp.parallel.comm.base import IdentityCheckingCommunicator
from raytp.weights.source import ModelSource
from raytp.runtime.engine import Add, RankEngine, Request, Stop
from raytp.weights.checkpoint import SafetensorsReader
from raytp.model.llama import ShardedLlama
from raytp.parallel.plan import PREFILL_CHUNK
from raytp.model.pieces import plan_model, plan_with_draft
from raytp.runtime.sampling import SamplingParams

GiB = 1 << 30


class LocalGroup:
    """N ranks of `model_dir` split by `weights` (relative budgets), each in its own thread; with `bandwidths`
    (bytes/s per rank) the planner's speed split decides the shares within those budgets; `kv_dtype` as
    `--kv-dtype`; `blocks` the planner's block per piece name, where a tiny model needs finer ones;
    `act_quant_weight_only` as ShardedLlama takes it (None: as a group of CPU ranks runs); with `draft_dir` a draft
    model planned beside it (`plan_with_draft`) and loaded on every rank, sharing its communicator (`drafts`)."""

    def __init__(self, model_dir: Path, weights: list[float], *, max_context=256, max_batch=4,
                 dtype=torch.float32, bandwidths: list[float] | None = None, kv_dtype: str = "auto",
                 blocks: dict[str, int] | None = None, act_quant_weight_only: bool | None = None,
                 draft_dir: Path | None = None):
        self.config = ModelSource.parse(str(model_dir)).config()
        budgets = [(f"cpu{r}", int(w * GiB)) for r, w in enumerate(weights)]
        shape = dict(max_context=max_context, max_batch=max_batch, dtype=str(dtype).removeprefix("torch."),
                     bandwidths=bandwidths, kv_dtype=kv_dtype, blocks=blocks)
        draft = None if draft_dir is None else ModelSource.parse(str(draft_dir)).config()
        if draft is None:
            self.plan, self.draft_plan = plan_model(self.config, budgets, **shape), None
        else:
            self.plan, self.draft_plan = plan_with_draft(self.config, draft, budgets, **shape)
        group = InProcessGroup(len(weights))
        comms = [IdentityCheckingCommunicator(group.communicator(r)) for r in range(len(weights))]

        def load(directory, config, plan):
            with SafetensorsReader(directory, dtype, torch.device("cpu")) as reader:
                return [ShardedLlama(config, shard, comms[shard.rank], reader, max_batch=max_batch,
                                     max_context=max_context, kv_dtype=kv_dtype,
                                     act_quant_weight_only=act_quant_weight_only) for shard in plan.ranks]

        self.models = load(model_dir, self.config, self.plan)
        self.drafts = [None] * len(weights) if draft_dir is None else \
            load(draft_dir, draft, self.draft_plan)

    def on_all_ranks(self, fn):
        """fn(rank, model) on every rank concurrently; returns the per-rank results."""
        results, errors = [None] * len(self.models), []

        def target(r):
            try:
                results[r] = fn(r, self.models[r])
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=target, args=(r,)) for r in range(len(self.models))]
        [t.start() for t in threads]
        [t.join() for t in threads]
        if errors:
            raise errors[0]
        return results

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Full-vocab logits of the last position, assembled from every rank's slice."""
        B, T = tokens.shape
        positions = torch.arange(T).repeat(B, 1)
        slots = torch.arange(B)
        pieces = self.on_all_ranks(lambda r, m: m.forward(tokens, positions, slots))
        return torch.cat(pieces, dim=-1)

    def generate(self, prompts: list[list[int]], params: SamplingParams, stop_ids=(),
                 prefill_chunk: int = PREFILL_CHUNK) -> dict[str, list[int]]:
        """Run the real engine loop on every rank; returns generated ids per request id."""
        engines = [RankEngine(m, m.comm, prefill_chunk=prefill_chunk, draft=d)
                   for m, d in zip(self.models, self.drafts)]
        for i, p in enumerate(prompts):
            engines[0].inbox.put(Add(Request(f"r{i}", p, params, list(stop_ids))))
        out = {f"r{i}": [] for i in range(len(prompts))}
        remaining = set(out)

        def emit(events):
            for e in events:
                if e.token_id is not None:
                    out[e.request_id].append(e.token_id)
                if e.finish:
                    remaining.discard(e.request_id)
            if not remaining:
                engines[0].inbox.put(Stop())

        self.on_all_ranks(lambda r, m: engines[r].run(emit if r == 0 else lambda ev: None))
        for m in self.models:
            assert m.comm.checked > 0  # every all-reduce was checked for identical bits
        return out


_shared: dict[str, LocalGroup] = {}


def shared_group(model_dir: Path, weights: list[float], **options) -> LocalGroup:
    """LocalGroup(model_dir, weights, **options), kept for the next test (of any module) that asks for the same one:
    loading SmolLM2 costs seconds on 2 busy cores. One group at a time, so that a run holds one model in memory. For
    tests that run requests on it (each request fills the cache slots it reads); a test that changes its weights builds
    its own."""
    key = repr((str(model_dir), list(weights), sorted(options.items())))
    if key not in _shared:
        _shared.clear()
        _shared[key] = LocalGroup(model_dir, list(weights), **options)
    return _shared[key]


def assert_matches_reference(group: LocalGroup, reference, tokens: torch.Tensor, prompt_len: int,
                             greedy_tokens: int) -> None:
    """The group's last-position logits on `tokens` are the transformers `reference`'s within float32 tolerance, and
    its greedy continuation of tokens[0, :prompt_len] is the reference's, token for token."""
    with torch.no_grad():
        expected = reference(tokens).logits[:, -1]
    torch.testing.assert_close(group.logits(tokens), expected, rtol=1e-4, atol=1e-4)
    prompt = tokens[0, :prompt_len]
    with torch.no_grad():
        greedy = reference.generate(prompt[None], max_new_tokens=greedy_tokens, do_sample=False, eos_token_id=None,
                                    pad_token_id=0)[0, prompt_len:].tolist()
    assert group.generate([prompt.tolist()], SamplingParams(max_tokens=greedy_tokens))["r0"] == greedy
