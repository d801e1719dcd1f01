"""The OpenAI-compatible HTTP API and the web chat, on one port, served from the driver actor's event loop.

    POST /v1/chat/completions   messages -> answer (the model's chat template), streamed as SSE or not
    POST /v1/completions        prompt -> continuation, streamed as SSE or not
    GET  /v1/models             the one served model; its id is the --model string
    /                           the Gradio web chat and Cluster panel (raytp.ui.chat)

With an API key, every route but /health and the login form wants it (raytp.serving.auth).

The handlers run in the same event loop as `Driver.submit` and call it directly: a request costs one Ray call
(its submission to the leader rank) and its tokens arrive through the driver's batched event pump, never a Ray
call per token. Batching happens in the ranks: requests join and leave the running batch between decode steps.

A client that disconnects cancels its request: the driver stream is closed, which tells the leader to free the
cache slot at its next step. Bad input gets an OpenAI-style error, `{"error": {"message", "type", "param",
"code"}}`, with a 4xx status; a full server (max_batch running + max_queue waiting) answers 429.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import (AfterValidator, AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from raytp.runtime.constraints import json_schema_grammar
from raytp.runtime.errors import BusyError, RequestError, UnavailableError, error_summary
from raytp.runtime.requests import STOP_MAX_CHARS, STOP_MAX_COUNT, check_text
from raytp.runtime.sampling import (
    REPETITION_PENALTY_MAX,
    SEED_MAX,
    SEED_MIN,
    TEMPERATURE_MAX,
    TOP_LOGPROBS_MAX,
    SamplingParams,
)
from raytp.runtime.speculation import OFF, SPECULATE_RULE, drafted_tokens, unsupported_reason
from raytp.serving.auth import FailedAttempts, KeyGate, WebSessions
from raytp.serving.harmony import HarmonyAnswer
from raytp.serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from raytp.serving.sockets import unix_socket
from raytp.serving.tool_calls import CallParser, ForcedCalls, ToolSyntax, answer_calls

log = logging.getLogger("raytp")

RETRY_AFTER_S = 10  # a 503 while the ranks rebuild: rebuilding a group takes seconds
SHUTDOWN_GRACE_S = 2.0  # open streams (the web chat keeps one per tab) get this long before they are cut
# A request's text is bounded by the context it must fit (a token is a few bytes of text, or a few digits as an id):
# 4 MiB is room for contexts of several hundred thousand tokens, and keeps a hostile body out of memory.
MAX_BODY_BYTES = 4 << 20
RESPONSE_FORMATS = ("text", "json_object", "json_schema")  # OpenAI's; the JSON ones constrain decoding


class APIError(Exception):
    """An OpenAI-style error response: status, message naming the value and the limit, the offending param."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after_s: int | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = dict(headers or {})
        if retry_after_s is not None:  # when a 503 is worth retrying
            self.headers["Retry-After"] = str(retry_after_s)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, request_id: str | None = None) -> JSONResponse:
        """The error as JSON, logged on one line with the request's id (also sent as X-Request-Id)."""
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        log.log(logging.ERROR if self.status >= 500 else logging.INFO, "request %s: %d %s", request_id, self.status,
                self.message)
        return JSONResponse(self.body(), status_code=self.status, headers={**self.headers, "X-Request-Id": request_id})


def _internal_error(_request: Request, e: Exception) -> JSONResponse:
    """What no handler expected: still JSON, still one logged line, never a traceback or plain text to the client."""
    return APIError(500, f"internal error ({error_summary(e)}); the server logged it", "server_error").response()


def _api_error(e: Exception, chat: bool) -> APIError:
    """Errors raised while running a request, as the API reports them (the driver has logged those of admitted
    requests, with their id)."""
    if isinstance(e, BusyError):
        return APIError(429, str(e), "rate_limit_error", code="server_busy")
    if isinstance(e, UnavailableError):
        return APIError(503, str(e), "server_error", code="unavailable", retry_after_s=RETRY_AFTER_S)
    if isinstance(e, RequestError):
        return _request_error(e, chat)
    return APIError(500, f"the request failed: {error_summary(e)}", "server_error")


# ---- request bodies ----------------------------------------------------------------------------------------
# Each field's bounds stand beside it; they are the ones raytp.runtime.sampling declares for every front end.
# What needs the model (top_k against the vocabulary, token ids, prompt + max_tokens against the context) is
# checked by the driver's `submit`, for the API, the web chat and the CLI alike.

def _unicode(text: str) -> str:
    check_text(text, "the text")  # the error's location names the field
    return text


Text = Annotated[str, AfterValidator(_unicode)]  # request text a tokenizer can read (no lone surrogates)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool = False  # a last chunk carrying the usage


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["text"]  # only text parts are supported
    text: Text = ""


class CalledFunction(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    name: Text
    arguments: Text  # a JSON object, as a string (as the answer gave it)

    @field_validator("arguments")
    @classmethod
    def _an_object(cls, arguments: str) -> str:
        try:
            value = json.loads(arguments)
        except json.JSONDecodeError:
            value = None
        except RecursionError:  # Python's parser recurses per level
            raise ValueError("nests arrays or objects too deeply (arguments need a few levels)") from None
        if not isinstance(value, dict):
            raise ValueError("must be a JSON object written as a string, as answers' tool_calls give it")
        return arguments


class ToolCall(BaseModel):
    """A call the assistant made earlier in the conversation, sent back with its result."""
    model_config = ConfigDict(strict=True, extra="ignore")

    id: str = ""
    type: Literal["function"] = "function"
    function: CalledFunction


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool message's: the call it answers
    # an assistant's reasoning, as its answer gave it (vLLM's newer name for it is taken too)
    reasoning_content: Text | None = Field(None, validation_alias=AliasChoices("reasoning_content", "reasoning"))

    def as_template_input(self) -> dict:
        text = "".join(p.text for p in self.content) if isinstance(self.content, list) else self.content or ""
        message = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.reasoning_content:  # under the names templates read it by: gpt-oss's "thinking", Qwen3's own
            message |= {"thinking": self.reasoning_content, "reasoning_content": self.reasoning_content}
        if self.tool_calls:  # only then: Llama 3.1's template tests whether the key is there at all
            # templates write the arguments with tojson, so they take them as an object, as transformers' do
            message["tool_calls"] = [{"id": c.id, "type": c.type, "function": {
                "name": c.function.name, "arguments": json.loads(c.function.arguments)}} for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class _Body(BaseModel):
    # strict: JSON true is not the number 1, "0.5" is not 0.5; unknown fields are ignored, as OpenAI's are
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # None: what the context has room for
    # None: the model's default (its generation_config.json, as the driver read it), else greedy / off
    temperature: float | None = Field(None, ge=0, le=TEMPERATURE_MAX, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1)  # vLLM's extension, 0 or -1 off; at most the vocabulary (checked by submit)
    repetition_penalty: float | None = Field(None, gt=0, le=REPETITION_PENALTY_MAX, allow_inf_nan=False)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)  # None: every request draws anew, as OpenAI's do
    stop: Annotated[list[Annotated[Text, Field(max_length=STOP_MAX_CHARS)]], Field(max_length=STOP_MAX_COUNT)] = []
    n: int = Field(1, ge=1)  # choices: samples of the prompt, prefilled once; at most --max-batch (checked by submit)
    best_of: int | None = Field(None, ge=1)  # only as many as n: no extra samples to choose from
    stream: bool = False
    stream_options: StreamOptions = Field(default_factory=StreamOptions)
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says (benchmarks, tests)
    # raytp's extension: "off", "ngram[:K]", or "draft[:K]" where the server has a draft model
    # (raytp.runtime.speculation); None: the server's --speculate
    speculate: str | None = Field(None, max_length=16)
    # Declared so that what raytp does not do with them is refused (`unsupported`), never silently ignored: a
    # client relying on one would take an unconstrained answer for a constrained one. JSON response formats are
    # followed (`grammar`).
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    logit_bias: Any = None
    presence_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data):
        """Clients send `"temperature": null` for "the default", as OpenAI's API takes it."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, stop):
        return [stop] if isinstance(stop, str) else stop

    @field_validator("speculate")
    @classmethod
    def _known_drafting(cls, speculate):
        try:
            drafted_tokens(speculate)
        except RequestError:
            raise ValueError(SPECULATE_RULE) from None  # the 400 adds the value
        return speculate

    def unsupported(self) -> tuple[str, str] | None:
        """(field, why) of the first field asking for what raytp does not do, or None."""
        if self.best_of not in (None, self.n):
            return "best_of", (f"best_of {self.best_of} with n {self.n} is not supported: every sample is returned, "
                               "so best_of may only equal n")
        kind = self.response_format.get("type") if isinstance(self.response_format, dict) else self.response_format
        schema = self.response_format.get("json_schema") if isinstance(self.response_format, dict) else None
        refusals = [self._tool_refusal(),
            ("response_format", self.response_format is not None and kind not in RESPONSE_FORMATS,
             f"response_format type {json.dumps(kind)} is not supported; it takes {', '.join(RESPONSE_FORMATS)}"),
            ("response_format", kind == "json_schema" and not (isinstance(schema, dict)
                                                               and isinstance(schema.get("schema"), dict)),
             'response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}'),
            ("functions", bool(self.functions), "functions (tool calls) are not supported"),
            ("function_call", self.function_call not in (None, "none"), "function_call (tool calls) is not supported"),
            ("logit_bias", bool(self.logit_bias), "logit_bias is not supported"),
            ("presence_penalty", self.presence_penalty != 0,
             "presence_penalty is not supported (0 only); repetition_penalty is"),
            ("frequency_penalty", self.frequency_penalty != 0,
             "frequency_penalty is not supported (0 only); repetition_penalty is"),
        ]
        return next(((param, why) for param, refused, why in refusals if refused), None)

    def _tool_refusal(self) -> tuple[str, bool, str]:
        choice = self.tool_choice if self.tool_choice is not None else ("auto" if self.tools else "none")
        return ("tool_choice", choice != "none",
                f"tool calls are chat's; send no tools, or tool_choice \"none\" (got {json.dumps(choice)})")

    def top_n(self) -> int | None:
        """How many top alternatives each answer token's logprobs list; None: no logprobs."""
        return None

    def prompt_top_n(self) -> int | None:
        """The same for the prompt's tokens (echo); None: none."""
        return None

    def sampling(self, defaults=None, speculate: str = OFF) -> SamplingParams:
        """The request's sampling. What it omits of temperature, top_p, top_k and repetition_penalty comes from
        `defaults` (the model's generation_config.json: raytp.weights.generation_defaults), else from SamplingParams
        (greedy, every filter off); drafting from `speculate` (the server's) where it names none."""
        named = {name: getattr(self, name) for name in ("temperature", "top_p", "top_k", "repetition_penalty")}
        chosen = {name: getattr(defaults, name) if value is None else value for name, value in named.items()
                  if value is not None or defaults is not None}
        return SamplingParams(**chosen,
                              seed=self.seed if self.seed is not None else secrets.randbits(31),
                              max_tokens=self.max_tokens, logprobs=self.top_n(), n=self.n,
                              prompt_logprobs=self.prompt_top_n(), grammar=self.grammar(),
                              speculate=self.speculate if self.speculate is not None else speculate)

    def grammar(self) -> str | None:
        """llguidance's grammar of what the answer must be, None for free text."""
        return self.grammar_of_format()

    def grammar_of_format(self) -> str | None:
        """llguidance's grammar for the response_format, None for text."""
        kind = self.response_format.get("type") if isinstance(self.response_format, dict) else None
        if kind == "json_object":
            return json_schema_grammar({"type": "object"})
        if kind == "json_schema":
            return json_schema_grammar(self.response_format["json_schema"]["schema"])
        return None


class FunctionSpec(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")  # OpenAI's rule for the name
    description: Text = ""
    parameters: dict = Field(default_factory=lambda: {"type": "object", "properties": {}})  # a JSON schema

    @field_validator("parameters")
    @classmethod
    def _readable(cls, parameters: dict) -> dict:
        """Its text goes to the chat template and the grammar: no lone surrogates in names or values."""
        _unicode(json.dumps(parameters, ensure_ascii=False))
        return parameters


class Tool(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["function"]
    function: FunctionSpec


class FunctionName(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool = False  # each answer token's log-probability
    top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS_MAX)  # and the top N alternatives (needs logprobs)
    tools: list[Tool] | None = None
    # "required" or a named function: the answer is constrained to calls of them; "auto" (the default with tools):
    # the model may write calls in its own syntax (raytp.serving.tool_calls), "none": it is not told of the tools
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    # how long a reasoning model thinks: gpt-oss's template writes it into the system message (default medium)
    reasoning_effort: Literal["low", "medium", "high"] | None = None

    @model_validator(mode="after")
    def _max_tokens(self):
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self

    def unsupported(self) -> tuple[str, str] | None:
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
        return super().unsupported()

    def top_n(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def choice(self) -> str | NamedToolChoice:
        """The tool_choice in effect: OpenAI's default is "auto" with tools, "none" without."""
        return self.tool_choice if self.tool_choice is not None else ("auto" if self.tools else "none")

    def _tool_refusal(self) -> tuple[str, bool, str]:
        choice = self.choice()
        names = [t.function.name for t in self.tools or ()]
        named = choice.function.name if isinstance(choice, NamedToolChoice) else None
        refusals = [
            (choice != "none" and not names, f"tool_choice {json.dumps(choice if named is None else named)} needs "
                                             "tools"),
            (named is not None and named not in names, f"tool_choice names {named!r}, which tools do not define"),
            (choice != "none" and self.grammar_of_format() is not None,
             f"tool_choice {json.dumps(choice if named is None else 'function')} (a tool call) cannot also follow "
             "a JSON response_format: send one or the other"),
        ]
        return next((("tool_choice", True, why) for refused, why in refusals if refused), ("tool_choice", False, ""))

    def calls(self) -> list[Tool] | None:
        """The tools the answer must call (tool_choice "required" or a named one), or None: the model decides."""
        if self.tool_choice == "required":
            return self.tools
        if isinstance(self.tool_choice, NamedToolChoice):
            return [t for t in self.tools or () if t.function.name == self.tool_choice.function.name]
        return None

    def grammar(self) -> str | None:
        """A forced tool call's grammar: one call of the named function, or a list of calls of the tools."""
        tools = self.calls()
        if tools is None:
            return super().grammar()
        calls = [{"type": "object", "properties": {"name": {"enum": [t.function.name]},
                                                   "arguments": t.function.parameters},
                  "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
        if isinstance(self.tool_choice, NamedToolChoice):
            return json_schema_grammar(calls[0], param="tools")
        return json_schema_grammar({"type": "array", "minItems": 1, "items": {"anyOf": calls}}, param="tools")

    def template_variables(self) -> dict | None:
        """The chat template's own options the request sets."""
        return None if self.reasoning_effort is None else {"reasoning_effort": self.reasoning_effort}

    def template_tools(self) -> list[dict] | None:
        """The tools as the chat template takes them, when the answer may call them (not with "none": a model
        that is not told of tools writes no call)."""
        return None if self.choice() == "none" else [t.model_dump() for t in self.tools]

    def function_names(self) -> list[str]:
        """The functions the model is told of (none with tool_choice "none")."""
        return [] if self.choice() == "none" else [t.function.name for t in self.tools]

    def call_parser(self, tool_syntax: ToolSyntax | None) -> CallParser | None:
        """What reads tool calls out of the answer: the forced call's JSON, the model's own syntax ("auto"), or
        nothing ("none")."""
        if self.calls() is not None:
            return ForcedCalls(one=isinstance(self.tool_choice, NamedToolChoice))
        if self.choice() == "auto":
            assert tool_syntax is not None, "parse_completion refuses auto without a syntax"
            return tool_syntax([t.function.name for t in self.tools])
        return None


class CompletionRequest(_Body):
    # a string or token ids; a list holding one of those (a batch of one) is taken too
    prompt: Text | Annotated[list[int], Field(min_length=1)]
    logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS_MAX)  # each token's log-probability and the top N
    echo: bool = False  # the prompt comes back before the answer (with its logprobs, when logprobs is set)
    suffix: Text | None = None  # refused: no insertion

    def unsupported(self) -> tuple[str, str] | None:
        if self.suffix:
            return "suffix", "suffix (text insertion) is not supported"
        return super().unsupported()

    def top_n(self) -> int | None:
        return self.logprobs

    def prompt_top_n(self) -> int | None:
        return self.logprobs if self.echo else None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                       and all(type(t) is int for t in prompt)):
            return prompt
        raise ValueError("must be a string or a list of token ids (one prompt per request)")


class TokenizeRequest(BaseModel):
    """POST /tokenize, as vLLM's: a prompt, or chat messages through the template (then add_generation_prompt)."""
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None  # checked when given
    prompt: Text | None = None
    messages: list[Message] | None = Field(None, min_length=1)
    tools: list[Tool] | None = None  # offered with the messages: a template that takes tools writes them too

    @model_validator(mode="after")
    def _one_of(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    tokens: list[int]


def _validation_error(e: ValidationError) -> APIError:
    """The first thing wrong with a request body, naming the field, the rule and the value."""
    errors = e.errors(include_url=False)
    # a field of several types fails once per type: report what is wrong with the value, not that it is not one of
    # the types it was not meant to be
    err = next((x for x in errors if not x["type"].endswith("_type")), errors[0])
    loc = tuple(p for p in err["loc"] if not _is_union_tag(p))
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    message = f"{f'{where!r}' if loc else 'the request body'}: {err['msg'].removeprefix('Value error, ')}"
    if err["type"] != "missing":
        got = json.dumps(err["input"], default=str)
        message += f", got {got if len(got) <= 80 else got[:77] + '...'}"
    return APIError(400, message, param=str(loc[0]) if loc else None)


def _is_union_tag(part) -> bool:
    """pydantic's name for the member of a union in an error's location ('str', 'list[int]', 'function-after[...]')."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool"))


def parse_completion(body, chat: bool, model_id: str, tool_syntax: ToolSyntax | None = None,
                     harmony: bool = False) -> ChatCompletionRequest | CompletionRequest:
    """Validate a /v1/chat/completions or /v1/completions body; raise APIError naming the bad field.
    `tool_syntax`: how the served model writes tool calls (raytp.serving.tool_calls), None if raytp cannot read
    them, which refuses tool_choice "auto" unless the model speaks `harmony` (raytp.serving.harmony reads its
    calls, and its template takes reasoning_effort)."""
    try:
        req = (ChatCompletionRequest if chat else CompletionRequest).model_validate(body)
    except ValidationError as e:
        raise _validation_error(e) from None
    if req.model != model_id:
        raise APIError(404, f"The model {req.model!r} does not exist; this server serves {model_id!r}",
                       param="model", code="model_not_found")
    refused = req.unsupported()
    if refused is not None:
        raise APIError(400, refused[1], param=refused[0], code="unsupported")
    if chat and req.choice() == "auto" and tool_syntax is None and not harmony:
        raise APIError(400, 'tool_choice "auto" (the default with tools) needs a model whose chat template takes '
                       "tools and writes calls as Qwen2/2.5/3's (<tool_call>), Llama 3.1's (JSON) or gpt-oss's "
                       '(harmony) do; this model\'s does not: send tool_choice "required" or name a function',
                       param="tool_choice", code="unsupported")
    if chat and req.reasoning_effort is not None and not harmony:
        raise APIError(400, f"reasoning_effort {req.reasoning_effort!r} needs a model whose chat template takes it "
                       "(gpt-oss's); this model's does not: leave reasoning_effort out", param="reasoning_effort",
                       code="unsupported")
    return req


def _request_error(e: RequestError, chat: bool) -> APIError:
    param = "messages" if chat and e.param == "prompt" else e.param
    return APIError(400, str(e), param=param, code=e.code)


# ---- running a request -------------------------------------------------------------------------------------

@dataclass
class Piece:
    """A piece of an answer's text and, where asked, the log-probabilities of the tokens that made it."""

    text: str
    logprobs: list[TokenLogprob] | None = None
    index: int = 0  # the choice (sample) it belongs to
    token_id: int | None = None  # the token that completed it: a chat format's markup is control tokens, no text


# (token id, its log-probability or None for a prompt's first token, its top alternatives [(id, logprob)] or None)
TokenLogprob = tuple[int, float | None, list[tuple[int, float]] | None]


async def run_completion(driver, req: ChatCompletionRequest | CompletionRequest):
    """Yield the answer as Pieces, then one final dict {finish_reasons (one per choice), prompt_tokens,
    completion_tokens}.

    Tokenizes the prompt once, here; the driver's `submit` checks it against the model. With echo each choice's
    first piece is the prompt (its tokens' logprobs too, with logprobs). Closing this generator (or cancelling its
    consumer) closes the driver's stream, which cancels the request."""
    if chat := isinstance(req, ChatCompletionRequest):
        prompt_ids = await driver.encode(messages=[m.as_template_input() for m in req.messages],
                                         tools=req.template_tools(), variables=req.template_variables())
    else:
        prompt_ids = req.prompt if isinstance(req.prompt, list) else await driver.encode(prompt=req.prompt)
    if why := driver.unavailable():  # a client retries a 503 on its own; it would only wait out a rebuild here
        raise UnavailableError(why)
    params = req.sampling(driver.sampling_defaults, driver.settings.speculate)
    if params.speculate != OFF and (why := unsupported_reason(driver.config)):
        raise RequestError(f"speculate {params.speculate!r}: {why}", param="speculate")
    echo = not chat and req.echo
    scored: list[TokenLogprob] = [(t, None, None) for t in prompt_ids[:1]]  # the first prompt token has no logprob
    async with aclosing(driver.submit(prompt_ids, params, req.stop, req.ignore_eos)) as pieces:
        async for item in pieces:
            if "prompt_logprobs" in item:
                scored += [(t, lp, top) for t, (lp, top) in zip(prompt_ids[len(scored):], item["prompt_logprobs"])]
                continue
            if echo:  # before the first token or the end, whichever comes first
                echo = False
                text = req.prompt if isinstance(req.prompt, str) else driver.decode(prompt_ids)
                for index in range(params.n):
                    yield Piece(text, scored if params.prompt_logprobs is not None else None, index)
            if "finish" in item:
                yield {"finish_reasons": ["length" if f == "length" else "stop" for f in item["finishes"]],
                       "prompt_tokens": item["prompt_tokens"], "completion_tokens": item["generated_tokens"]}
                return
            if "logprob" in item and not (chat and item["end_token"]):  # chat's logprobs are the message's tokens
                yield Piece(item["text"], [(item["token_id"], item["logprob"], item["top_logprobs"])], item["index"],
                            item["token_id"])
            elif item["text"] or not item["end_token"]:  # a token of no text may be markup (raytp.serving.harmony)
                yield Piece(item["text"], index=item["index"], token_id=item["token_id"])


async def _until_disconnected(request: Request) -> None:
    """Returns when the client goes away (the body is already read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, awaitable):
    """Await `awaitable`; if the client disconnects first, cancel it (which closes the driver stream) and raise
    asyncio.CancelledError."""
    work = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            await asyncio.wait({work})  # let the cancellation run through the driver stream's cleanup
    if work.cancelled():
        raise asyncio.CancelledError("the client disconnected")
    return work.result()


# ---- responses ---------------------------------------------------------------------------------------------

def _usage(final: dict) -> dict:
    p, c = final["prompt_tokens"], final["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Answer:
    """The response objects of one request, in OpenAI's chat or text-completion shape. `strings(ids)` gives each
    token's own text, as logprobs show tokens."""

    def __init__(self, chat: bool, model_id: str, strings, calls: CallParser | None = None,
                 channels: list[HarmonyAnswer] | None = None):
        self.chat, self.model, self.strings = chat, model_id, strings
        self.calls = calls  # reads tool calls out of the answer's text; None: the answer is text
        self.channels = channels  # each choice's harmony reader, for a model that answers in channels
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.offsets: dict[int, int] = {}  # text completions: each choice's next text_offset, across a stream

    def _envelope(self, object_: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def logprobs(self, scored: list[TokenLogprob] | None, index: int = 0) -> dict | None:
        """OpenAI's logprobs object of these tokens: chat's `content` list, or the legacy parallel lists."""
        if scored is None:
            return None
        ids = sorted({t for t, _, _ in scored} | {i for _, _, top in scored for i, _ in top or ()})
        text = dict(zip(ids, self.strings(ids)))
        if self.chat:
            def entry(t: int, lp: float) -> dict:
                return {"token": text[t], "logprob": lp, "bytes": list(text[t].encode())}
            return {"content": [entry(t, lp) | {"top_logprobs": [entry(i, v) for i, v in top]}
                                for t, lp, top in scored], "refusal": None}
        offsets = []
        for t, _, _ in scored:
            offsets.append(self.offsets.get(index, 0))
            self.offsets[index] = offsets[-1] + len(text[t])
        return {"tokens": [text[t] for t, _, _ in scored], "token_logprobs": [lp for _, lp, _ in scored],
                "top_logprobs": [None if top is None else {text[i]: v for i, v in top} for _, _, top in scored],
                "text_offset": offsets}

    def whole(self, texts: list[str], final: dict, scored: list[list[TokenLogprob] | None]) -> dict:
        """The whole answer: each choice's text and scored tokens."""
        choices = []
        for i, (text, finish) in enumerate(zip(texts, final["finish_reasons"])):
            choice = {"index": i, "logprobs": self.logprobs(scored[i], i), "finish_reason": finish}
            if self.channels is not None:
                choices.append(choice | self._channels_message(self.channels[i], finish))
                continue
            content, calls = (text, []) if self.calls is None else answer_calls(self.calls, text, finish)
            if calls:
                message = {"role": "assistant", "content": content, "tool_calls": calls}
                choices.append(choice | {"finish_reason": "tool_calls", "message": message})
            elif self.chat:
                choices.append(choice | {"message": {"role": "assistant", "content": text}})
            else:
                choices.append({"text": text, **choice})
        return self._envelope("chat.completion" if self.chat else "text_completion", choices, usage=_usage(final))

    @staticmethod
    def _channels_message(reader: HarmonyAnswer, finish: str) -> dict:
        """A harmony answer's message: its final channel as content, its analysis as reasoning_content."""
        _, calls = reader.end(finish)
        message = {"role": "assistant", "content": reader.content or (None if calls else ""),
                   "reasoning_content": reader.reasoning or None}
        if calls:
            return {"finish_reason": "tool_calls", "message": message | {"tool_calls": calls}}
        return {"message": message}

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False,
              scored: list[TokenLogprob] | None = None, index: int = 0, tool_calls: list[dict] | None = None,
              reasoning: str | None = None, **extra) -> dict:
        logprobs = self.logprobs(scored, index)
        if self.chat:
            delta = ({"role": "assistant"} if role else {}) | ({"reasoning_content": reasoning} if reasoning else {}) \
                | ({"content": text} if text is not None else {})
            if tool_calls is not None:
                delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(tool_calls)]
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            return self._envelope("chat.completion.chunk", [choice], **extra)
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice], **extra)

    def usage_chunk(self, final: dict) -> dict:
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [], usage=_usage(final))


async def _read_body(request: Request) -> bytes:
    """The body, refused with 413 past MAX_BODY_BYTES before more of it is read into memory."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes, far more than a prompt that "
                           "fits the context; shorten the prompt")
    return bytes(body)


async def _complete(request: Request, driver, model_id: str, chat: bool) -> Response:
    try:
        body = json.loads(await _read_body(request))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return APIError(400, f"the request body is not valid JSON: {e}").response()
    except RecursionError:  # Python's parser recurses per level: [[[[... 200k deep would otherwise be a 500
        return APIError(400, "the request body nests arrays or objects too deeply (a request needs a few levels)"
                        ).response()
    req = parse_completion(body, chat, model_id, driver.tool_syntax, harmony=driver.harmony is not None)
    # a harmony model's answer is read by channel, unless a grammar holds it to JSON (response_format, a forced call)
    if chat and driver.harmony is not None and req.grammar() is None:
        answer = _Answer(chat, model_id, driver.token_strings,
                         channels=[driver.harmony.answer(req.function_names()) for _ in range(req.n)])
    else:
        answer = _Answer(chat, model_id, driver.token_strings, req.call_parser(driver.tool_syntax) if chat else None)
    pieces = run_completion(driver, req)
    try:
        # Wait for the first piece before answering 200: a full server or a bad request still gets its status.
        first = await _unless_disconnected(request, anext(pieces))
    except asyncio.CancelledError:
        await pieces.aclose()
        return Response(status_code=499)
    except Exception as e:  # noqa: BLE001 - every failure becomes an OpenAI-style error
        await pieces.aclose()
        return _api_error(e, chat).response(answer.id)
    if req.stream:
        return StreamingResponse(_stream_body(answer, req.stream_options.include_usage, req.n, first, pieces),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def rest():
        texts, item = [[] for _ in range(req.n)], first
        asked = req.top_n() is not None or req.prompt_top_n() is not None
        scored = [[] if asked else None for _ in range(req.n)]
        while isinstance(item, Piece):
            texts[item.index].append(item.text)
            if answer.channels is not None:
                answer.channels[item.index].add(item.text, item.token_id)
            if item.logprobs is not None:
                scored[item.index] += item.logprobs
            item = await anext(pieces)
        return ["".join(t) for t in texts], item, scored

    try:
        texts, final, scored = await _unless_disconnected(request, rest())
    except asyncio.CancelledError:
        return Response(status_code=499)
    except Exception as e:  # noqa: BLE001
        return _api_error(e, chat).response(answer.id)
    finally:
        await pieces.aclose()
    return JSONResponse(answer.whole(texts, final, scored))


class _HeldAnswer:
    """One streamed choice whose text may hold tool calls: what is surely text goes out as it comes (with its
    tokens' logprobs); from where a call may begin, the rest waits for the answer's end, then goes out as one
    tool_calls delta, or as the text it turned out to be."""

    def __init__(self, calls: CallParser):
        self.calls = calls
        self.text, self.sent = "", 0  # the answer so far; how much of it went out as content
        self.scored: list[tuple[int, list[TokenLogprob]]] = []  # logprobs not yet sent, after the text they end

    def add(self, piece: Piece) -> tuple[str, list[TokenLogprob] | None] | None:
        """The content and logprobs that may go out now, or None."""
        self.text += piece.text
        if piece.logprobs is not None:
            self.scored.append((len(self.text), piece.logprobs))
        cut = max(self.sent, self.calls.streamable(self.text))
        text, self.sent = self.text[self.sent:cut], cut
        scored = self._release(cut)
        return (text, scored) if text or scored else None

    def end(self, finish: str) -> tuple[str, list[dict], list[TokenLogprob] | None]:
        """(the content still to send, the calls, the logprobs still to send) once the answer is whole."""
        content, calls = answer_calls(self.calls, self.text, finish)
        return (content or "")[self.sent:], calls, self._release(len(self.text))

    def _release(self, upto: int) -> list[TokenLogprob] | None:
        ready = [lp for end, lps in self.scored if end <= upto for lp in lps]
        self.scored = [(end, lps) for end, lps in self.scored if end > upto]
        return ready or None


async def _stream_body(answer: _Answer, include_usage: bool, n: int, first, pieces):
    """SSE chunks. On a disconnect Starlette cancels this generator mid-await; `aclosing` then closes `pieces`,
    which closes the driver stream and cancels the request."""
    extra = {"usage": None} if include_usage else {}
    async with aclosing(pieces):
        try:
            if answer.chat:
                for index in range(n):
                    yield _sse(answer.chunk("", role=True, index=index, **extra))
            item = first
            held = [_HeldAnswer(answer.calls) for _ in range(n)] if answer.calls is not None else None
            while isinstance(item, Piece):
                if answer.channels is not None:
                    delta = answer.channels[item.index].add(item.text, item.token_id)
                    if delta or item.logprobs is not None:
                        yield _sse(answer.chunk(delta.content or None, scored=item.logprobs, index=item.index,
                                                reasoning=delta.reasoning, **extra))
                elif held is None:
                    if item.text or item.logprobs is not None:
                        yield _sse(answer.chunk(item.text, scored=item.logprobs, index=item.index, **extra))
                elif (out := held[item.index].add(item)) is not None:
                    yield _sse(answer.chunk(out[0], scored=out[1], index=item.index, **extra))
                item = await anext(pieces)
            for index, finish in enumerate(item["finish_reasons"]):
                if answer.channels is not None:
                    delta, calls = answer.channels[index].end(finish)
                    if delta or calls:
                        yield _sse(answer.chunk(delta.content or None, index=index, tool_calls=calls or None,
                                                reasoning=delta.reasoning, **extra))
                    finish = "tool_calls" if calls else finish
                elif held is not None:
                    text, calls, scored = held[index].end(finish)
                    if text or calls or scored:
                        yield _sse(answer.chunk(text or None, scored=scored, index=index, tool_calls=calls or None,
                                                **extra))
                    finish = "tool_calls" if calls else finish
                yield _sse(answer.chunk(None if answer.chat else "", finish, index=index, **extra))
            if include_usage:
                yield _sse(answer.usage_chunk(item))
        except Exception as e:  # noqa: BLE001 - after the 200 went out an error can only travel in the stream
            error = _api_error(e, answer.chat)
            log.error("request %s: %d in the stream: %s", answer.id, error.status, error.message)
            yield _sse(error.body())
        yield "data: [DONE]\n\n"


def build_app(driver, api_key: str | None = None) -> FastAPI:
    """The API routes and the web chat over `driver` (the plain Driver object, running in this event loop); with
    an `api_key`, every route behind it (raytp.serving.auth)."""
    model_id = driver.settings.model
    created = int(time.time())

    app = FastAPI(title="raytp", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(APIError, lambda _request, e: e.response())
    app.add_exception_handler(Exception, _internal_error)
    v1 = APIRouter(prefix="/v1")

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [_model_card(driver, model_id, created)]}

    @v1.get("/models/{name:path}")
    async def model(name: str):
        if name != model_id:
            raise APIError(404, f"The model {name!r} does not exist; this server serves {model_id!r}",
                           param="model", code="model_not_found")
        return _model_card(driver, model_id, created)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        return await _complete(request, driver, model_id, chat=True)

    @v1.post("/completions")
    async def completions(request: Request):
        return await _complete(request, driver, model_id, chat=False)

    @v1.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def unknown(rest: str, request: Request):
        path = f"/v1/{rest}"
        allowed = sorted({m for r in v1.routes if r.path == path for m in r.methods})  # not the catch-all's pattern
        if allowed:
            raise APIError(405, f"{request.method} {path} is not supported: {path} takes {' or '.join(allowed)}",
                           code="method_not_allowed", headers={"Allow": ", ".join(allowed)})
        raise APIError(404, f"no route {request.method} {path}; this server has POST /v1/chat/completions, "
                       "POST /v1/completions and GET /v1/models", code="unknown_url")

    app.include_router(v1)

    # Beside /v1, as vLLM has them: /health for load balancers and probes (no key), the others behind the key.
    @app.get("/health")
    async def health():
        why = await driver.health()
        if why:
            return APIError(503, why, "server_error", code="unavailable", retry_after_s=RETRY_AFTER_S).response()
        return {"status": "ok", "model": model_id, "ranks": len(driver.devices)}

    extra = APIRouter()

    @extra.get("/metrics")
    async def metrics():
        return Response(await driver.metrics_text(), media_type=METRICS_CONTENT_TYPE)

    @extra.post("/tokenize")
    async def tokenize(request: Request):
        req = _parse(TokenizeRequest, await _json_body(request), model_id)
        try:
            if req.messages is not None:
                ids = await driver.encode(messages=[m.as_template_input() for m in req.messages],
                                          tools=[t.model_dump() for t in req.tools] if req.tools else None)
            else:
                ids = await driver.encode(prompt=req.prompt)
        except RequestError as e:
            raise _request_error(e, chat=req.messages is not None) from None
        return {"count": len(ids), "max_model_len": driver.settings.max_context, "tokens": ids}

    @extra.post("/detokenize")
    async def detokenize(request: Request):
        req = _parse(DetokenizeRequest, await _json_body(request), model_id)
        vocab, context = driver.config.vocab_size, driver.settings.max_context
        if len(req.tokens) > context:  # no sequence of this server is longer; decoding runs in the event loop
            raise APIError(400, f"'tokens' has {len(req.tokens)} ids, more than the context holds ({context}, "
                           "--max-context)", param="tokens")
        bad = next((i for i, t in enumerate(req.tokens) if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"'tokens' must lie in [0, {vocab}) (the vocabulary); position {bad} has "
                           f"{req.tokens[bad]}", param="tokens")
        try:
            return {"prompt": driver.decode(req.tokens, strict=True)}
        except RequestError as e:  # a model without a tokenizer
            raise APIError(400, str(e), param="tokens") from None

    app.include_router(extra)
    web_chat = _mount_web_chat(app, driver, api_key)
    if api_key:
        app.state.failed_attempts = FailedAttempts()
        app.add_middleware(KeyGate, key=api_key, sessions=WebSessions(web_chat), attempts=app.state.failed_attempts)
    return app


def _mount_web_chat(app: FastAPI, driver, api_key: str | None):
    """The Gradio web chat at /, beside the API; returns Gradio's app. Its routes stay out of the OpenAPI schema,
    as the API's do."""
    import gradio as gr
    from starlette.routing import Mount

    from raytp.ui.chat import build_ui

    auth = None
    if api_key:  # Gradio then shows its login form to a browser without a session (KeyGate answers its POST)
        auth = lambda _user, password: hmac.compare_digest(password.encode(), api_key.encode())  # noqa: E731
    gr.mount_gradio_app(app, build_ui(driver), path="/", auth=auth, footer_links=[],
                        app_kwargs={"openapi_url": None, "docs_url": None, "redoc_url": None},
                        auth_message="Log in with the server's API key as password; the user name may stay empty.")
    return next(r.app for r in app.routes if isinstance(r, Mount) and r.path == "")


async def _json_body(request: Request):
    try:
        return json.loads(await _read_body(request))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, "the request body nests arrays or objects too deeply") from None


def _parse(model: type[BaseModel], body, model_id: str):
    try:
        req = model.model_validate(body)
    except ValidationError as e:
        raise _validation_error(e) from None
    if req.model is not None and req.model != model_id:
        raise APIError(404, f"The model {req.model!r} does not exist; this server serves {model_id!r}",
                       param="model", code="model_not_found")
    return req


def _model_card(driver, model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "raytp",
            "max_model_len": driver.settings.max_context}


# ---- the server --------------------------------------------------------------------------------------------

class HTTPServer:
    """Uvicorn running the API and the web chat as a task of the current event loop, on a Unix socket: `raytp serve`
    relays its clients to it (raytp.serving.relay), and the client's address is the relay's X-Forwarded-For."""

    def __init__(self, server, task: asyncio.Task):
        self.server, self.task = server, task

    @classmethod
    async def start(cls, driver, path: str, api_key: str | None = None) -> HTTPServer:
        import uvicorn

        try:
            sock = unix_socket(path)
        except OSError as e:
            raise RequestError(f"cannot listen on {path}: {e.strerror}") from None
        app = build_app(driver, api_key)
        # the socket's directory lets only this user in, and the relay replaces any X-Forwarded-For a client sent
        config = uvicorn.Config(app, uds=path, loop="none", log_level="warning", forwarded_allow_ips="*",
                                timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
        server = uvicorn.Server(config)

        async def serve():
            try:
                await server.serve(sockets=[sock])
            except SystemExit:  # uvicorn exits on startup failures; that must not end the actor's event loop
                raise RuntimeError(f"the HTTP server on {path} failed to start (see the log)") from None
            finally:
                sock.close()

        task = asyncio.create_task(serve())
        while not server.started:
            if task.done():
                task.result()  # raises why it stopped
                raise RuntimeError(f"the HTTP server on {path} stopped during startup")
            await asyncio.sleep(0.05)
        return cls(server, task)

    async def stop(self) -> None:
        self.server.should_exit = True
        try:
            await asyncio.wait_for(self.task, SHUTDOWN_GRACE_S + 5)
        except Exception as e:  # noqa: BLE001 - shutting down anyway; say why it was not clean
            log.warning("the HTTP server did not stop cleanly: %s", e)
