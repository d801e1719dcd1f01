"""The running decode batch on the rank's device: static buffers that every step reads and rewrites in place, so
step N's sampled tokens and positions are step N+1's inputs without a trip through the host.

    tokens, positions, slots   (max_batch, 1), (max_batch, 1), (max_batch,): the model's inputs per row
    rows                       the rows' sampling parameters (raytp.runtime.sampling.SamplingRows)
    word                       the leader's news counter, riding along in the sampler's exchange
    out                        what the host reads back: the tokens, whether each draw was exact, rank 0's word
    out_logprobs               with it, when a row asks: each row's log-probability and top TOP_LOGPROBS_MAX

A step is the forward, the draw and the in-place advance (token written back, position + 1, token marked seen
for the repetition penalty), then a non-blocking copy of `out` into one of two pinned host buffers and an event:
`Pending.read` waits for that event, which the token loop does only after it has enqueued the next step. With
CUDA graphs the whole step is one replay where the communicator's gathers can be captured
(`gather_graph_safe`, NCCL), the forward alone otherwise. On CPU the same code runs and the copy is synchronous.

The host writes the buffers only when the batch changes (`load`, from its own view of the sequences); rows past
the live ones repeat the last one, which keeps a graph bucket's padding rows harmless.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raytp.model.llama import ShardedLlama
from raytp.runtime.sampling import GREEDY, TOP_LOGPROBS_MAX, Logprobs, SamplingParams, SamplingRows, ShardedSampler

NO_HISTORY = torch.empty(0, dtype=torch.int64)


@dataclass
class Pending:
    """One enqueued step: its rows (the token loop's sequences, in row order) and where its results will land."""

    rows: list
    host: torch.Tensor
    event: torch.cuda.Event | None
    host_logprobs: torch.Tensor | None = None  # when the step computed them

    def read(self) -> tuple[list[int], list[bool], int, Logprobs | None]:
        """(tokens, exact, rank 0's word, the rows' log-probabilities if computed), waiting for the step to end."""
        if self.event is not None:
            self.event.synchronize()
        b, m = len(self.rows), (len(self.host) - 1) // 2
        values = self.host.tolist()
        lp = None
        if self.host_logprobs is not None:
            T = TOP_LOGPROBS_MAX
            h = self.host_logprobs[:b]
            lp = Logprobs(h[:, 0], h[:, 1 : 1 + T], h[:, 1 + T :].to(torch.int64))
        return values[:b], [bool(x) for x in values[m : m + b]], values[-1], lp


class DecodeBatch:
    def __init__(self, model: ShardedLlama, sampler: ShardedSampler):
        self.model, self.sampler = model, sampler
        m, dev = model.max_batch, model.device
        self.vocab_local = model.lm_head.width
        self.tokens = torch.zeros((m, 1), dtype=torch.int64, device=dev)
        self.positions = torch.zeros((m, 1), dtype=torch.int64, device=dev)
        self.slots = torch.zeros(m, dtype=torch.int64, device=dev)
        self.rows = SamplingRows.build([SamplingParams()] * m, [0] * m, [NO_HISTORY] * m, model.vocab_start,
                                       self.vocab_local, dev)
        self.word = torch.zeros((1, 2), dtype=torch.float64, device=dev)
        self.out = torch.zeros(2 * m + 1, dtype=torch.int64, device=dev)
        cuda = dev.type == "cuda"
        self.host = [torch.zeros(2 * m + 1, dtype=torch.int64, pin_memory=cuda) for _ in range(2)]
        lp_shape = (m, 1 + 2 * TOP_LOGPROBS_MAX)  # chosen, top values, top ids (exact in float64)
        self.out_logprobs = torch.zeros(lp_shape, dtype=torch.float64, device=dev)
        self.host_logprobs = [torch.zeros(lp_shape, dtype=torch.float64, pin_memory=cuda) for _ in range(2)]
        self.flip = 0
        self.kind = GREEDY  # the highest kind of draw among the rows: what the step's sampler must do
        self.logprobs = False  # some row asks for log-probabilities: the step computes them (a variant of its own)
        self.constrained = False  # some row follows a grammar: its mask is written before every step
        self.span = 0  # cache positions the next eager step's attention reads (known here: no sync to find it)
        self.graphs = None
        self.whole = False  # graphs hold the whole step, not only the forward

    def use_graphs(self) -> None:
        """Replay steps from CUDA graphs (captured per kind of draw at the first `load` that needs it)."""
        from raytp.model.graphs import CapturedSteps

        self.whole = self.model.comm.gather_graph_safe or self.model.comm.world_size == 1  # one rank: no exchange
        self.graphs = CapturedSteps(self._captured, self.model.max_batch)

    def post(self, news: int) -> None:
        """Leader: the news counter every rank will read back from the next step."""
        self.word.fill_(news)

    def load(self, seqs: list) -> None:
        """Rewrite the buffers from the host's view of `seqs` (the token loop's sequences: `.tokens` are the
        prompt and the tokens read back so far, `.generated`, `.slot`, `.request.params`)."""
        self.kind = max(s.request.params.kind for s in seqs)
        self.logprobs = any(s.request.params.logprobs is not None for s in seqs)
        self.constrained = any(s.request.params.grammar is not None for s in seqs)
        self._write(seqs)
        variant = (self.kind, self.logprobs) if self.whole else None
        if self.graphs is not None and not self.graphs.has(variant):
            self.graphs.capture(variant)
            self._write(seqs)  # the capture's warm-up ran a step on them

    def allow(self, masks: dict[int, torch.Tensor]) -> None:
        """Write the grammar masks (vocab_local,) bool of the rows in `masks` for the next step."""
        for b, mask in masks.items():
            self.rows.allowed[b].copy_(mask, non_blocking=True)

    def _write(self, seqs: list) -> None:
        padded = seqs + [seqs[-1]] * (self.model.max_batch - len(seqs))
        self.tokens.copy_(torch.tensor([[s.tokens[-1]] for s in padded]))
        self.positions.copy_(torch.tensor([[len(s.tokens) - 1] for s in padded]))
        self.slots.copy_(torch.tensor([s.slot for s in padded]))
        params = [s.request.params for s in padded]
        histories = [torch.tensor(s.tokens) if p.repetition_penalty != 1 else NO_HISTORY
                     for s, p in zip(padded, params)]
        self.rows.copy_(SamplingRows.build(params, [s.generated for s in padded], histories, self.model.vocab_start,
                                           self.vocab_local, torch.device("cpu")))
        self.span = max(len(s.tokens) for s in seqs)

    def step(self, rows: list) -> tuple[Pending, torch.Tensor]:
        """Enqueue one decode step of the first len(rows) rows; returns its Pending and its logits (valid until
        the next step)."""
        b = len(rows)
        if self.graphs is not None:
            logits = self.graphs(b, (self.kind, self.logprobs) if self.whole else None)
            if not self.whole:
                self._advance(self.graphs.bucket(b), logits)
        else:
            logits = self._advance(b, self.model.forward(self.tokens[:b], self.positions[:b], self.slots[:b],
                                                         span=self.span))
        self.span += 1
        host, host_logprobs = self.host[self.flip], self.host_logprobs[self.flip]
        self.flip = 1 - self.flip
        host.copy_(self.out, non_blocking=True)
        if self.logprobs:
            host_logprobs.copy_(self.out_logprobs, non_blocking=True)
        event = None
        if self.out.is_cuda:
            event = torch.cuda.Event()
            event.record()
        return Pending(rows, host, event, host_logprobs if self.logprobs else None), logits[:b]

    def _captured(self, b: int, variant: tuple[int, bool] | None) -> torch.Tensor:
        logits = self.model.forward(self.tokens[:b], self.positions[:b], self.slots[:b], span=self.model.max_context)
        return logits if variant is None else self._advance(b, logits, *variant)

    def _advance(self, b: int, logits: torch.Tensor, kind: int | None = None,
                 logprobs: bool | None = None) -> torch.Tensor:
        """Draw the first b rows' tokens and make them, at the next position, the rows' next inputs."""
        rows = self.rows.head(b)
        logprobs = self.logprobs if logprobs is None else logprobs
        tokens, exact, word, lp = self.sampler.draw(logits, rows, self.kind if kind is None else kind, self.word,
                                                    logprobs)
        self.tokens[:b].copy_(tokens.unsqueeze(-1))
        self.positions[:b] += 1
        rows.position += 1
        if self.vocab_local:  # the repetition penalty's history gains the token where this shard holds it
            local = tokens - self.model.vocab_start
            mine = ((local >= 0) & (local < self.vocab_local)).unsqueeze(-1)
            index = local.clamp(0, self.vocab_local - 1).unsqueeze(-1)
            rows.seen.scatter_(1, index, rows.seen.gather(1, index) | mine)
        m = self.model.max_batch
        self.out[:b].copy_(tokens)
        self.out[m : m + b].copy_(exact)
        self.out[2 * m].copy_(word)
        if lp is not None:
            T = TOP_LOGPROBS_MAX
            self.out_logprobs[:b, 0].copy_(lp.chosen)
            self.out_logprobs[:b, 1 : 1 + T].copy_(lp.top)
            self.out_logprobs[:b, 1 + T :].copy_(lp.top_ids)
        return logits
