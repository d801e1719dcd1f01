"""The benchmark drafter of raytp.runtime.speculation (`oracle:RATE[:K]`, taken by `raytp bench` alone): it proposes
the target's own next tokens, each right with probability RATE, so that speculative decoding's end-to-end speed-up
can be measured at a chosen acceptance on random weights, where no real drafter agrees with the target.

It knows the target's tokens from an earlier identical run, never from a forward of its own (that would cost a
second decode): every rank keeps, for each (prompt, sampling) of an oracle row that finished, the tokens it
generated (`Scripts`, the script). raytp's tokens are a function of the prompt, the sampling and the seed (see
raytp.runtime.speculation), so a later row of the same prompt and sampling generates the same tokens. `raytp bench`
runs the same prompts in its warm-up (a run with nothing scripted yet drafts nothing: plain steps) and in every timed
run, which replays the warm-up's script.

The row's drafted token for its i-th generated token is the script's where a coin for i shows "right" (probability
RATE), else the script's token + 1 (mod the vocabulary), which the target certainly rejects. The coins of a row are
drawn in order from a generator seeded by its prompt and sampling: the same on every rank, so the ranks draft the
same tokens without a message; the same in every run of the prompt, so the timed runs repeat each other; and the
same for a position drafted again after a rejection before it. A verify step checks its drafted tokens until the
first wrong one, so each position's coin is checked once: a drafted token is accepted, given that every one before
it in its draft was, with probability RATE (bench reports that as `position_acceptance`). The step-aside rule
applies as to any drafter (a row whose drafts keep failing pauses), so the speed-up measured is raytp's at that
acceptance.

A draft costs a dictionary lookup and a list slice per step. Where a row's tokens leave the script (a verify step's
numerics differ from a plain step's in the last bit and break a near tie the other way), the rest of the script
belongs to another prefix: the row drafts nothing more, and its measured acceptance falls short of RATE where that
happens. The scripts live as long as the rank's engine, one per distinct prompt and sampling: a benchmark's handful.
"""

from __future__ import annotations

import hashlib
import random

from raytp.runtime.sampling import SamplingParams
from raytp.runtime.speculation import oracle_rate


def _script_key(prompt: list[int], params: SamplingParams) -> tuple:
    """What fixes a row's tokens: its prompt and how it draws (not how many, nor what it reports)."""
    return (tuple(prompt), params.temperature, params.top_k, params.top_p, params.repetition_penalty, params.seed)


class Scripts:
    """One rank's scripts: (prompt, sampling) -> the tokens a finished oracle row generated."""

    def __init__(self):
        self.tokens: dict[tuple, list[int]] = {}

    def drafter(self, prompt: list[int], params: SamplingParams, vocab_size: int) -> OracleDrafter:
        return OracleDrafter(self, _script_key(prompt, params), len(prompt), oracle_rate(params.speculate),
                             vocab_size)

    def record(self, key: tuple, generated: list[int]) -> None:
        """A row of `key` finished with `generated`; a shorter run (a warm-up of fewer tokens) keeps the longer
        script."""
        if len(generated) >= len(self.tokens.get(key, ())):
            self.tokens[key] = list(generated)


class OracleDrafter:
    """One row's oracle (the module docstring): `propose` as raytp.runtime.speculation.NgramDrafter's."""

    def __init__(self, scripts: Scripts, key: tuple, prompt_len: int, rate: float, vocab_size: int):
        self.scripts, self.key, self.prompt_len = scripts, key, prompt_len
        self.rate, self.vocab_size = rate, vocab_size
        seed = int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little")
        self.coins = random.Random(seed)
        self.right: list[bool] = []  # the coin of each generated position, drawn in order as drafts reach it
        self.checked = 0  # generated tokens found equal to the script's
        self.diverged = False

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """The script's next min(k, what is scripted) tokens after `tokens`, each replaced by a wrong one where its
        coin says so; none once the row has left its script."""
        script = self.scripts.tokens.get(self.key, [])
        generated = len(tokens) - self.prompt_len
        while not self.diverged and self.checked < min(generated, len(script)):
            self.diverged = tokens[self.prompt_len + self.checked] != script[self.checked]
            self.checked += 1
        if self.diverged or k <= 0:
            return []
        ahead = script[generated : generated + k]
        while len(self.right) < generated + len(ahead):
            self.right.append(self.coins.random() < self.rate)
        return [t if self.right[generated + j] else (t + 1) % self.vocab_size for j, t in enumerate(ahead)]

    def record(self, tokens: list[int]) -> None:
        """The row finished with `tokens` (its prompt first): they are the script of the next row like it."""
        self.scripts.record(self.key, tokens[self.prompt_len :])
