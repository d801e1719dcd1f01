"""Drafter (c) of raytp.runtime.speculation: the model's own multi-token-prediction layer (Qwen3.5/3.6 `mtp.*`,
`raytp.model.llama.MtpLayer`) guesses the tokens after the next.

The MTP layer pairs a token with the decoder's hidden state (after the final norm, as the lm_head reads it) of the
position before it, at that position: from (h[p], t[p+1]) it guesses h[p+1], whose logits through the shared lm_head
guess t[p+2]. Drafting k tokens after a sequence of n tokens runs (h[n-2], t[n-1]) and draws the first drafted
token, then feeds each drawn token with the layer's own guess of the hidden state before it, k - 1 more times. The
draws use each row's own sampling and the same noise as the target (raytp.runtime.sampling), at the positions the
target will draw at, as the draft model does (raytp.runtime.draft_model): where the MTP layer agrees with the target
its draft is the very token the target draws.

The layer has a KV cache of its own (one more full-attention layer's, a state of the model, copied with a slot), in
which position p must hold what (h[p], t[p+1]) gives, h[p] the decoder's. The hidden states come from the target's
own forwards, which return them where a row drafts with MTP (`ShardedLlama.forward(hidden=True)`): a prompt's
chunks (`prefill`: every position whose next token is the prompt's is run at once), and a verify step's accepted
positions (`record`). They wait in `pending` until the next draft runs them, with the tokens the target has taken
after them, before its first drafted position: that catch-up overwrites whatever the layer's own guesses had
written there (a draft's positions), as the target's cache overwrites a rejected draft. A plain decode step returns
no hidden state (a plain step pays nothing for drafting); a row that took plain steps (paused, or a batch too wide
to draft) lacks h[n-2] and is not `ready`: the engine then gives it one verify step without a draft, which returns
it, and the positions of the plain steps keep what the layer's cache held there, which costs acceptance, never a
token (the target decides every token).

Every rank runs the same MTP forwards in lock-step: fc and the norms are whole on each, the layer's attention and
MLP split as the decoder's are, joining their all-reduces; no Ray call among them. The drafter runs eagerly, not in
CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raytp.model.llama import ShardedLlama
from raytp.parallel.comm import Communicator
from raytp.runtime.draft_model import DraftRow, draw_drafted
from raytp.runtime.sampling import ShardedSampler


@dataclass
class Pending:
    """The decoder's hidden states (count, hidden) of positions start.. that the MTP layer has not run yet."""

    start: int
    hidden: torch.Tensor

    @property
    def end(self) -> int:
        return self.start + self.hidden.shape[0]


class MtpDrafter:
    def __init__(self, model: ShardedLlama, comm: Communicator):
        self.model, self.device = model, model.device
        self.sampler = ShardedSampler(comm, model.vocab_start)
        self.pending: dict[int, Pending] = {}  # slot -> hidden states waiting for the MTP layer

    def record(self, slot: int, start: int, hidden: torch.Tensor) -> None:
        """The decoder's hidden states (count, hidden) at positions start.. of `slot` (a verify step's accepted
        positions, or a prompt chunk's); where they do not follow those pending, the earlier ones are dropped."""
        held = self.pending.get(slot)
        if held is not None and held.end == start:
            hidden = torch.cat([held.hidden, hidden])
            start = held.start
        self.pending[slot] = Pending(start, hidden)

    def prefill(self, hidden: torch.Tensor, start: int, slot: int, prompt: list[int]) -> None:
        """A prompt chunk's hidden states (1, chunk, hidden) from position `start`: the layer runs every position
        whose next token is the prompt's now; the prompt's last position waits for the first generated token."""
        self.record(slot, start, hidden[0])
        held = self.pending[slot]
        end = min(held.end, len(prompt) - 1)
        if end > held.start:
            positions = torch.arange(held.start, end, device=self.device)[None]
            self.model.mtp_forward(torch.tensor([prompt[held.start + 1 : end + 1]], device=self.device),
                                   held.hidden[None, : end - held.start], positions,
                                   torch.tensor([slot], device=self.device))
            self.pending[slot] = Pending(end, held.hidden[end - held.start :])

    def copy_slot(self, src: int, dst: int) -> None:
        """The other samples of a request wait on the same prompt position (the layer's cache is copied with the
        model's states)."""
        self.pending[dst] = self.pending[src]

    def ready(self, slot: int, tokens: list[int]) -> bool:
        """Whether `slot` holds the decoder's hidden state of the position before the sequence's last token (the
        first draft needs it) and of every position since those the layer ran."""
        held = self.pending.get(slot)
        return held is not None and held.hidden.shape[0] > 0 and held.end == len(tokens) - 1

    def propose(self, rows: list[DraftRow]) -> list[list[int]]:
        """k drafted tokens per row (each `ready`), drawn as the target would draw them (every rank alike)."""
        held = [self.pending[row.slot] for row in rows]
        width = max(p.hidden.shape[0] for p in held)
        tokens, positions, hidden = [], [], []
        for row, p in zip(rows, held):
            pad = width - p.hidden.shape[0]
            run = row.tokens[p.start + 1 :]  # the token after each pending position
            # a shorter catch-up is padded with copies of its last position, which write that position's keys again
            tokens.append(run + run[-1:] * pad)
            positions.append(list(range(p.start, p.end)) + [p.end - 1] * pad)
            hidden.append(torch.cat([p.hidden, p.hidden[-1:].expand(pad, -1)]))
        last = torch.tensor([p.hidden.shape[0] - 1 for p in held], device=self.device)
        slots = torch.tensor([row.slot for row in rows], device=self.device)
        logits, out = self.model.mtp_forward(torch.tensor(tokens, device=self.device), torch.stack(hidden),
                                             torch.tensor(positions, device=self.device), slots, last)
        fed = [(tokens[b][-1], positions[b][-1], hidden[b][-1]) for b in range(len(rows))]  # each row's latest input
        guess = [out[b, last[b]] for b in range(len(rows))]  # the layer's guess of the hidden state after it
        drafts: list[list[int]] = [[] for _ in rows]
        widest = max(row.k for row in rows)
        for j in range(widest):
            drawn = draw_drafted(self.sampler, logits, rows, drafts, j)
            for b, row in enumerate(rows):
                if j < row.k:
                    drafts[b].append(drawn[b])
                if j + 1 < row.k:  # its next draft: this token after the guess; a row done feeds its last input again
                    fed[b] = (drawn[b], len(row.tokens) - 1 + j, guess[b])
            if j + 1 == widest:
                break
            logits, out = self.model.mtp_forward(torch.tensor([[t] for t, _, _ in fed], device=self.device),
                                                 torch.stack([h for _, _, h in fed])[:, None],
                                                 torch.tensor([[p] for _, p, _ in fed], device=self.device), slots)
            guess = [out[b, 0] for b in range(len(rows))]
        for row, p in zip(rows, held):
            self.pending[row.slot] = Pending(len(row.tokens) - 1, p.hidden[:0])
        return drafts
