"""Speculative decoding: several tokens per step, the very tokens plain decoding emits.

A drafter proposes up to k tokens that may follow a sequence. One verify step runs the sequence's last token and
the drafted ones through the model together (k + 1 positions per row, `ShardedLlama.forward(every=True)`) and draws
the target's own token at every position, with the row's own sampling. raytp's draws use Gumbel noise that is a
pure function of (seed, position, token id) (raytp.runtime.sampling), so the target's token at a position is a
function of the prefix alone: a drafted token is accepted iff it equals the target's draw there. The first mismatch
ends the run, and the target's draw at that position is the step's last token. Greedy and seeded sampling thus give
the tokens plain decoding gives, at every split, and each accepted token passes the same checks in the same order
(a grammar, the end tokens, max_tokens, the context; stop strings at the driver), so a request stops exactly where
it would have.

Every rank drafts the same tokens (the n-gram drafter reads only the sequence, which every rank holds alike) and
draws the same targets (from the sampler's gathered numbers), so the ranks decide acceptance in lock-step without a
message of their own.

The KV cache: a verify step writes keys and values at all its positions; those past the first rejection lie
beyond the sequence's length, and nothing reads them: a query sees only positions up to its own
(`StepInputs.visible`, the decode kernel's `lengths`), and the step that reaches such a position writes it first.
A row with a shorter draft than the step's widest is padded with copies of its last real position (same token,
same position): those write the very keys and values of that position again.

Drafter (a), prompt lookup (`ngram[:k]`): the longest suffix of NGRAM_MAX down to NGRAM_MIN tokens that occurred
earlier in the prompt or the text so far; the k tokens that followed its latest occurrence are the draft (where they
run into the end of the text, the text is repeating itself with that period, and the draft goes on repeating it).
It needs no weights and pays where the answer copies its input (edits, code, summaries, retrieval).

Stepping aside, where drafting loses:
  - a decode batch of more than SPECULATE_MAX_BATCH rows takes plain steps: a wide batch is no longer bound by
    reading the weights, so k + 1 positions per row cost nearly k + 1 steps;
  - each row keeps `gain`, an exponential average (weight GAIN_DECAY on the past) of the drafted tokens it had
    accepted per verify step it drafted in; below MIN_GAIN it drafts nothing for its next PAUSE_TOKENS tokens, then
    starts again from START_GAIN. A step in which no row finds anything to draft is a plain step, at the cost of
    a plain one, except that the host reads its tokens before it queues the next (a draft needs them): while no row
    of the batch may draft, steps are pipelined again.
A grammar-constrained row never drafts (its mask at a drafted position would need its matcher advanced over the
draft); it still takes part in verify steps, with one position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from raytp.runtime.errors import RequestError

OFF = "off"
NGRAM = "ngram"
SPECULATE_MAX_K = 8  # tokens drafted per step at most: a request may not widen every row's verify step further
NGRAM_K = 4  # `ngram` without a k
NGRAM_MAX, NGRAM_MIN = 3, 2  # suffix lengths the prompt lookup tries, longest first; one token matches too loosely
# The step-aside rule (module docstring). Chosen by reasoning, not yet by measurement: the next GPU sitting times a
# verify step against a plain one (benchmarks/sittings/speculation.yaml) and sets them from that.
SPECULATE_MAX_BATCH = 4  # decode rows above which every step is plain
START_GAIN = 1.0  # a new row's (and a row back from a pause's) accepted tokens per verify step, before it has any
GAIN_DECAY = 0.5  # the weight of the past in that average: two failed drafts in a row pause a new row
MIN_GAIN = 0.3  # below this a verify step costs more than its accepted tokens save, roughly, on CPUs
PAUSE_TOKENS = 8  # tokens a row then decodes without drafting
SPECULATE_RULE = f'speculate must be "off", "ngram" or "ngram:K" with K in [1, {SPECULATE_MAX_K}]'


def drafted_tokens(spec: str) -> int:
    """k of a `speculate` value: "off" (0), "ngram" (NGRAM_K) or "ngram:K" with K in [1, SPECULATE_MAX_K];
    RequestError naming the value otherwise."""
    kind, _, k = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if kind == OFF and not k:
        return 0
    if kind == NGRAM and (not k or k.isdigit() and 1 <= int(k) <= SPECULATE_MAX_K):
        return int(k) if k else NGRAM_K
    raise RequestError(f"{SPECULATE_RULE}, got {spec!r}", param="speculate")


class NgramDrafter:
    """Prompt lookup over one sequence, indexed as it grows: for each n-gram the position of the token that
    followed its latest occurrence, so a draft costs a few dictionary lookups, not a search of the text."""

    def __init__(self):
        self.follower: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token after its latest occurrence
        self.indexed = 0  # tokens[:indexed] are in `follower`

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """k tokens that followed the latest earlier occurrence of the longest matching suffix of `tokens`, the
        period from there to the end repeated if they run out; none without a match."""
        for i in range(max(self.indexed, NGRAM_MIN), len(tokens)):  # n-grams ending at i - 1, followed by tokens[i]
            for n in range(NGRAM_MIN, min(NGRAM_MAX, i) + 1):
                self.follower[tuple(tokens[i - n : i])] = i
        self.indexed = len(tokens)
        if k <= 0:
            return []
        for n in range(min(NGRAM_MAX, len(tokens)), NGRAM_MIN - 1, -1):
            i = self.follower.get(tuple(tokens[-n:]))
            if i is not None:
                return [tokens[i + j % (len(tokens) - i)] for j in range(k)]
        return []


@dataclass(eq=False)
class RowSpeculation:
    """One decoding row's drafting: its drafter, its k, and the step-aside state (see the module docstring)."""

    k: int
    drafter: NgramDrafter = field(default_factory=NgramDrafter)
    gain: float = START_GAIN
    paused_until: int = 0  # while paused, drafts nothing until the row has generated this many tokens

    def active(self, generated: int) -> bool:
        return generated >= self.paused_until

    def draft(self, tokens: list[int], generated: int, room: int) -> list[int]:
        """At most min(k, room) tokens to verify after `tokens`; none while paused."""
        if not self.active(generated):
            return []
        if self.paused_until:  # back from a pause: a fresh chance
            self.gain, self.paused_until = START_GAIN, 0
        return self.drafter.propose(tokens, min(self.k, room))

    def record(self, accepted: int, generated: int) -> None:
        """A verify step of this row's draft took `accepted` of its tokens; `generated` counts them."""
        self.gain = GAIN_DECAY * self.gain + (1 - GAIN_DECAY) * accepted
        if self.gain < MIN_GAIN:
            self.paused_until = generated + PAUSE_TOKENS


def unsupported_reason(config) -> str | None:
    """Why a model's state cannot drop the positions after a rejected draft, in words for an error; None where it
    can. A KV cache can: later steps overwrite them, and no query reads past a sequence's length. The recurrent state
    of linear-attention layers has already taken every drafted token in, and a sliding window's cache, a ring of the
    window's positions, has overwritten positions the next query still sees."""
    kinds = set(config.mixers)
    if "linear_attention" in kinds:
        return "the model has linear-attention layers, whose recurrent state cannot drop a rejected draft's tokens"
    if "sliding_attention" in kinds:
        return "the model has sliding-window layers, whose window cache cannot keep the positions a draft overwrites"
    return None


def rolls_back(config) -> bool:
    """Whether a model can drop the positions after a rejected draft (unsupported_reason)."""
    return unsupported_reason(config) is None


def row_speculation(spec: str, constrained: bool, config) -> RowSpeculation | None:
    """The drafting state of a row whose request asks `spec`; None where it drafts nothing."""
    k = drafted_tokens(spec)
    return RowSpeculation(k) if k and not constrained and rolls_back(config) else None
