"""Drafter (b) of raytp.runtime.speculation: a smaller model of the target's vocabulary decodes a few tokens ahead.

The draft model is split over the same ranks as the target (its share planned with the target's, see
`raytp.model.pieces.plan_with_draft`) and shares their communicator: every rank runs the same draft steps in
lock-step, no Ray call among them. It drafts with each row's own sampling and the same noise as the target
(raytp.runtime.sampling: a pure function of seed, position and token id), at the positions the target will draw
them at, so where the two models agree the draft is the very token the target will draw, greedy or seeded.

Its KV cache has a slot per target slot. A row's prompt is prefilled into it chunk by chunk beside the target's
(`prefill`, and `copy_slot` for the other samples of a request). Drafting starts by catching the cache up with
what the sequence took since the row last drafted (`_valid`: the positions whose tokens the draft cache holds are
known, so only the tokens past them are run, with the sequence's last token): usually one or two tokens (the
target's token after an accepted run; a drafted token the target rejected is simply overwritten, as in the
target's cache), more after plain steps (in prefill chunks). Then one decode step per drafted token after the
first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raytp.model.llama import ShardedLlama
from raytp.parallel.comm import Communicator
from raytp.parallel.plan import PREFILL_CHUNK
from raytp.runtime.batch import NO_HISTORY
from raytp.runtime.sampling import SamplingParams, ShardedSampler


@dataclass
class DraftRow:
    """One row to draft for: its cache slot, its sequence so far, its sampling, its tokens generated, and k."""

    slot: int
    tokens: list[int]
    params: SamplingParams
    generated: int
    k: int


def draw_drafted(sampler: ShardedSampler, logits: torch.Tensor, rows: list[DraftRow], drafts: list[list[int]],
                 j: int) -> list[int]:
    """Each row's j-th drafted token from `logits` (rows, vocab_local): drawn with the row's own sampling and the
    target's noise at that position, after the row's tokens and its draft so far (`drafts`)."""
    histories = [torch.tensor(row.tokens + draft) if row.params.repetition_penalty != 1 else NO_HISTORY
                 for row, draft in zip(rows, drafts)]
    return sampler.draw_exact(logits, [row.params for row in rows], [row.generated + j for row in rows],
                              histories).tokens.tolist()


class ModelDrafter:
    def __init__(self, model: ShardedLlama, comm: Communicator, chunk: int = PREFILL_CHUNK):
        self.model, self.chunk = model, chunk  # `chunk`: the most positions a catch-up runs at once
        self.sampler = ShardedSampler(comm, model.vocab_start)
        self.device = model.device
        # slot -> (n, fed): the draft cache holds the sequence's first n tokens, then `fed`, tokens drafted after
        # them that the target may have rejected
        self.cached: dict[int, tuple[int, list[int]]] = {}

    def prefill(self, tokens: torch.Tensor, positions: torch.Tensor, slot: int, span: int) -> None:
        """A prompt chunk (1, chunk) of `slot`, at positions ending at `span`, as the target prefills it."""
        self.model.forward(tokens, positions, torch.tensor([slot], device=self.device), span=span)
        self.cached[slot] = (span, [])

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        self.model.copy_slot(src, dst, length)
        self.cached[dst] = (length, [])

    def _valid(self, slot: int, tokens: list[int]) -> int:
        """How many of `tokens` the draft cache holds, at most all but the last (which the next step feeds)."""
        n, fed = self.cached.get(slot, (0, []))
        same = 0
        while same < len(fed) and n + same < len(tokens) and tokens[n + same] == fed[same]:
            same += 1
        return min(n + same, len(tokens) - 1)

    def _catch_up_long(self, rows: list[DraftRow]) -> None:
        """Run the sequence tokens the draft cache lacks, a chunk at a time, for rows that lack more (plain steps
        while the batch was wide): no forward runs more positions than a prefill chunk does."""
        while True:
            behind = [row for row in rows if len(row.tokens) - self._valid(row.slot, row.tokens) > self.chunk]
            if not behind:
                return
            starts = [self._valid(row.slot, row.tokens) for row in behind]
            tokens = [row.tokens[start : start + self.chunk] for row, start in zip(behind, starts)]
            positions = [list(range(start, start + self.chunk)) for start in starts]
            self.model.forward(torch.tensor(tokens, device=self.device), torch.tensor(positions, device=self.device),
                               torch.tensor([row.slot for row in behind], device=self.device))
            for row, start in zip(behind, starts):
                self.cached[row.slot] = (start + self.chunk, [])

    def propose(self, rows: list[DraftRow]) -> list[list[int]]:
        """k drafted tokens per row, drawn as the target would draw them (every rank alike)."""
        self._catch_up_long(rows)
        starts = [self._valid(row.slot, row.tokens) for row in rows]
        feeds = [(row.tokens[start:], start) for row, start in zip(rows, starts)]
        width = max(len(feed) for feed, _ in feeds)
        # a shorter catch-up is padded with copies of its last position, which write that position's keys again
        tokens = [feed + feed[-1:] * (width - len(feed)) for feed, _ in feeds]
        positions = [[start + min(j, len(feed) - 1) for j in range(width)] for feed, start in feeds]
        slots = torch.tensor([row.slot for row in rows], device=self.device)
        logits = self.model.forward(torch.tensor(tokens, device=self.device),
                                    torch.tensor(positions, device=self.device), slots)
        last = [(feed[-1], start + len(feed) - 1) for feed, start in feeds]  # each row's latest input
        drafts: list[list[int]] = [[] for _ in rows]
        widest = max(row.k for row in rows)
        for j in range(widest):
            drawn = draw_drafted(self.sampler, logits, rows, drafts, j)
            for b, row in enumerate(rows):
                if j < row.k:
                    drafts[b].append(drawn[b])
                if j + 1 < row.k:  # its next draft needs this token in the cache; a row done feeds its last again
                    last[b] = (drawn[b], len(row.tokens) + j)
            if j + 1 == widest:
                break
            logits = self.model.forward(torch.tensor([[t] for t, _ in last], device=self.device),
                                        torch.tensor([[p] for _, p in last], device=self.device), slots)
        for row, draft in zip(rows, drafts):
            self.cached[row.slot] = (len(row.tokens), draft[: row.k - 1])
        return drafts
