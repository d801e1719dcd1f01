"""Tokenization off the driver's event loop: a few processes, each with its own Tokenizer, bounded before they work.

The driver's event loop streams every request's tokens, so nothing slow may run in it: `tokenizers` holds the GIL
while it encodes (4 MB of digits take 6 s here) and chat templates render in Python, so a thread of the same
process would stall the loop just as well. Prompts are therefore encoded in child processes (spawned: the driver's
process runs Ray's threads, which a fork would copy mid-flight).

Before any of that, a text is measured in characters: no token of the vocabulary decodes to more than
`max_token_chars` characters, so a text longer than max_context x that cannot fit the context and is refused
unread, in microseconds, whatever it holds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
from pathlib import Path

import jinja2

from raytp.weights.tokenizer import Tokenizer

WORKERS = 2  # processes: one long tokenization (up to the bound) leaves another for the next request

# The tokenizer of this child process, loaded once by `_load` (a process pool's initializer can only leave its state
# in the child's globals).
_child_tokenizer: Tokenizer | None = None


def _load(model_dir: str) -> None:
    global _child_tokenizer
    _child_tokenizer = Tokenizer.from_dir(model_dir)


def _encode(prompt: str | None, messages: list[dict] | None, max_context: int,
            tools: list[dict] | None = None) -> list[int] | int:
    """In the child: the ids, or only their number where they do not fit the context (millions of ids would cost
    the driver's loop time to receive); ValueError with the template's message (a TemplateError may not pickle)."""
    try:
        ids = _child_tokenizer.encode(prompt) if messages is None else _child_tokenizer.encode_chat(messages, tools=tools)
    except jinja2.TemplateError as e:  # the template's own raise_exception: roles that must alternate...
        raise ValueError(f"the model's chat template refused the messages: {e}") from None
    return ids if len(ids) < max_context else len(ids)


class TextTooLong(ValueError):
    """A text the context cannot hold: refused unread past the character bound, or by its number of tokens."""


class TokenizerPool:
    def __init__(self, tokenizer: Tokenizer, model_dir: Path, max_context: int, workers: int = WORKERS):
        self.max_chars = max_context * tokenizer.max_token_chars
        self.max_context = max_context
        self._model_dir, self._workers = str(model_dir), workers
        self._pool = self._start()

    def _start(self) -> concurrent.futures.ProcessPoolExecutor:
        return concurrent.futures.ProcessPoolExecutor(self._workers, multiprocessing.get_context("spawn"),
                                                      initializer=_load, initargs=(self._model_dir,))

    def check_length(self, chars: int) -> None:
        if chars > self.max_chars:
            raise TextTooLong(f"the text has {chars} characters; no text of more than {self.max_chars} fits the "
                              f"context of {self.max_context} tokens (--max-context; no token is longer than "
                              f"{self.max_chars // self.max_context} characters): shorten it")

    async def encode(self, prompt: str | None = None, messages: list[dict] | None = None,
                     tools: list[dict] | None = None) -> list[int]:
        """The ids of `prompt`, or of `messages` (and the `tools` offered) through the chat template
        (Tokenizer.encode_chat), computed in a
        child process; TextTooLong past the character bound or the context, ValueError from the template."""
        texts = [prompt] if messages is None else [m.get("content") or "" for m in messages]
        self.check_length(sum(len(t) for t in texts if isinstance(t, str)))
        try:
            ids = await asyncio.wrap_future(self._pool.submit(_encode, prompt, messages, self.max_context, tools))
        except concurrent.futures.BrokenExecutor:  # a child died (killed, out of memory): start afresh once
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._start()
            ids = await asyncio.wrap_future(self._pool.submit(_encode, prompt, messages, self.max_context, tools))
        if isinstance(ids, int):
            raise TextTooLong(f"the prompt has {ids} tokens but the context holds {self.max_context} (--max-context); "
                              "shorten the prompt or raise --max-context")
        return ids

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
