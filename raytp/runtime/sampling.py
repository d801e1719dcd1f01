"""Token sampling over vocab-sharded logits: every rank draws the same token, full logits never move.

Each rank holds logits for its own vocab rows only. Randomness comes from the Gumbel-max trick with noise
that is a pure function of (seed, position, token id), so drawing a sample is an argmax:
  - greedy or plain temperature sampling: each rank sends its best (score, id); the best of those wins;
  - top-k / top-p: each rank sends its top C candidates and the log-sum-exp of its slice; the filter runs
    on the merged list. For top-p the merged list is exact above the lowest of the ranks' C-th values;
    if the nucleus reaches below that, C grows and the exchange repeats (rare: only for flat
    distributions).
Ties break to the lower token id. All ranks compute the final choice from the same gathered numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raytp.parallel.comm import Communicator
from raytp.runtime.errors import RequestError

M32 = 0xFFFFFFFF
FIRST_CANDIDATES = 64


# The documented range of every sampling field. The API's request models declare their fields with these, and
# SamplingParams checks them for every other caller (CLI, web chat, benchmarks): one set of rules.
TEMPERATURE_MAX = 2.0  # OpenAI's range is [0, 2]: hotter is noise, and 1e308 or inf is no number to divide by
REPETITION_PENALTY_MAX = 10.0  # 1 is off, Hugging Face's examples stay below 2; beyond 10 every seen token is gone
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # a signed 64-bit integer, as OpenAI's seed; the draws use its low 32 bits


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy; at most TEMPERATURE_MAX
    top_k: int = 0  # 0 (or -1, as vLLM spells it) disables; at most the vocabulary size (checked by check_request)
    top_p: float = 1.0  # in (0, 1]; 1 disables
    repetition_penalty: float = 1.0  # Hugging Face semantics (CTRL paper), in (0, REPETITION_PENALTY_MAX]; 1 disables
    seed: int = 0  # together with the position, fixes every random draw of a request
    max_tokens: int | None = None  # None: until the context is full

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
        ]
        for param, ok, message in checks:
            if not ok:
                raise RequestError(message, param=param)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def filtered(self) -> bool:
        return not self.greedy and (self.top_k > 0 or self.top_p < 1)


def _mix32(x):
    """A 32-bit integer hash (works on Python ints and int64 tensors alike: products stay below 2**59)."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & M32
    return (x >> 16) ^ x


def gumbel_noise(seed: int, position: int, ids: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise for token `ids` at `position`: the same numbers on any rank and device."""
    key = _mix32((seed & M32) ^ _mix32(position & M32))
    h = _mix32(_mix32(ids.to(torch.int64) ^ key) ^ 0x2545F491)
    u = ((h >> 8).to(torch.float64) + 0.5) / float(1 << 24)
    return -torch.log(-torch.log(u))


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, vocab_start: int, penalty: float):
    """In place on one row of local logits, for the token ids in `history` that fall in this shard."""
    local = history - vocab_start
    local = local[(local >= 0) & (local < logits.shape[-1])].unique()
    if local.numel():
        picked = logits[local]
        logits[local] = torch.where(picked < 0, picked * penalty, picked / penalty)


class ShardedSampler:
    def __init__(self, comm: Communicator, vocab_start: int):
        self.comm, self.vocab_start = comm, vocab_start

    def sample(self, logits: torch.Tensor, params: list[SamplingParams], positions: list[int],
               histories: list[torch.Tensor]) -> list[int]:
        """logits: (batch, vocab_local) float32; returns one token id per row, identical on all ranks."""
        B, n = logits.shape
        ids = torch.arange(self.vocab_start, self.vocab_start + n, device=logits.device)
        scores = logits.clone()
        for b, p in enumerate(params):
            if p.repetition_penalty != 1:
                apply_repetition_penalty(scores[b], histories[b].to(logits.device), self.vocab_start,
                                         p.repetition_penalty)
            if not p.greedy:
                scores[b] /= p.temperature
        # Best local (score + noise, id) for every row; filtered rows are decided from candidates below.
        best = torch.full((B, 2), float("-inf"), dtype=torch.float64)
        if n:
            noisy = scores.to(torch.float64)
            for b, p in enumerate(params):
                if not p.greedy and not p.filtered:
                    noisy[b] += gumbel_noise(p.seed, positions[b], ids)
            value, index = noisy.max(dim=-1)  # max returns the first (lowest id) of equal values
            best = torch.stack([value, (index + self.vocab_start).to(torch.float64)], dim=-1).cpu()
        gathered = self.comm.all_gather_equal(best)  # (ranks, batch, 2)
        tokens = []
        for b in range(B):
            v, i = gathered[:, b, 0], gathered[:, b, 1]
            winner = max(range(len(v)), key=lambda r: (v[r].item(), -i[r].item()))
            tokens.append(int(i[winner]))
        for b, p in enumerate(params):
            if p.filtered:
                tokens[b] = self._sample_filtered(scores[b], ids, p, positions[b])
        return tokens

    def _sample_filtered(self, scores: torch.Tensor, ids: torch.Tensor, p: SamplingParams, position: int) -> int:
        s64 = scores.to(torch.float64)
        lse = torch.logsumexp(s64, 0).item() if s64.numel() else float("-inf")
        want = p.top_k or FIRST_CANDIDATES
        while True:
            kept, exact = self._candidates(s64, ids, p, lse, want)
            if exact:
                break
            want *= 4  # the nucleus reaches below what was sent; all ranks see this and ask for more
        noisy = kept[:, 0] + gumbel_noise(p.seed, position, kept[:, 1].to(torch.int64))
        return int(kept[int(noisy.argmax()), 1])

    def _candidates(self, s64: torch.Tensor, ids: torch.Tensor, p: SamplingParams, lse: float, want: int):
        """Gather every rank's top `want`; return the kept (score, id) rows and whether they are exact."""
        n = s64.numel()
        c = min(want, n)
        mine = torch.full((want + 1, 2), float("-inf"), dtype=torch.float64)
        mine[0, 0], mine[0, 1] = n, lse  # header row: how many tokens this rank has, their log-sum-exp
        if c:
            value, index = s64.topk(c)
            mine[1 : c + 1, 0], mine[1 : c + 1, 1] = value.cpu(), ids[index].to(torch.float64).cpu()
        gathered = self.comm.all_gather_equal(mine)  # (ranks, want + 1, 2)
        cands = gathered[:, 1:].reshape(-1, 2)
        cands = cands[torch.isfinite(cands[:, 0])]
        cands = cands[sorted(range(len(cands)), key=lambda j: (-cands[j, 0].item(), cands[j, 1].item()))]
        if p.top_k:
            cands = cands[: p.top_k]
            total = torch.logsumexp(cands[:, 0], 0)  # top-p then acts on the renormalized top-k
        else:
            total = torch.logsumexp(gathered[:, 0, 1], 0)
        mass = torch.cumsum(torch.exp(cands[:, 0] - total), 0)
        keep = min(int((mass < p.top_p).sum()) + 1, len(cands))  # smallest prefix with mass >= top_p
        # Below the highest last-sent value of a rank that still holds unsent tokens, tokens may be missing.
        floor = max((gathered[r, want, 0].item() for r in range(len(gathered)) if gathered[r, 0, 0] > want),
                    default=float("-inf"))
        return cands[:keep], bool(p.top_k) or cands[keep - 1, 0].item() > floor
