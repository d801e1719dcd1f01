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

Compiling a grammar is another matter: it grows with the schema (a JSON schema of 2000 optional properties takes
seconds, 16000 take minutes), so it never happens in the token loop. A request's grammar is compiled once, before
the request is admitted: first by the driver, bounded by GRAMMAR_MAX_CHARS and GRAMMAR_COMPILE_S (past either the
request is refused), then by every rank on a thread beside its loop (`Grammars.prepare`). Admitting the request,
the loop only copies the compiled matcher for each of its samples (`Grammars.matchers`), which takes microseconds.
"""

from __future__ import annotations

import threading
from pathlib import Path

import llguidance
import torch

from raytp.model.config import ModelConfig
from raytp.runtime.errors import RequestError
from raytp.weights.tokenizer import Tokenizer

GRAMMAR_MAX_CHARS = 256 * 1024  # a grammar's text (from its JSON schema): bounds the work of one compile
GRAMMAR_COMPILE_S = 5.0  # the driver's compile of a request's grammar; past it the request is refused


def json_schema_grammar(schema: dict, param: str = "response_format") -> str:
    """llguidance's grammar for a JSON schema ({"type": "object"} for OpenAI's json_object). Compact JSON: with
    whitespace allowed anywhere, a small model may emit newlines and spaces until max_tokens. RequestError naming
    `param` for a schema llguidance cannot take in (a number beyond 64 bits, text that is no Unicode)."""
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    except ValueError as e:
        raise RequestError(f"{param}: the JSON schema cannot be used: {e}", param=param) from None


class Grammars:
    """Matchers over one tokenizer, and the masks of this rank's vocabulary slice [vocab_start, vocab_start + n).

    `prepare` (any thread) compiles the grammars of requests not yet admitted and keeps them by request id until
    `matchers` (the token loop, at admission) takes them or `release` drops them; requests with the same grammar
    share one compiled matcher."""

    def __init__(self, tokenizer_dir: Path, vocab_size: int, eos_ids: list[int], vocab_start: int = 0,
                 n: int | None = None):
        self.tokenizer = llguidance.LLTokenizer((Path(tokenizer_dir) / "tokenizer.json").read_text(),
                                                n_vocab=vocab_size, eos_token=eos_ids)
        local = torch.arange(vocab_start, vocab_start + (vocab_size - vocab_start if n is None else n))
        self.word, self.bit = local // 32, (local % 32).to(torch.int32)
        self._lock = threading.Lock()  # `prepare` runs beside the token loop
        self._compiled: dict[str, tuple[llguidance.LLMatcher, int]] = {}  # grammar -> (fresh matcher, requests)
        self._prepared: dict[str, str] = {}  # request id -> its grammar, compiled and not yet admitted

    @classmethod
    def for_model(cls, tokenizer_dir: Path, config: ModelConfig, vocab_start: int = 0,
                  n: int | None = None) -> Grammars:
        """Over the model's tokenizer and vocabulary size; generation may end on any of its end tokens."""
        eos = Tokenizer.from_dir(tokenizer_dir).eos_token_ids | set(config.eos_token_ids)
        return cls(tokenizer_dir, config.vocab_size, sorted(eos), vocab_start, n)

    def compile(self, grammar: str) -> llguidance.LLMatcher:
        """A matcher at the grammar's start; RequestError naming response_format for a grammar past
        GRAMMAR_MAX_CHARS or one llguidance cannot compile (an invalid or unsupported schema). Slow for large
        grammars (llguidance releases the GIL meanwhile): never call it on the token loop."""
        if len(grammar) > GRAMMAR_MAX_CHARS:
            raise RequestError(f"response_format: the JSON schema makes a grammar of {len(grammar)} characters, more "
                               f"than the {GRAMMAR_MAX_CHARS} raytp compiles; use a smaller schema",
                               param="response_format")
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if not matcher.is_error():  # a grammar may also fail at its first token (a schema that refers only to itself)
            matcher.compute_bitmask()  # builds the lexer's first states, which the copies then share: not on the loop
        if matcher.is_error():
            error = matcher.get_error().strip().splitlines()[0]
            raise RequestError(f"response_format: the JSON schema cannot be used: {error}", param="response_format")
        return matcher

    def prepare(self, request_id: str, grammar: str) -> None:
        """Compile `grammar` for the request `request_id` unless a prepared request shares it (RequestError as
        `compile`)."""
        with self._lock:
            shared = self._compiled.get(grammar)
            if shared is not None:
                self._compiled[grammar] = (shared[0], shared[1] + 1)
                self._prepared[request_id] = grammar
                return
        matcher = self.compile(grammar)
        with self._lock:
            shared = self._compiled.get(grammar)
            self._compiled[grammar] = (matcher, 1) if shared is None else (shared[0], shared[1] + 1)
            self._prepared[request_id] = grammar

    def matchers(self, request_id: str, n: int) -> list[llguidance.LLMatcher]:
        """n matchers at the start of the prepared request's grammar (copies of the compiled one); the request is
        no longer prepared."""
        with self._lock:
            compiled = self._compiled[self._prepared[request_id]][0]
            self._forget(request_id)
        return [compiled.deep_copy() for _ in range(n)]

    def release(self, request_id: str) -> None:
        """Forget a prepared request (cancelled or refused before admission); nothing if it is not prepared."""
        with self._lock:
            self._forget(request_id)

    def _forget(self, request_id: str) -> None:
        grammar = self._prepared.pop(request_id, None)
        if grammar is None:
            return
        matcher, requests = self._compiled[grammar]
        if requests == 1:
            del self._compiled[grammar]
        else:
            self._compiled[grammar] = (matcher, requests - 1)

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
