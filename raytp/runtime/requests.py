"""The checks every request passes at the front end before it may reach a rank, and its stop strings.

Whatever a request came through (the OpenAI API, the web chat, the CLI over Ray), the driver runs
`check_request` on its token ids and `SamplingParams` before the leader sees it: the bounds that need the model
(vocabulary size, context) are checked here, the ones that do not by `SamplingParams` itself. A request that
fails them is refused with a `RequestError` naming the field, the value and the limit; the ranks never see it.
"""

from __future__ import annotations

from collections.abc import Sequence

from raytp.runtime.errors import RequestError
from raytp.runtime.sampling import SamplingParams

STOP_MAX_COUNT = 4  # stop strings per request, as OpenAI allows: each is searched for in every piece of text
STOP_MAX_CHARS = 256  # per stop string: text is held back while it might be the start of one


def check_request(prompt_ids: Sequence[int], params: SamplingParams, stop: Sequence[str], vocab_size: int,
                  max_context: int, max_batch: int | None = None) -> None:
    """Raise RequestError unless the prompt, sampling and stop strings fit this model and its context (and n
    samples the `max_batch` cache slots)."""
    if not prompt_ids:
        raise RequestError("the prompt is empty", param="prompt")
    bad = next((i for i, t in enumerate(prompt_ids) if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise RequestError(f"prompt token ids must lie in [0, {vocab_size}) (the vocabulary); position {bad} has "
                           f"{prompt_ids[bad]}", param="prompt")
    if len(prompt_ids) >= max_context:
        raise RequestError(f"the prompt has {len(prompt_ids)} tokens but the context holds {max_context} "
                           f"(--max-context); shorten the prompt or raise --max-context", param="prompt",
                           code="context_length_exceeded")
    room = max_context - len(prompt_ids)
    if params.max_tokens is not None and params.max_tokens > room:
        raise RequestError(f"this model's context holds {max_context} tokens (--max-context); the prompt has "
                           f"{len(prompt_ids)} and max_tokens asks for {params.max_tokens} more: lower max_tokens "
                           f"to at most {room}", param="max_tokens", code="context_length_exceeded")
    check_sampling(params, vocab_size)
    if max_batch is not None and params.n > max_batch:
        raise RequestError(f"n asks for {params.n} samples, but they decode side by side and the server holds "
                           f"{max_batch} sequences at once (--max-batch); lower n to at most {max_batch}", param="n")
    if len(stop) > STOP_MAX_COUNT:
        raise RequestError(f"stop takes at most {STOP_MAX_COUNT} strings, got {len(stop)}", param="stop")
    long = next((s for s in stop if len(s) > STOP_MAX_CHARS), None)
    if long is not None:
        raise RequestError(f"each stop string may have at most {STOP_MAX_CHARS} characters, one has {len(long)}",
                           param="stop")


def check_text(text: str, param: str) -> None:
    """Refuse text that is not Unicode a tokenizer can read: JSON's "\\ud800" escapes a lone surrogate, which no
    UTF-8 can carry."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"{param} is not valid Unicode: {text[e.start]!r} at character {e.start} is a lone "
                           "surrogate (half of a UTF-16 pair); send UTF-8 text", param=param) from None


def check_sampling(params: SamplingParams, vocab_size: int) -> None:
    """The sampling bounds that need the model (the CLI checks its flags with this before Ray starts)."""
    if params.top_k > vocab_size:
        raise RequestError(f"top_k must be at most the vocabulary size {vocab_size} (0 or -1 disable it), got "
                           f"{params.top_k}", param="top_k")


class StopScanner:
    """Cuts streamed text at the first stop string. Text that might be the start of a stop string is held back
    until the next piece shows whether it is."""

    def __init__(self, stops: Sequence[str]):
        self.stops, self.held = [s for s in stops if s], ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was hit)."""
        if not self.stops:
            return text, False
        text, self.held = self.held + text, ""
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            return text[:min(hits)], True
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        if keep:
            text, self.held = text[:-keep], text[-keep:]
        return text, False

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text
