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

Every rank drafts the same tokens (the n-gram drafter reads only the sequence, which every rank holds alike; the
draft model runs split over the same ranks, in lock-step) and draws the same targets (from the sampler's gathered
numbers), so the ranks decide acceptance in lock-step without a message of their own.

The KV cache: a verify step writes keys and values at all its positions; those past the first rejection lie
beyond the sequence's length, and nothing reads them: a query sees only positions up to its own
(`StepInputs.visible`, the decode kernel's `lengths`), and the step that reaches such a position writes it first.
A row with a shorter draft than the step's widest is padded with copies of its last real position (same token,
same position): those write the very keys and values of that position again. A recurrent state (linear attention)
cannot leave positions unread: a verify step writes nothing to it, and once the ranks have decided what each row
keeps, the state takes exactly those positions in (`ShardedLlama.keep_verified`). A sliding window's ring cannot
either, and such models decode plainly (`unsupported_reason`).

Drafter (a), prompt lookup (`ngram[:k]`): the longest suffix of NGRAM_MAX down to NGRAM_MIN tokens that occurred
earlier in the prompt or the text so far; the k tokens that followed its latest occurrence are the draft (where they
run into the end of the text, the text is repeating itself with that period, and the draft goes on repeating it).
It needs no weights and pays where the answer copies its input (edits, code, summaries, retrieval).

Drafter (b), a draft model (`draft[:k]`, the server started with `--speculate draft:PATH[:k]`): a smaller model of
the same vocabulary decodes k tokens ahead with the row's own sampling and noise (raytp.runtime.draft_model), so
where it agrees with the target it proposes the target's very draws. It pays on free text too.

Drafter (c), the model's own multi-token-prediction layer (`mtp[:k]`, Qwen3.5/3.6's `mtp.*`): from the target's
last hidden state and the token drawn there it guesses the next hidden state and so the token after, then feeds its
own guess back for the next (raytp.runtime.mtp_drafter), with the row's own sampling and noise as (b). It needs no
second model and runs split over the same ranks as the model's own layers.

A benchmark drafter (`oracle:RATE[:K]`, `raytp bench` alone, refused everywhere else): the target's own tokens from
an earlier identical run, each right with probability RATE (raytp.runtime.oracle), to measure the speed-up at a
chosen acceptance on random weights.

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
from typing import Protocol

from raytp.runtime.errors import RequestError

OFF = "off"
NGRAM = "ngram"
DRAFT = "draft"  # the server's draft model
MTP = "mtp"  # the model's own multi-token-prediction layer (raytp.runtime.mtp_drafter)
ORACLE = "oracle"  # the benchmark drafter (raytp.runtime.oracle)
SPECULATE_MAX_K = 8  # tokens drafted per step at most: a request may not widen every row's verify step further
DEFAULT_K = 4  # `ngram`, `draft` or `mtp` without a k
NGRAM_MAX, NGRAM_MIN = 3, 2  # suffix lengths the prompt lookup tries, longest first; one token matches too loosely
# The step-aside rule (module docstring). Chosen by reasoning, not yet by measurement: the next GPU sitting times a
# verify step against a plain one (benchmarks/sittings/speculation.yaml) and sets them from that.
SPECULATE_MAX_BATCH = 4  # decode rows above which every step is plain
START_GAIN = 1.0  # a new row's (and a row back from a pause's) accepted tokens per verify step, before it has any
GAIN_DECAY = 0.5  # the weight of the past in that average: two failed drafts in a row pause a new row
MIN_GAIN = 0.3  # below this a verify step costs more than its accepted tokens save, roughly, on CPUs
PAUSE_TOKENS = 8  # tokens a row then decodes without drafting
SPECULATE_RULE = (f'speculate must be "off", "ngram", "ngram:K", "draft", "draft:K", "mtp" or "mtp:K" with K in '
                  f'[1, {SPECULATE_MAX_K}] ("draft" where the server was started with a draft model, "mtp" where '
                  'the model has MTP layers)')
ORACLE_RULE = (f"oracle takes oracle:RATE or oracle:RATE:K, the chance RATE in [0, 1] that a drafted token is the "
               f"target's and K in [1, {SPECULATE_MAX_K}]")


def drafting(spec: str) -> tuple[str, int]:
    """(drafter, k) of a `speculate` value: "off" (OFF, 0), "ngram", "draft" or "mtp" (DEFAULT_K), "ngram:K",
    "draft:K" or "mtp:K" with K in [1, SPECULATE_MAX_K], "oracle:RATE[:K]" (`oracle_rate`); RequestError naming
    the value otherwise."""
    kind, colon, k = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if kind == OFF and not colon:
        return OFF, 0
    if kind == ORACLE:
        oracle_rate(spec)
        colon, k = k.partition(":")[1:]
    if kind in (NGRAM, DRAFT, MTP, ORACLE) and (not colon or k.isdigit() and 1 <= int(k) <= SPECULATE_MAX_K):
        return kind, int(k) if k else DEFAULT_K
    raise RequestError(f"{ORACLE_RULE if kind == ORACLE else SPECULATE_RULE}, got {spec!r}", param="speculate")


def oracle_rate(spec: str) -> float:
    """RATE of an "oracle:RATE[:K]" value; RequestError naming the value where it is no number in [0, 1]."""
    rate = spec.split(":")[1] if spec.count(":") in (1, 2) else ""
    try:
        if 0 <= float(rate) <= 1:  # NaN fails
            return float(rate)
    except ValueError:
        pass
    raise RequestError(f"{ORACLE_RULE}, got {spec!r}", param="speculate")


def refuse_benchmark_drafter(spec: str) -> None:
    """RequestError where `spec` asks for the oracle, which only `raytp bench` runs: it replays an earlier run's
    tokens, so outside a benchmark it would only make a request slower."""
    if isinstance(spec, str) and spec.partition(":")[0] == ORACLE:
        raise RequestError(f"speculate {spec!r}: oracle is a benchmark drafter (it replays the tokens of an earlier "
                           'identical run; raytp bench only); use "ngram[:K]", "draft[:K]", "mtp[:K]" or "off"',
                           param="speculate")


def drafted_tokens(spec: str) -> int:
    """k of a `speculate` value (`drafting`)."""
    return drafting(spec)[1]


def draft_model_option(value: str) -> tuple[str | None, str]:
    """`--speculate` as the command line takes it -> (the draft model's source or None, every request's default
    `speculate`): "draft:PATH" and "draft:PATH:K" name a model (a directory, or any --model source), the rest is a
    request's value. ValueError naming the value where "draft" comes without a model."""
    kind, _, rest = value.partition(":")
    if kind != DRAFT:
        return None, value
    path, _, k = rest.rpartition(":")
    if not (k.isdigit() and path):
        path, k = rest, ""
    if not path or path.isdigit():
        raise ValueError(f"--speculate {value}: name the draft model, draft:PATH or draft:PATH:K (PATH a model "
                         "directory of the same tokenizer)")
    return path, f"{DRAFT}:{k}" if k else DRAFT


def speculate_option(draft_model: str | None, speculate: str) -> str:
    """The `--speculate` that gives (draft model, requests' `speculate`): `draft_model_option` undone."""
    k = speculate.partition(":")[2]
    return speculate if draft_model is None else f"{DRAFT}:{draft_model}" + (f":{k}" if k else "")


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


class Drafter(Protocol):
    def propose(self, tokens: list[int], k: int) -> list[int]:
        """At most k tokens to verify after `tokens` (the prompt and what the row generated)."""


@dataclass(eq=False)
class RowSpeculation:
    """One decoding row's drafting: its drafter (NGRAM, its own lookup; ORACLE, its script, raytp.runtime.oracle;
    DRAFT, the rank's draft model, and MTP, the model's MTP layer, each drafting for all its rows of a step
    together), its k, and the step-aside state (see the module docstring)."""

    k: int
    kind: str = NGRAM
    drafter: Drafter = field(default_factory=NgramDrafter)
    gain: float = START_GAIN
    paused_until: int = 0  # while paused, drafts nothing until the row has generated this many tokens

    def active(self, generated: int) -> bool:
        return generated >= self.paused_until

    def wanted(self, generated: int, room: int) -> int:
        """How many tokens to draft now: min(k, room), none while paused."""
        if not self.active(generated):
            return 0
        if self.paused_until:  # back from a pause: a fresh chance
            self.gain, self.paused_until = START_GAIN, 0
        return min(self.k, room)

    def draft(self, tokens: list[int], generated: int, room: int) -> list[int]:
        """The row's own drafter's at most min(k, room) tokens to verify after `tokens`; none while paused."""
        return self.drafter.propose(tokens, self.wanted(generated, room))

    def record(self, accepted: int, generated: int) -> None:
        """A verify step of this row's draft took `accepted` of its tokens; `generated` counts them."""
        self.gain = GAIN_DECAY * self.gain + (1 - GAIN_DECAY) * accepted
        if self.gain < MIN_GAIN:
            self.paused_until = generated + PAUSE_TOKENS


def unsupported_reason(config) -> str | None:
    """Why a model's state cannot drop the positions after a rejected draft, in words for an error; None where it
    can. A KV cache can: later steps overwrite them, and no query reads past a sequence's length; a recurrent state
    (linear attention) takes a verify step's positions in only once the ranks know which are kept
    (`ShardedLlama.keep_verified`). A sliding window's cache, a ring of the window's positions, has overwritten
    positions the next query still sees."""
    if "sliding_attention" in set(config.mixers):
        return "the model has sliding-window layers, whose window cache cannot keep the positions a draft overwrites"
    return None


def draft_unsupported_reason(config) -> str | None:
    """Why a model cannot be a draft model, in words for an error (with "the model" for it); None where it can. The
    draft model's own cache drops a rejected draft by being overwritten where the sequence goes on
    (raytp.runtime.draft_model), which a recurrent state cannot."""
    if "linear_attention" in set(config.mixers):
        return "the model has linear-attention layers, whose recurrent state cannot drop a rejected draft's tokens"
    return unsupported_reason(config)


def rolls_back(config) -> bool:
    """Whether a model can drop the positions after a rejected draft (unsupported_reason)."""
    return unsupported_reason(config) is None


def row_speculation(spec: str, constrained: bool, config, has_draft_model: bool) -> RowSpeculation | None:
    """The drafting state of a row whose request asks `spec`; None where it drafts nothing (a request for the draft
    model on ranks without one, or for MTP of a model without MTP layers, is refused at the front end,
    `check_drafter`)."""
    kind, k = drafting(spec)
    if not k or constrained or not rolls_back(config) or kind == DRAFT and not has_draft_model or \
            kind == MTP and not config.mtp_layers:
        return None
    return RowSpeculation(k, kind)


def no_mtp_reason(spec: str, mtp_layers: int) -> str | None:
    """Why `spec` cannot draft with the model's MTP layers, in words for an error; None where it does not ask for
    them or the model has some."""
    if drafting(spec)[0] != MTP or mtp_layers:
        return None
    return ('the model has no MTP layers (no mtp.* tensors, which Qwen3.5/3.6 checkpoints ship); use "ngram[:K]" '
            'or "off"')


def check_drafter(spec: str, draft_model: str | None, mtp_layers: int = 0) -> None:
    """RequestError where `spec` asks for the draft model and the server has none, for MTP and the model has no
    MTP layers (`mtp_layers`, the config's), or for the benchmark drafter."""
    refuse_benchmark_drafter(spec)
    if drafting(spec)[0] == DRAFT and draft_model is None:
        raise RequestError(f"speculate {spec!r} asks for the draft model, and this server was started without one "
                           '(serve --speculate draft:PATH); use "ngram", "ngram:K" or "off"', param="speculate")
    if why := no_mtp_reason(spec, mtp_layers):
        raise RequestError(f"speculate {spec!r}: {why}", param="speculate")
