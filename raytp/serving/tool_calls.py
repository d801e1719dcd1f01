"""Tool calls in an answer's text, as OpenAI's `tool_calls`: the model's own syntax (tool_choice "auto"), or the
JSON a forced call's grammar produced (tool_choice "required" or a named function).

With "auto" the model decides: it decodes freely and writes a call the way its chat template taught it, and the
text is parsed afterwards, as vLLM's `hermes` and `llama3_json` parsers do. A grammar admitting "free text or a
well-formed call" would also guarantee the call's JSON, but it would hold every auto answer to the token loop's
step-by-step reading (the mask needs each token) for the whole answer, and a call the model botches is still one
it meant to make; free decoding costs nothing, and a malformed call (bad JSON, a function not offered) comes back
as the plain text it is, never an error.

Two syntaxes, told apart by how the model's chat template writes an assistant's call (`template_syntax`):
    Hermes (Qwen2, Qwen2.5, Qwen3)   text, then <tool_call>{"name": ..., "arguments": {...}}</tool_call> blocks
    Llama 3.1 JSON                   the whole answer is {"name": ..., "parameters": {...}} (several joined by ";"),
                                     after an optional <|python_tag|>

While streaming, text goes out until a call may begin (`streamable`); from there the answer is held, and at its
end goes out either as one tool_calls delta or, if it holds no well-formed call, as content.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Collection

log = logging.getLogger("raytp")

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"  # Llama 3.1's marker before a call; a control token, so usually not in the text
# A made-up call rendered through a chat template shows how that template writes calls: its names are unlikely
# to appear in a template's own text.
_PROBE_NAME, _PROBE_ARGUMENTS = "raytp_probe_function", {"raytp_probe_argument": 7}


class Malformed(ValueError):
    """What makes a would-be call no call (the answer is then returned as text)."""


def openai_call(name: str, arguments: dict) -> dict:
    """One entry of OpenAI's tool_calls: arguments are a JSON string."""
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def _checked_call(value, names: Collection[str], arguments_key: str = "arguments") -> dict:
    """OpenAI's entry for one parsed call object, or Malformed naming what is wrong with it."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise Malformed("a call is not an object with a name")
    if value["name"] not in names:
        raise Malformed(f"the call names {value['name']!r}, which the request's tools do not define")
    arguments = value.get(arguments_key, value.get("arguments"))
    if not isinstance(arguments, dict):
        raise Malformed(f"the call of {value['name']!r} has no object of arguments")
    return openai_call(value["name"], arguments)


def _partial_marker(text: str, marker: str) -> int:
    """How many characters at the end of `text` could be the start of `marker` (written over several tokens)."""
    return next((n for n in range(min(len(marker) - 1, len(text)), 0, -1) if text.endswith(marker[:n])), 0)


class HermesCalls:
    """Text, then calls as <tool_call>JSON</tool_call> blocks (Qwen2/2.5/3's templates, from Hermes 2 Pro). The
    last block may lack its closing tag, as vLLM accepts: the end of the answer closes it."""

    def __init__(self, names: Collection[str]):
        self.names = names

    def streamable(self, text: str) -> int:
        """How much of `text` is surely no call: up to a marker, or to a partial one at the end, less the
        whitespace before it (which belongs to neither the content nor the call)."""
        at = text.find(HERMES_OPEN)
        end = at if at >= 0 else len(text) - _partial_marker(text, HERMES_OPEN)
        return len(text[:end].rstrip())

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        """(content, calls): the text before the first call, and the calls; Malformed if after the first
        marker anything but well-formed calls of the offered tools is written."""
        at = text.find(HERMES_OPEN)
        if at < 0:
            return text, []
        calls, rest = [], text[at:]
        while rest:
            if not rest.startswith(HERMES_OPEN):
                raise Malformed(f"text after a call: {rest[:40]!r}")
            body, closed, rest = rest[len(HERMES_OPEN):].partition(HERMES_CLOSE)
            if not closed and HERMES_OPEN in body:
                raise Malformed("a call without its closing tag before the next one")
            try:
                calls.append(_checked_call(json.loads(body), self.names))
            except json.JSONDecodeError as e:
                raise Malformed(f"a call's JSON does not parse ({e})") from None
            rest = rest.lstrip()
        return text[:at].rstrip() or None, calls


class Llama3JsonCalls:
    """The whole answer is a call, {"name": ..., "parameters": {...}} (Llama 3.1's template; "arguments" is taken
    too, as vLLM does), or several joined by ";", optionally after <|python_tag|>. An answer that starts with
    anything else is text."""

    def __init__(self, names: Collection[str]):
        self.names = names

    @staticmethod
    def _body(text: str) -> str:
        body = text.lstrip()
        return body[len(PYTHON_TAG):].lstrip() if body.startswith(PYTHON_TAG) else body

    def streamable(self, text: str) -> int:
        """All of it once it has begun as text; nothing while it is empty or may still become a call."""
        body = text.lstrip()
        if not body or body.startswith("{") or PYTHON_TAG.startswith(body[:len(PYTHON_TAG)]):
            return 0
        return len(text)

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        body = self._body(text)
        if not body.startswith("{"):
            return text, []
        decoder, calls, at = json.JSONDecoder(), [], 0
        while True:
            try:
                value, at = decoder.raw_decode(body, at)
            except json.JSONDecodeError as e:
                raise Malformed(f"a call's JSON does not parse ({e})") from None
            calls.append(_checked_call(value, self.names, arguments_key="parameters"))
            rest = body[at:].lstrip()
            if not rest:
                return None, calls
            if not rest.startswith(";"):
                raise Malformed(f"text after a call: {rest[:40]!r}")
            at = len(body) - len(rest[1:].lstrip())


class ForcedCalls:
    """A forced call's answer: the JSON its grammar allowed, one call's object (a named function) or a list of
    calls (tool_choice "required"). Nothing of it streams before it is whole."""

    def __init__(self, one: bool):
        self.one = one

    def streamable(self, text: str) -> int:
        return 0

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        try:  # the grammar made it JSON, unless a stop string cut it (a cut answer is not parsed: `answer_calls`)
            value = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            raise Malformed("the forced call was cut short (by a stop string?)") from None
        return None, [openai_call(call["name"], call["arguments"]) for call in ([value] if self.one else value)]


CallParser = HermesCalls | Llama3JsonCalls | ForcedCalls
ToolSyntax = type[HermesCalls] | type[Llama3JsonCalls]


def answer_calls(parser: CallParser, text: str, finish: str) -> tuple[str | None, list[dict]]:
    """(content, calls) of a whole answer. An answer cut short (max_tokens) has no calls; a malformed call leaves
    the text as it is, content (logged: a client sees only text where it may have expected a call)."""
    if finish != "stop":
        return text, []
    try:
        return parser.parse(text)
    except Malformed as e:
        log.info("an answer that looks like a tool call is returned as text: %s", e)
        return text, []


def template_syntax(render: Callable[[list[dict]], str]) -> ToolSyntax | None:
    """Which syntax a chat template writes an assistant's tool call in, from `render(messages)` (the template's
    text for a conversation): a made-up call is rendered and looked for. None for a template that writes no call
    (SmolLM2's) or writes it some other way."""
    call = {"id": "call_0", "type": "function", "function": {"name": _PROBE_NAME, "arguments": _PROBE_ARGUMENTS}}
    messages = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    try:
        text = render(messages)
    except Exception:  # noqa: BLE001 - a template may refuse a message shape it does not know: it takes no calls
        return None
    named_at = text.find(_PROBE_NAME)
    if named_at < 0:
        return None
    for syntax, marker in ((HermesCalls, HERMES_OPEN), (Llama3JsonCalls, "{")):
        at = text.rfind(marker, 0, named_at)  # where the call the name belongs to begins
        if at < 0:
            continue
        try:
            _, calls = syntax([_PROBE_NAME]).parse(_assistant_turn(text[at:]))
        except Malformed:
            continue
        if [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
                [(_PROBE_NAME, _PROBE_ARGUMENTS)]:
            return syntax
    return None


def _assistant_turn(text: str) -> str:
    """The rendered call up to the end of its turn: the template's markup after it (<|im_end|>, <|eot_id|>) is no
    part of what the model writes."""
    ends = [i for i in (text.find("<|im_end|>"), text.find("<|eot_id|>"), text.find("<|eom_id|>")) if i >= 0]
    return text[:min(ends)] if ends else text
