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
import multiprocessing
import multiprocessing.connection
from pathlib import Path

import jinja2

from raytp.weights.tokenizer import Tokenizer

WORKERS = 2  # processes: one long tokenization (up to the bound) leaves another for the next request
CLOSE_WAIT_S = 2.0  # a child busy with a long text is terminated after this long


def _encode(tokenizer: Tokenizer, prompt: str | None, messages: list[dict] | None, max_context: int,
            tools: list[dict] | None = None, variables: dict | None = None) -> list[int] | int:
    """The ids, or only their number where they do not fit the context (millions of ids would cost the driver's
    loop time to receive)."""
    ids = tokenizer.encode(prompt) if messages is None else \
        tokenizer.encode_chat(messages, tools=tools, variables=variables)
    return ids if len(ids) < max_context else len(ids)


def _serve(model_dir: str, conn: multiprocessing.connection.Connection) -> None:
    """A child's loop: answer each job with ("ok", ids or their number) or ("refused", why) (the template's own
    raise_exception: roles that must alternate...), until the driver closes its end or dies (EOFError)."""
    tokenizer = Tokenizer.from_dir(model_dir)
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        try:
            conn.send(("ok", _encode(tokenizer, *job)))
        except jinja2.TemplateError as e:  # a TemplateError may not pickle: its message travels
            conn.send(("refused", f"the model's chat template refused the messages: {e}"))
        except Exception as e:  # noqa: BLE001 - whatever else failed is the request's, with its message
            conn.send(("refused", f"the text cannot be tokenized: {type(e).__name__}: {e}"))


class _Child:
    """One spawned tokenizer process and the driver's end of its pipe (a socket pair: no semaphore, so nothing is
    left in /dev/shm whichever way the driver ends; the child sees EOF when the driver's end closes)."""

    def __init__(self, model_dir: str):
        self.conn, theirs = multiprocessing.Pipe()
        self.process = multiprocessing.get_context("spawn").Process(target=_serve, args=(model_dir, theirs),
                                                                    daemon=True, name="raytp-tokenizer")
        self.process.start()
        theirs.close()

    def call(self, job: tuple) -> tuple[str, object]:
        """The child's answer to `job` (blocking: run in a thread); EOFError or OSError if the child died."""
        self.conn.send(job)
        return self.conn.recv()

    def close(self) -> None:
        self.conn.close()
        self.process.join(CLOSE_WAIT_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


class TextTooLong(ValueError):
    """A text the context cannot hold: refused unread past the character bound, or by its number of tokens."""


class TokenizerPool:
    def __init__(self, tokenizer: Tokenizer, model_dir: Path, max_context: int, workers: int = WORKERS):
        self.max_chars = max_context * tokenizer.max_token_chars
        self.max_context = max_context
        self._model_dir = str(model_dir)
        self._children = [_Child(self._model_dir) for _ in range(workers)]
        self._idle: asyncio.Queue[_Child] = asyncio.Queue()
        for child in self._children:
            self._idle.put_nowait(child)
        self._closed = False

    def check_length(self, chars: int) -> None:
        if chars > self.max_chars:
            raise TextTooLong(f"the text has {chars} characters; no text of more than {self.max_chars} fits the "
                              f"context of {self.max_context} tokens (--max-context; no token is longer than "
                              f"{self.max_chars // self.max_context} characters): shorten it")

    async def encode(self, prompt: str | None = None, messages: list[dict] | None = None,
                     tools: list[dict] | None = None, variables: dict | None = None) -> list[int]:
        """The ids of `prompt`, or of `messages` (and the `tools` offered, the template's `variables`) through the
        chat template (Tokenizer.encode_chat), computed in a child process; TextTooLong past the character bound or
        the context, ValueError from the template."""
        texts = [prompt] if messages is None else [m.get(k) or "" for m in messages for k in ("content", "thinking")]
        self.check_length(sum(len(t) for t in texts if isinstance(t, str)))
        job = (prompt, messages, self.max_context, tools, variables)
        try:
            status, ids = await self._run(job)
        except (EOFError, OSError):  # the child died (killed, out of memory): once more, on a fresh one
            status, ids = await self._run(job)
        if status == "refused":
            raise ValueError(ids)
        if isinstance(ids, int):
            raise TextTooLong(f"the prompt has {ids} tokens but the context holds {self.max_context} (--max-context); "
                              "shorten the prompt or raise --max-context")
        return ids

    async def _run(self, job: tuple) -> tuple[str, object]:
        """`job` on an idle child. The child goes back to the idle ones only once it has answered, even when the
        caller is cancelled first: its answer must not reach the next job's caller."""
        child = await self._idle.get()
        if not child.process.is_alive():  # it died while idle
            child = self._replace(child)
        answer = asyncio.get_running_loop().run_in_executor(None, child.call, job)
        answer.add_done_callback(lambda done: self._release(child, done))
        return await asyncio.shield(answer)

    def _release(self, child: _Child, done: asyncio.Future) -> None:
        if self._closed:
            return
        if not done.cancelled() and done.exception() is not None:  # it died mid-job
            child = self._replace(child)
        self._idle.put_nowait(child)

    def _replace(self, child: _Child) -> _Child:
        child.close()
        fresh = _Child(self._model_dir)
        self._children[self._children.index(child)] = fresh
        return fresh

    def close(self) -> None:
        """End the children (idempotent)."""
        self._closed = True
        for child in self._children:
            child.close()
        self._children = []
