"""Constrained decoding: an answer that must match a JSON schema, token by token, with no logits gathered.

Every rank runs its own matcher per constrained sequence over the same tokens (the draws are identical on every
rank), so the masks need no communication: a rank keeps the bits of its own vocabulary slice, and the sampler
sets the scores of the disallowed tokens to -inf before its exchange (raytp.runtime.sampling). The mask of a
step depends on the token of the step before, so while a constrained row decodes, the token loop reads each step
before it enqueues the next (raytp.runtime.engine).

The matcher is llguidance's (the Rust library behind OpenAI's structured outputs; JSON schema, regex, Lark).
Its masks cost microseconds per token (benchmarks/grammar_mask_cost.py compares it with xgrammar, whose masks are
a little faster; docs/performance.md), far below a decode step's milliseconds, and llguidance builds its tokenizer
from `tokenizer.json` with no dependencies, where xgrammar needs transformers and triton, which raytp otherwise
does without.
"""

from __future__ import annotations

from pathlib import Path

import llguidance
import torch

from raytp.model.config import ModelConfig
from raytp.runtime.errors import RequestError
from raytp.weights.tokenizer import Tokenizer


def json_schema_grammar(schema: dict, param: str = "response_format") -> str:
    """llguidance's grammar for a JSON schema ({"type": "object"} for OpenAI's json_object). Compact JSON: with
    whitespace allowed anywhere, a small model may emit newlines and spaces until max_tokens. RequestError naming
    `param` for a schema llguidance cannot take in (a number beyond 64 bits, text that is no Unicode)."""
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    except ValueError as e:
        raise RequestError(f"{param}: the JSON schema cannot be used: {e}", param=param) from None


class Grammars:
    """Matchers over one tokenizer, and the masks of this rank's vocabulary slice [vocab_start, vocab_start + n)."""

    def __init__(self, tokenizer_dir: Path, vocab_size: int, eos_ids: list[int], vocab_start: int = 0,
                 n: int | None = None):
        self.tokenizer = llguidance.LLTokenizer((Path(tokenizer_dir) / "tokenizer.json").read_text(),
                                                n_vocab=vocab_size, eos_token=eos_ids)
        local = torch.arange(vocab_start, vocab_start + (vocab_size - vocab_start if n is None else n))
        self.word, self.bit = local // 32, (local % 32).to(torch.int32)

    @classmethod
    def for_model(cls, tokenizer_dir: Path, config: ModelConfig, vocab_start: int = 0,
                  n: int | None = None) -> Grammars:
        """Over the model's tokenizer and vocabulary size; generation may end on any of its end tokens."""
        eos = Tokenizer.from_dir(tokenizer_dir).eos_token_ids | set(config.eos_token_ids)
        return cls(tokenizer_dir, config.vocab_size, sorted(eos), vocab_start, n)

    def check(self, grammar: str) -> None:
        """RequestError naming response_format unless `grammar` compiles (an invalid or unsupported schema)."""
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if not error:  # a grammar may also fail at its first token (a schema that refers only to itself)
            first = self.matcher(grammar)
            first.compute_bitmask()
            error = first.get_error().strip().split("\n")[0] if first.is_error() else ""
        if error:
            raise RequestError(f"response_format: the JSON schema cannot be used: {error.strip()}",
                               param="response_format")

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        return llguidance.LLMatcher(self.tokenizer, grammar)

    def allowed(self, matcher: llguidance.LLMatcher) -> torch.Tensor:
        """(n,) bool: which tokens of this rank's slice the matcher allows next."""
        words = torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.int32)
        return ((words[self.word] >> self.bit) & 1).bool()


def grammar_failure(matcher: llguidance.LLMatcher, token: int) -> str | None:
    """Why `matcher` cannot take `token`, the token its mask allowed, or None. A grammar can fail while decoding
    (a schema that refers only to itself, a pattern whose automaton outgrows llguidance's limits): the mask then
    allows at most an end token, which must not pass for the answer's end."""
    if not matcher.is_error() and matcher.consume_token(token) and not matcher.is_error():
        return None
    why = matcher.get_error().strip().splitlines()
    return (f"the answer's grammar (response_format or the forced tool call's parameters) failed while decoding: "
            f"{why[0] if why else 'the token was refused'}; simplify the schema")
