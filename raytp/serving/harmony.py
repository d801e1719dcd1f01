"""harmony, gpt-oss's chat format: an answer as channels, read into OpenAI's reasoning_content, content and tool_calls.

The chat template ends the prompt with `<|start|>assistant`; the model then writes one or more messages, each a
header, `<|message|>`, a body, and an end:

    <|channel|>analysis<|message|>thinking...<|end|>
    <|start|>assistant<|channel|>final<|message|>the answer<|return|>
    <|start|>assistant<|channel|>commentary to=functions.weather <|constrain|>json<|message|>{"city":"Paris"}<|call|>

A header holds the author's role (written by the prompt for the first message), the channel after <|channel|>, a
recipient `to=...` (before or after the channel) and a content type (`json` or `<|constrain|>json`). Bodies go:
    analysis                         -> reasoning_content (the chain of thought)
    final, commentary (a preamble)   -> content
    to=functions.NAME                -> a tool call of NAME, its body the arguments' JSON
<|return|> and <|call|> end generation (they are gpt-oss's eos ids, in generation_config.json); <|end|> only ends
a message.

The answer is read by token: markup is harmony's control tokens (by id, as openai-harmony's parser reads it), so
text a model spells with ordinary tokens - `<|end|>` inside its answer - stays text. The driver's text skips special
tokens, so a control token's piece carries no text of its own. Reasoning and content stream as they come; a call's
body is held until its message ends, then it is a call if it names an offered function with a JSON object, else its
text goes out as content (logged), as raytp.serving.tool_calls treats a malformed call. An answer cut at max_tokens
keeps what streamed and drops an unfinished call.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Collection, Iterable

from raytp.serving.tool_calls import openai_call

log = logging.getLogger("raytp")

START, END, MESSAGE, CHANNEL, CONSTRAIN, RETURN, CALL = (
    "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>")
CONTROL = (START, END, MESSAGE, CHANNEL, CONSTRAIN, RETURN, CALL)
FUNCTIONS = "functions."  # the namespace the chat template declares the request's tools in


@dataclasses.dataclass
class Delta:
    """What a piece of the answer adds to each field of OpenAI's message."""

    reasoning: str = ""
    content: str = ""

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content)


@dataclasses.dataclass(frozen=True)
class Harmony:
    """A tokenizer whose chat template speaks harmony: its control tokens' ids, and the pieces of the answer that
    the generation prompt already wrote (`<|start|>assistant`), which every answer is read after."""

    ids: dict[str, int]  # control token's text -> id
    opening: tuple[tuple[str, int | None], ...]  # (text, control token id or None)

    @classmethod
    def of(cls, tokenizer) -> Harmony | None:
        """The tokenizer's harmony, or None when its vocabulary lacks harmony's control tokens or its chat template
        does not open an assistant message for the answer. `tokenizer`: a raytp.weights.tokenizer.Tokenizer."""
        ids = {text: tokenizer.special_token_id(text) for text in CONTROL}
        if None in ids.values():
            return None
        asked = [{"role": "user", "content": "?"}]
        try:
            bare = tokenizer.apply_chat_template(asked, add_generation_prompt=False)
            prompt = tokenizer.apply_chat_template(asked, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - no template, or one that refuses this conversation: not harmony's
            return None
        opening = prompt[len(bare):] if prompt.startswith(bare) else ""
        if not opening.startswith(START + "assistant"):
            return None
        pieces = [p for p in re.split(f"({'|'.join(map(re.escape, CONTROL))})", opening) if p]
        return cls(ids, tuple(("", ids[p]) if p in ids else (p, None) for p in pieces))

    @property
    def end_ids(self) -> set[int]:
        """The tokens that end generation: <|return|> after a final answer, <|call|> after a tool call."""
        return {self.ids[RETURN], self.ids[CALL]}

    def answer(self, functions: Collection[str] = ()) -> HarmonyAnswer:
        """A reader of one answer, for a request that offered the tools named `functions`."""
        return HarmonyAnswer(self, functions)


@dataclasses.dataclass
class _Header:
    """A message's header as it is read: the text before <|channel|>, after it, and after <|constrain|> (the content
    type, kept apart so that `json` is not taken for the channel)."""

    role: str = ""
    channel: str = ""
    constraint: str = ""
    part: str = "role"  # where the header's next text goes: role, channel or constraint

    def add(self, text: str) -> None:
        setattr(self, self.part, getattr(self, self.part) + text)

    def recipient(self) -> str | None:
        words = (self.role + " " + self.channel).split()
        return next((w.removeprefix("to=") for w in words if w.startswith("to=")), None)


def _first_word(text: str) -> str:
    """The role or channel name in a part of a header, which may also hold the recipient."""
    return next((w for w in text.split() if not w.startswith("to=")), "")


class HarmonyAnswer:
    """One answer (one choice) read piece by piece: `add` each generated token's text and id, `end` once the
    answer is over."""

    def __init__(self, harmony: Harmony, functions: Collection[str]):
        self._kind = {i: text for text, i in harmony.ids.items()}
        self.functions = set(functions)
        self.reasoning, self.content = "", ""  # all of each so far
        self.calls: list[dict] = []
        self._header: _Header | None = None  # the header being read; None while a body or nothing is
        self._field: str | None = None  # where the open message's body goes: reasoning, content, call or None
        self._recipient = ""
        self._body = ""  # a call's body, held until its message ends
        for text, token_id in harmony.opening:
            self.add(text, token_id)

    def add(self, text: str, token_id: int | None) -> Delta:
        """What the token `token_id` adds; `text` is the text the stream gave with it (a control token has none,
        but characters completed late may ride along: they come before it)."""
        return self._kept(self._read(text, token_id))

    def end(self, finish: str) -> tuple[Delta, list[dict]]:
        """(the text still to send, the calls) once the answer is over: `finish` "stop" ends the last message where
        the stream ended (its <|return|> or <|call|> is the end token, which the stream leaves out), "length" cuts
        it, and an unfinished call is dropped."""
        if finish != "stop" and self._field == "call":
            log.info("an answer cut at max_tokens drops its unfinished call of %r", self._recipient)
            self._field = None
        return self._kept(self._close()), self.calls

    def _kept(self, delta: Delta) -> Delta:
        self.reasoning += delta.reasoning
        self.content += delta.content
        return delta

    def _read(self, text: str, token_id: int | None) -> Delta:
        delta = self._text(text) if text else Delta()
        control = self._kind.get(token_id)
        if control is None:
            return delta
        if control == START:
            delta = _joined(delta, self._close())
            self._header = _Header()
        elif control in (CHANNEL, CONSTRAIN) and self._header is not None:
            self._header.part = "channel" if control == CHANNEL else "constraint"
        elif control == MESSAGE and self._header is not None:
            self._open(self._header)
        elif control in (END, RETURN, CALL):
            delta = _joined(delta, self._close())
        return delta

    def _text(self, text: str) -> Delta:
        if self._header is not None:
            self._header.add(text)
        elif self._field == "call":
            self._body += text
        elif self._field is not None:
            return Delta(**{self._field: text})
        return Delta()

    def _open(self, header: _Header) -> None:
        self._header, self._body = None, ""
        recipient = header.recipient()
        if _first_word(header.role) not in ("", "assistant"):
            self._field = None  # a message the model wrote as someone else (a tool's output): not its answer
        elif recipient is not None:
            self._field, self._recipient = "call", recipient
        else:
            self._field = "reasoning" if _first_word(header.channel) == "analysis" else "content"

    def _close(self) -> Delta:
        """Ends the open message, if any: a call's body becomes a call, or, malformed, content."""
        field, self._field, self._header = self._field, None, None
        if field != "call":
            return Delta()
        name = self._recipient.removeprefix(FUNCTIONS)
        try:
            arguments = json.loads(self._body)
        except (json.JSONDecodeError, RecursionError):
            arguments = None
        if self._recipient.startswith(FUNCTIONS) and name in self.functions and isinstance(arguments, dict):
            self.calls.append(openai_call(name, arguments))
            return Delta()
        log.info("a harmony message to %r that is no call of an offered function is returned as content",
                 self._recipient)
        return Delta(content=self._body)


def _joined(a: Delta, b: Delta) -> Delta:
    return Delta(a.reasoning + b.reasoning, a.content + b.content)


def read_answer(harmony: Harmony, pieces: Iterable[tuple[str, int | None]], finish: str,
                functions: Collection[str] = ()) -> tuple[str, str, list[dict]]:
    """(reasoning, content, calls) of a whole answer given as (text, token id) pieces."""
    answer = harmony.answer(functions)
    for text, token_id in pieces:
        answer.add(text, token_id)
    answer.end(finish)
    return answer.reasoning, answer.content, answer.calls
