"""Token sampling over vocab-sharded logits: every rank draws the same token, full logits never move.

Each rank holds logits for its own vocab rows only. Randomness comes from the Gumbel-max trick with noise
that is a pure function of (seed, position, token id), so drawing a sample is an argmax:
  - greedy or plain temperature sampling: each rank sends its best (score, id); the best of those wins;
  - top-k / top-p: each rank sends its top C candidates and the log-sum-exp of its slice; the filter runs
    on the merged list. For top-p the merged list is exact above the lowest of the ranks' C-th values;
    if the nucleus reaches below that, C grows and the exchange repeats (rare: only for flat
    distributions).
Ties break to the lower token id. All ranks compute the final choice from the same gathered numbers.

Log-probabilities ride along in the same exchanges, when a row asks for them: each rank adds its log-sum-exp,
its top TOP_LOGPROBS_MAX (score, id) and the score of its own best token, so the drawn token's log-probability
and the top N of the whole vocabulary come out of numbers the ranks gather anyway. They are of the distribution
the token was drawn from: the logits after the repetition penalty, divided by the temperature, renormalized over
the top-k / top-p set (tokens outside it are left out); greedy rows report the unscaled distribution
(temperature 1), since an argmax is no distribution. `prompt_logprobs` scores given tokens (echo) on the
unscaled distribution in one gather.

`ShardedSampler.draw` is tensor code of fixed shapes that never reads a value back to the host: the decode
loop (raytp.runtime.engine) runs it inside the captured step, its parameters in `SamplingRows` on the device.
It sends FIRST_CANDIDATES per rank and marks a row whose nucleus reaches below them inexact; the loop then
draws that row again with `sample`, which grows the exchange until the draw is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import torch

from raytp.parallel.comm import Communicator
from raytp.runtime.errors import RequestError
from raytp.runtime.speculation import OFF, drafted_tokens

M32 = 0xFFFFFFFF
FIRST_CANDIDATES = 64
GREEDY, NOISY, FILTERED = 0, 1, 2  # a row's kind of draw; a batch needs the work of its highest kind


# The documented range of every sampling field. The API's request models declare their fields with these, and
# SamplingParams checks them for every other caller (CLI, web chat, benchmarks): one set of rules.
TEMPERATURE_MAX = 2.0  # OpenAI's range is [0, 2]: hotter is noise, and 1e308 or inf is no number to divide by
REPETITION_PENALTY_MAX = 10.0  # 1 is off, Hugging Face's examples stay below 2; beyond 10 every seen token is gone
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # a signed 64-bit integer, as OpenAI's seed; the draws use its low 32 bits
TOP_LOGPROBS_MAX = 20  # OpenAI's bound on top_logprobs: every rank sends this many candidates when a row asks
# Below this a temperature draws greedily (vLLM's _SAMPLING_EPS): logits divided by 1e-40 overflow float32 to inf and
# NaN, while at 1e-5 the softmax is already an argmax.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # below GREEDY_BELOW (0 too) greedy; at most TEMPERATURE_MAX
    top_k: int = 0  # 0 (or -1, as vLLM spells it) disables; at most the vocabulary size (checked by check_request)
    top_p: float = 1.0  # in (0, 1]; 1 disables
    repetition_penalty: float = 1.0  # Hugging Face semantics (CTRL paper), in (0, REPETITION_PENALTY_MAX]; 1 disables
    seed: int = 0  # together with the position, fixes every random draw of a request
    max_tokens: int | None = None  # None: until the context is full
    logprobs: int | None = None  # None: none; N in [0, TOP_LOGPROBS_MAX]: each token's log-probability and the top N
    prompt_logprobs: int | None = None  # as `logprobs`, for every prompt token after the first (echo)
    n: int = 1  # samples of the prompt, prefilled once; sample i draws as a request with `sample_seed(seed, i)`
    grammar: str | None = None  # llguidance's grammar the answer must match (raytp.runtime.constraints), or None
    # drafting (raytp.runtime.speculation): "off", "ngram" or "ngram:K"; the tokens are the same either way
    speculate: str = OFF

    def __post_init__(self):
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)  # one spelling of "off" from here on
        # written so that NaN fails every check: comparisons with NaN are false
        checks = [
            ("temperature", 0 <= self.temperature <= TEMPERATURE_MAX,
             f"temperature must be in [0, {TEMPERATURE_MAX}] (0 is greedy), got {self.temperature}"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0,
             f"top_k must be a whole number >= 0 (0 or -1 disable it), got {self.top_k}"),
            ("top_p", 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            ("repetition_penalty", 0 < self.repetition_penalty <= REPETITION_PENALTY_MAX,
             f"repetition_penalty must be in (0, {REPETITION_PENALTY_MAX}] (1 is off), got {self.repetition_penalty}"),
            ("seed", isinstance(self.seed, int) and SEED_MIN <= self.seed <= SEED_MAX,
             f"seed must be a whole number in [{SEED_MIN}, {SEED_MAX}], got {self.seed}"),
            ("max_tokens", self.max_tokens is None or isinstance(self.max_tokens, int) and self.max_tokens >= 1,
             f"max_tokens must be a whole number >= 1, got {self.max_tokens}"),
            ("n", isinstance(self.n, int) and self.n >= 1, f"n must be a whole number >= 1, got {self.n}"),
            *((name, value is None or isinstance(value, int) and 0 <= value <= TOP_LOGPROBS_MAX,
               f"{name} must be a whole number in [0, {TOP_LOGPROBS_MAX}], got {value}")
              for name, value in (("logprobs", self.logprobs), ("prompt_logprobs", self.prompt_logprobs))),
        ]
        for param, ok, message in checks:
            if not ok:
                raise RequestError(message, param=param)
        drafted_tokens(self.speculate)  # a RequestError naming the value

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_k == 1

    @property
    def filtered(self) -> bool:
        return not self.greedy and (self.top_k > 0 or self.top_p < 1)


    @property
    def kind(self) -> int:
        return GREEDY if self.greedy else FILTERED if self.filtered else NOISY


def sample_seed(seed: int, i: int) -> int:
    """The seed of sample i of a request seeded `seed` (n > 1): seed + i, wrapped into the signed 64-bit range, so
    that sample i draws what a single request with that seed draws."""
    return (seed + i - SEED_MIN) % 2**64 + SEED_MIN


def _mix32(x):
    """A 32-bit integer hash (works on Python ints and int64 tensors alike: products stay below 2**59)."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & M32
    return (x >> 16) ^ x


def gumbel_noise(seed, position, ids: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise for token `ids` at `position`: the same numbers on any rank and device. `seed` and
    `position` are ints or int64 tensors that broadcast against `ids` (one per row of a batch)."""
    key = _mix32((seed & M32) ^ _mix32(position & M32))
    h = _mix32(_mix32(ids.to(torch.int64) ^ key) ^ 0x2545F491)
    u = ((h >> 8).to(torch.float64) + 0.5) / float(1 << 24)
    return -torch.log(-torch.log(u))


def seen_mask(history: torch.Tensor, vocab_start: int, n: int) -> torch.Tensor:
    """(n,) bool: which of this shard's n token ids occur in `history` (global ids)."""
    local = history.to(torch.int64) - vocab_start
    seen = torch.zeros(n, dtype=torch.bool)
    seen[local[(local >= 0) & (local < n)]] = True
    return seen


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty) -> torch.Tensor:
    """Hugging Face's repetition penalty on the local logits of the tokens `seen` (a mask like `logits`):
    negative ones multiplied, positive ones divided by `penalty` (a float, or a tensor that broadcasts)."""
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


@dataclass
class SamplingRows:
    """The sampling parameters of a batch, one row per sequence, as tensors on the rank's device: what `draw`
    reads, so that a captured step reads them from static buffers rewritten only when the batch changes."""

    divisor: torch.Tensor  # (batch, 1) float32: the temperature, 1 for greedy rows
    noisy: torch.Tensor  # (batch, 1) bool: plain Gumbel-max rows (neither greedy nor filtered)
    filtered: torch.Tensor  # (batch,) bool: top-k / top-p rows
    top_k: torch.Tensor  # (batch,) int64, 0 when off
    top_p: torch.Tensor  # (batch,) float64
    penalty: torch.Tensor  # (batch, 1) float32, 1 when off
    seed: torch.Tensor  # (batch, 1) int64: the seed's low 32 bits
    position: torch.Tensor  # (batch, 1) int64: tokens generated so far, the noise's position
    seen: torch.Tensor  # (batch, vocab_local) bool: this shard's tokens in the history (prompt and generated)
    allowed: torch.Tensor  # (batch, vocab_local) bool: what a grammar allows next; all true for free rows

    @classmethod
    def build(cls, params: list[SamplingParams], positions: list[int], histories: list[torch.Tensor],
              vocab_start: int, n: int, device: torch.device,
              allowed: dict[int, torch.Tensor] | None = None) -> SamplingRows:
        """Rows for `params`; `histories` (token ids) count only where a row's repetition penalty is on;
        `allowed` holds the masks of constrained rows, by row."""
        seen = torch.zeros((len(params), n), dtype=torch.bool)
        for b, (p, history) in enumerate(zip(params, histories)):
            if p.repetition_penalty != 1:
                seen[b] = seen_mask(history, vocab_start, n)
        mask = torch.ones((len(params), n), dtype=torch.bool)
        for b, row in (allowed or {}).items():
            mask[b] = row
        rows = cls(divisor=torch.tensor([[1.0 if p.greedy else p.temperature] for p in params], dtype=torch.float32),
                   noisy=torch.tensor([[p.kind == NOISY] for p in params]),
                   filtered=torch.tensor([p.kind == FILTERED for p in params]),
                   top_k=torch.tensor([p.top_k for p in params], dtype=torch.int64),
                   top_p=torch.tensor([p.top_p for p in params], dtype=torch.float64),
                   penalty=torch.tensor([[p.repetition_penalty] for p in params], dtype=torch.float32),
                   seed=torch.tensor([[p.seed & M32] for p in params], dtype=torch.int64),
                   position=torch.tensor([[q] for q in positions], dtype=torch.int64), seen=seen, allowed=mask)
        return rows.to(device)

    def to(self, device: torch.device) -> SamplingRows:
        return SamplingRows(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def head(self, b: int) -> SamplingRows:
        """Views of the first `b` rows (writes through to these buffers)."""
        return SamplingRows(**{f.name: getattr(self, f.name)[:b] for f in fields(self)})

    def copy_(self, other: SamplingRows) -> None:
        """Overwrite the first rows with `other`'s."""
        for f in fields(self):
            getattr(self, f.name)[: len(other.top_k)].copy_(getattr(other, f.name), non_blocking=True)


class Logprobs(NamedTuple):
    """Log-probabilities of a batch's tokens, on the device, identical on every rank."""

    chosen: torch.Tensor  # (batch,) float64: the drawn (or given) token's
    top: torch.Tensor  # (batch, TOP_LOGPROBS_MAX) float64, highest first; -inf where there are fewer tokens
    top_ids: torch.Tensor  # (batch, TOP_LOGPROBS_MAX) int64

    def rows(self, b: int, n: int) -> list[tuple[float, list[tuple[int, float]]]]:
        """Row b's (token's log-probability, its top n as (id, log-probability)) on the host."""
        top = [(int(i), v) for i, v in zip(self.top_ids[b, :n].tolist(), self.top[b, :n].tolist())
               if v != float("-inf")]
        return float(self.chosen[b]), top


LOGPROB_COLUMNS = 2 + 2 * TOP_LOGPROBS_MAX  # a rank's part per row: chosen score, log-sum-exp, top scores, top ids


class Draw(NamedTuple):
    tokens: torch.Tensor  # (batch,) int64, identical on every rank
    exact: torch.Tensor  # (batch,) bool: false where a top-p nucleus reached below the candidates sent
    word: torch.Tensor | None  # rank 0's word, when one rode along (see `draw`)
    logprobs: Logprobs | None = None  # when asked for


def _by_score(cands: torch.Tensor) -> torch.Tensor:
    """(batch, K, 2) (score, id) rows sorted by score descending, ties to the lower id: a stable sort by id, then
    a stable sort by score. Unsent slots (-inf) sort last."""
    for key, descending in ((1, False), (0, True)):
        order = cands[..., key].argsort(dim=-1, descending=descending, stable=True)
        cands = cands.gather(1, order.unsqueeze(-1).expand(-1, -1, 2))
    return cands


class ShardedSampler:
    def __init__(self, comm: Communicator, vocab_start: int):
        self.comm, self.vocab_start = comm, vocab_start

    def _local_logprob_columns(self, s64: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """(batch, LOGPROB_COLUMNS) float64: this rank's `chosen` scores (-inf where it does not hold the token),
        the log-sum-exp of its slice and its top TOP_LOGPROBS_MAX (scores, then ids), -inf padded."""
        B, n = s64.shape
        cols = torch.full((B, LOGPROB_COLUMNS), float("-inf"), dtype=torch.float64, device=s64.device)
        cols[:, 0] = chosen
        if n:
            T, c = TOP_LOGPROBS_MAX, min(TOP_LOGPROBS_MAX, n)
            cols[:, 1] = torch.logsumexp(s64, dim=-1)
            value, index = s64.topk(c, dim=-1)
            cols[:, 2 : 2 + c], cols[:, 2 + T : 2 + T + c] = value, (index + self.vocab_start).to(torch.float64)
        return cols

    @staticmethod
    def _combine_logprobs(gathered: torch.Tensor, chosen: torch.Tensor) -> Logprobs:
        """Every rank's columns (ranks, batch, LOGPROB_COLUMNS) and the chosen tokens' scores (batch,) -> Logprobs
        of the whole vocabulary's distribution."""
        R, B, _ = gathered.shape
        T = TOP_LOGPROBS_MAX
        total = torch.logsumexp(gathered[:, :, 1], dim=0)
        cands = torch.stack([gathered[:, :, 2 : 2 + T], gathered[:, :, 2 + T :]], dim=-1)  # (ranks, batch, T, 2)
        top = _by_score(cands.transpose(0, 1).reshape(B, R * T, 2))[:, :T]
        ids = torch.where(torch.isfinite(top[..., 0]), top[..., 1], 0).to(torch.int64)
        return Logprobs(chosen - total, top[..., 0] - total.unsqueeze(-1), ids)

    def prompt_logprobs(self, logits: torch.Tensor, token_ids: torch.Tensor) -> Logprobs:
        """logits: (seq, vocab_local) float32, the model's at each position; token_ids: (seq,) the tokens that
        follow each position -> their log-probabilities and the top TOP_LOGPROBS_MAX under the unscaled
        distribution, in one gather."""
        n = logits.shape[1]
        s64 = logits.to(torch.float64)
        local = token_ids.to(s64.device) - self.vocab_start
        mine = (local >= 0) & (local < n)
        chosen = torch.full(local.shape, float("-inf"), dtype=torch.float64, device=s64.device)
        if n:
            picked = s64.gather(1, local.clamp(0, n - 1).unsqueeze(-1)).squeeze(-1)
            chosen = torch.where(mine, picked, chosen)
        gathered = self.comm.all_gather_equal(self._local_logprob_columns(s64, chosen))
        return self._combine_logprobs(gathered, gathered[:, :, 0].max(dim=0).values)

    def draw(self, logits: torch.Tensor, rows: SamplingRows, kind: int = FILTERED,
             word: torch.Tensor | None = None, logprobs: bool = False) -> Draw:
        """logits: (batch, vocab_local) float32 -> one token per row on the device, without a host sync.

        `kind` is the highest kind of draw among the rows (GREEDY, NOISY or FILTERED): the work the others need
        is skipped. `word`, a (1, 2) float64 tensor, rides along in the exchange; rank 0's comes back (the token
        loop's news, so that it needs no collective of its own). With `logprobs` every row's log-probabilities
        ride along too (fixed shapes: TOP_LOGPROBS_MAX per rank, whatever N the rows want)."""
        B, n = logits.shape
        scores = self._scores(logits, rows)
        best = torch.full((B, 2), float("-inf"), dtype=torch.float64, device=logits.device)
        s64 = scores.to(torch.float64)
        if n:
            ids = torch.arange(self.vocab_start, self.vocab_start + n, device=logits.device)
            noisy = s64
            if kind >= NOISY:
                noisy = torch.where(rows.noisy, noisy + gumbel_noise(rows.seed, rows.position, ids), noisy)
            value, index = noisy.max(dim=-1)  # max returns the first (lowest id) of equal values
            best = torch.stack([value, (index + self.vocab_start).to(torch.float64)], dim=-1)
        if logprobs:  # the score of this rank's best token: the winner's is the drawn token's
            chosen = s64.gather(1, index.unsqueeze(-1)).squeeze(-1) if n else best[:, 0]
            best = torch.cat([best, self._local_logprob_columns(s64, chosen)], dim=-1)
        if word is not None:
            word = torch.cat([word, word.new_zeros((1, best.shape[1] - 2))], dim=-1)
        gathered = self.comm.all_gather_equal(best if word is None else torch.cat([best, word]))
        v, i = gathered[:, :B, 0], gathered[:, :B, 1]  # (ranks, batch)
        tokens = torch.where(v == v.max(dim=0).values, i, float("inf")).min(dim=0).values.to(torch.int64)
        lp = None
        if logprobs:
            winner = (v == v.max(dim=0).values) & (i == tokens.to(torch.float64))
            columns = gathered[:, :B, 2:]
            lp = self._combine_logprobs(columns, torch.where(winner, columns[:, :, 0], float("-inf")).max(0).values)
        exact = torch.ones(B, dtype=torch.bool, device=logits.device)
        if kind == FILTERED:
            chosen, sure, kept = self._filtered(scores, rows, FIRST_CANDIDATES)
            tokens, exact = torch.where(rows.filtered, chosen, tokens), torch.where(rows.filtered, sure, exact)
            if logprobs:
                lp = _where_rows(rows.filtered, kept, lp)
        return Draw(tokens, exact, None if word is None else gathered[0, B, 0], lp)

    @staticmethod
    def _scores(logits: torch.Tensor, rows: SamplingRows) -> torch.Tensor:
        """What a row draws from: the penalized logits over the temperature, -inf where a grammar forbids."""
        scores = apply_repetition_penalty(logits, rows.seen, rows.penalty) / rows.divisor
        return torch.where(rows.allowed, scores, float("-inf"))

    def sample(self, logits: torch.Tensor, params: list[SamplingParams], positions: list[int],
               histories: list[torch.Tensor]) -> list[int]:
        """`draw_exact`'s tokens as a list."""
        return self.draw_exact(logits, params, positions, histories).tokens.tolist()

    def draw_exact(self, logits: torch.Tensor, params: list[SamplingParams], positions: list[int],
                   histories: list[torch.Tensor], logprobs: bool = False,
                   allowed: dict[int, torch.Tensor] | None = None, word: torch.Tensor | None = None) -> Draw:
        """`draw`, exact for every row: for prefill, verify steps and rows `draw` left inexact (host syncs).

        logits: (batch, vocab_local) float32; `positions` are the tokens each row has generated, `histories`
        its prompt and generated ids (read where a repetition penalty is on), `allowed` the grammar masks of
        constrained rows; `word` rides along as in `draw`. Identical on all ranks."""
        B, n = logits.shape
        rows = SamplingRows.build(params, positions, histories, self.vocab_start, n, logits.device, allowed)
        tokens, exact, word, lp = self.draw(logits, rows, max(p.kind for p in params), word, logprobs)
        want = FIRST_CANDIDATES
        while not bool(exact.all()):  # every rank sees the same flags: they come from gathered numbers
            want = max(4 * want, int(rows.top_k[~exact].max()))
            scores = self._scores(logits, rows)
            chosen, sure, kept = self._filtered(scores, rows, want)
            tokens = torch.where(exact, tokens, chosen)
            if logprobs:
                lp = _where_rows(exact, lp, kept)
            exact = exact | sure
        return Draw(tokens, exact, word, lp)

    def _filtered(self, scores: torch.Tensor, rows: SamplingRows,
                  want: int) -> tuple[torch.Tensor, torch.Tensor, Logprobs]:
        """Top-k / top-p draws from every rank's top `want` candidates: (tokens, exact), each (batch,), and the
        log-probabilities of the top-k / top-p set renormalized (its tokens come first among the candidates)."""
        B, n = scores.shape
        dev = scores.device
        s64 = scores.to(torch.float64)
        mine = torch.full((B, want + 1, 2), float("-inf"), dtype=torch.float64, device=dev)
        mine[:, 0, 0] = n  # header row: how many tokens this rank has, their log-sum-exp
        c = min(want, n)
        if c:
            mine[:, 0, 1] = torch.logsumexp(s64, dim=-1)
            value, index = s64.topk(c, dim=-1)
            mine[:, 1 : c + 1, 0], mine[:, 1 : c + 1, 1] = value, (index + self.vocab_start).to(torch.float64)
        gathered = self.comm.all_gather_equal(mine)  # (ranks, batch, want + 1, 2)
        R = gathered.shape[0]
        cands = _by_score(gathered[:, :, 1:].transpose(0, 1).reshape(B, R * want, 2))
        score, finite = cands[..., 0], torch.isfinite(cands[..., 0])
        rank = torch.arange(R * want, device=dev)
        top_k = rows.top_k.unsqueeze(-1)
        in_k = finite & ((top_k == 0) | (rank < top_k))
        score_k = torch.where(in_k, score, float("-inf"))
        # top-p acts on the renormalized top-k; without top-k on the whole vocabulary
        total = torch.where(rows.top_k > 0, torch.logsumexp(score_k, dim=-1), torch.logsumexp(gathered[:, :, 0, 1], 0))
        mass = torch.cumsum(torch.exp(score_k - total.unsqueeze(-1)), dim=-1)
        # smallest prefix with mass >= top_p
        keep = torch.minimum((mass < rows.top_p.unsqueeze(-1)).sum(dim=-1) + 1, in_k.sum(dim=-1)).clamp(min=1)
        # Below the highest last-sent value of a rank that still holds unsent tokens, tokens may be missing.
        floor = torch.where(gathered[:, :, 0, 0] > want, gathered[:, :, want, 0], float("-inf")).max(dim=0).values
        # Exact when what decides the draw lies above the floor: the k-th candidate with top-k (the renormalization
        # needs all k), else the nucleus's last one; and when every rank sent all it has.
        k = torch.where(rows.top_k > 0, rows.top_k.clamp(max=R * want), keep)
        deciding = score.gather(1, (k - 1).unsqueeze(-1)).squeeze(-1)
        exact = (deciding > floor) | (floor == float("-inf")) | ((rows.top_k > 0) & (rows.top_k <= want))
        ids = torch.where(finite, cands[..., 1], 0).to(torch.int64)
        kept = rank < keep.unsqueeze(-1)
        noisy = torch.where(kept, score + gumbel_noise(rows.seed, rows.position, ids), float("-inf"))
        pick = noisy.argmax(dim=-1, keepdim=True)
        kept_score = torch.where(kept, score, float("-inf"))
        kept_total = torch.logsumexp(kept_score, dim=-1, keepdim=True)
        T = TOP_LOGPROBS_MAX  # R * want >= FIRST_CANDIDATES > T: the top T of the set are among the candidates
        lp = Logprobs((score.gather(1, pick) - kept_total).squeeze(-1), kept_score[:, :T] - kept_total, ids[:, :T])
        return ids.gather(1, pick).squeeze(-1), exact, lp


def _where_rows(mask: torch.Tensor, a: Logprobs, b: Logprobs) -> Logprobs:
    """Row by row, `a` where `mask` (batch,) is set, else `b`."""
    return Logprobs(torch.where(mask, a.chosen, b.chosen), torch.where(mask.unsqueeze(-1), a.top, b.top),
                    torch.where(mask.unsqueeze(-1), a.top_ids, b.top_ids))
