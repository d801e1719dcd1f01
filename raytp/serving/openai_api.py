"""The OpenAI-compatible HTTP API and the web chat, on one port, served from the driver actor's event loop.

    POST /v1/chat/completions   messages -> answer (the model's chat template), streamed as SSE or not
    POST /v1/completions        prompt -> continuation, streamed as SSE or not
    GET  /v1/models             the one served model; its id is the --model string
    /                           the Gradio web chat and Cluster panel (raytp.ui.chat)

The handlers run in the same event loop as `Driver.stream` and call it directly: a request costs one Ray call
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
import socket
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from raytp.runtime.errors import BusyError, RequestError

log = logging.getLogger("raytp")

SHUTDOWN_GRACE_S = 2.0  # open streams (the web chat keeps one per tab) get this long before they are cut


class APIError(Exception):
    """An OpenAI-style error response: status, message naming the value and the limit, the offending param."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _api_error(e: Exception) -> APIError:
    """Errors raised while running a request, as the API reports them."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, BusyError):
        return APIError(429, str(e), "rate_limit_error", code="server_busy")
    if isinstance(e, RequestError):
        return APIError(400, str(e))
    log.warning("request failed: %s", e)
    return APIError(500, f"the request failed: {e}", "server_error")


# ---- request parsing ---------------------------------------------------------------------------------------

@dataclass
class Completion:
    """One validated request: what to send to `Driver.stream`, and how to answer."""

    chat: bool
    prompt: str | None = None
    messages: list[dict] | None = None
    prompt_ids: list[int] | None = None  # a completions prompt given as token ids
    params: dict = field(default_factory=dict)  # SamplingParams fields
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk carrying the usage
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says (benchmarks, tests)
    prompt_tokens: int = 0

    def inputs(self) -> dict:
        ids = {"prompt_ids": self.prompt_ids} if self.prompt_ids is not None else {}
        return {"prompt": self.prompt, "messages": self.messages, **ids}

    def stream_args(self) -> dict:
        return {"params": self.params, **self.inputs(), **({"ignore_eos": True} if self.ignore_eos else {})}


def _typed(body: dict, name: str, kinds: tuple, what: str, default=None):
    value = body.get(name)
    if value is None:
        return default
    # JSON true/false are Python bools, which are ints too: a number field must not take them
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise APIError(400, f"'{name}' must be {what}, got {json.dumps(value)}", param=name)
    return value


def _number(body: dict, name: str, default, low: float, high: float | None = None, low_open: bool = False):
    value = _typed(body, name, (int, float), "a number", default)
    if value is None:
        return None
    if value < low or (low_open and value == low) or (high is not None and value > high):
        bounds = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}{']' if high else ')'}"
        raise APIError(400, f"'{name}' must be in {bounds}, got {value}", param=name)
    return value


def _message_text(content, i: int) -> str:
    """A message's content: a string, or OpenAI's list of parts of which only text parts are supported."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", param="messages")


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise APIError(400, f"messages[{i}] must be an object whose role is system, user or assistant",
                           param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _message_text(m.get("content"), i)})
    return out


def _prompt(body: dict) -> tuple[str | None, list[int] | None]:
    """(text, token ids): a string, a list of token ids, or a list holding exactly one of those."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return None, prompt
    raise APIError(400, "'prompt' must be a string or a list of token ids (one prompt per request)", param="prompt")


def parse_completion(body, chat: bool, model_id: str) -> Completion:
    """Validate a /v1/chat/completions or /v1/completions body; raise APIError naming the bad field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, f"'model' is required; this server serves {model_id!r}", param="model")
    if model != model_id:
        raise APIError(404, f"The model {model!r} does not exist; this server serves {model_id!r}",
                       param="model", code="model_not_found")
    n = _typed(body, "n", (int,), "an integer", 1)
    if n != 1:
        raise APIError(400, f"'n' must be 1 (one choice per request), got {n}", param="n")
    if _typed(body, "best_of", (int,), "an integer", 1) != 1:
        raise APIError(400, "'best_of' must be 1", param="best_of")
    if body.get("logprobs") not in (None, False, 0):
        raise APIError(400, "'logprobs' is not supported", param="logprobs")
    if _typed(body, "echo", (bool,), "a boolean", False):
        raise APIError(400, "'echo' is not supported", param="echo")

    req = Completion(chat=chat)
    if chat:
        req.messages = _messages(body)
    else:
        req.prompt, req.prompt_ids = _prompt(body)
    max_tokens = _typed(body, "max_tokens", (int,), "an integer", None)
    if chat and max_tokens is None:
        max_tokens = _typed(body, "max_completion_tokens", (int,), "an integer", None)
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"'max_tokens' must be at least 1, got {max_tokens}", param="max_tokens")
    seed = _typed(body, "seed", (int,), "an integer", None)
    req.params = {
        "temperature": _number(body, "temperature", 1.0, 0.0),
        "top_p": _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        "top_k": max(0, _typed(body, "top_k", (int,), "an integer", 0)),  # vLLM's extension; -1 also disables
        "repetition_penalty": _number(body, "repetition_penalty", 1.0, 0.0, low_open=True),
        # without a seed every request draws anew, as OpenAI's API does
        "seed": seed if seed is not None else secrets.randbits(31),
    }
    if max_tokens is not None:
        req.params["max_tokens"] = max_tokens
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise APIError(400, "'stop' must be a string or a list of strings", param="stop")
    req.stop = [s for s in stop or [] if s]
    req.ignore_eos = _typed(body, "ignore_eos", (bool,), "a boolean", False)
    req.stream = _typed(body, "stream", (bool,), "a boolean", False)
    options = _typed(body, "stream_options", (dict,), "an object", {})
    req.include_usage = bool(options.get("include_usage")) and req.stream
    return req


def fit_context(driver, req: Completion) -> None:
    """Tokenize to check the prompt and max_tokens against the context; default max_tokens to what is left."""
    try:
        ids = driver.prompt_ids(**req.inputs())
    except ValueError as e:  # RequestError, or a tokenizer that cannot take this input (no chat template)
        too_long = str(e).startswith("the prompt has")
        raise APIError(400, str(e), param="messages" if req.chat else "prompt",
                       code="context_length_exceeded" if too_long else None) from None
    context = driver.settings.max_context
    room = context - len(ids)
    asked = req.params.setdefault("max_tokens", room)
    if asked > room:
        raise APIError(400, f"this model's context holds {context} tokens (--max-context); the prompt has "
                       f"{len(ids)} and max_tokens asks for {asked} more: lower max_tokens to at most {room}",
                       param="max_tokens", code="context_length_exceeded")
    req.prompt_tokens = len(ids)


# ---- running a request -------------------------------------------------------------------------------------

class StopScanner:
    """Cuts streamed text at the first stop string. Text that might be the start of a stop string is held back
    until the next piece shows whether it is."""

    def __init__(self, stops: list[str]):
        self.stops, self.held = stops, ""

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


async def run_completion(driver, req: Completion):
    """Yield the answer's text pieces, then one final dict {finish_reason, prompt_tokens, completion_tokens}.

    Closing this generator (or cancelling its consumer) closes the driver stream, which cancels the request."""
    stops = StopScanner(req.stop)
    tokens = 0
    async with aclosing(driver.stream(**req.stream_args())) as pieces:
        async for item in pieces:
            if "finish" in item:
                tail = stops.flush()
                if tail:
                    yield tail
                yield {"finish_reason": "length" if item["finish"] == "length" else "stop",
                       "prompt_tokens": item["prompt_tokens"], "completion_tokens": item["generated_tokens"]}
                return
            tokens += 1
            text, hit = stops.feed(item["text"])
            if text:
                yield text
            if hit:  # leaving the `async with` closes the driver stream: the request is cancelled
                yield {"finish_reason": "stop", "prompt_tokens": req.prompt_tokens, "completion_tokens": tokens}
                return


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
    """The response objects of one request, in OpenAI's chat or text-completion shape."""

    def __init__(self, req: Completion, model_id: str):
        self.chat, self.model = req.chat, model_id
        self.id = f"{'chatcmpl' if req.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, object_: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def whole(self, text: str, final: dict) -> dict:
        choice = {"index": 0, "logprobs": None, "finish_reason": final["finish_reason"]}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
            return self._envelope("chat.completion", [choice], usage=_usage(final))
        return self._envelope("text_completion", [{"text": text, **choice}], usage=_usage(final))

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False, **extra) -> dict:
        if self.chat:
            delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return self._envelope("chat.completion.chunk", [choice], **extra)
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice], **extra)

    def usage_chunk(self, final: dict) -> dict:
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [], usage=_usage(final))


async def _complete(request: Request, driver, model_id: str, chat: bool) -> Response:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return APIError(400, f"the request body is not valid JSON: {e}").response()
    try:
        req = parse_completion(body, chat, model_id)
        fit_context(driver, req)
    except APIError as e:
        return e.response()
    answer = _Answer(req, model_id)
    pieces = run_completion(driver, req)
    try:
        # Wait for the first piece before answering 200: a full server or a bad request still gets its status.
        first = await _unless_disconnected(request, anext(pieces))
    except asyncio.CancelledError:
        await pieces.aclose()
        return Response(status_code=499)
    except Exception as e:  # noqa: BLE001 - every failure becomes an OpenAI-style error
        await pieces.aclose()
        return _api_error(e).response()
    if req.stream:
        return StreamingResponse(_stream_body(answer, req, first, pieces), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def rest():
        text, item = [], first
        while isinstance(item, str):
            text.append(item)
            item = await anext(pieces)
        return "".join(text), item

    try:
        text, final = await _unless_disconnected(request, rest())
    except asyncio.CancelledError:
        return Response(status_code=499)
    except Exception as e:  # noqa: BLE001
        return _api_error(e).response()
    finally:
        await pieces.aclose()
    return JSONResponse(answer.whole(text, final))


async def _stream_body(answer: _Answer, req: Completion, first, pieces):
    """SSE chunks. On a disconnect Starlette cancels this generator mid-await; `aclosing` then closes `pieces`,
    which closes the driver stream and cancels the request."""
    extra = {"usage": None} if req.include_usage else {}
    async with aclosing(pieces):
        if answer.chat:
            yield _sse(answer.chunk("", role=True, **extra))
        item = first
        try:
            while isinstance(item, str):
                yield _sse(answer.chunk(item, **extra))
                item = await anext(pieces)
        except Exception as e:  # noqa: BLE001 - after the 200 went out an error can only travel in the stream
            yield _sse(_api_error(e).body())
            yield "data: [DONE]\n\n"
            return
        yield _sse(answer.chunk(None if answer.chat else "", item["finish_reason"], **extra))
        if req.include_usage:
            yield _sse(answer.usage_chunk(item))
        yield "data: [DONE]\n\n"


def build_app(driver, api_key: str | None = None) -> FastAPI:
    """The API routes over `driver` (the plain Driver object, running in this event loop)."""
    model_id = driver.settings.model
    created = int(time.time())
    app = FastAPI(title="raytp", docs_url=None, redoc_url=None, openapi_url=None)

    def refused(request: Request) -> Response | None:
        """The 401 answer when an --api-key is set and the request does not carry it."""
        if not api_key:
            return None
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode()):
            return None
        why = "wrong API key" if given else "missing API key: send the header 'Authorization: Bearer KEY'"
        return APIError(401, f"{why} (the server's --api-key)", code="invalid_api_key").response()

    @app.get("/v1/models")
    async def models(request: Request):
        return refused(request) or {"object": "list", "data": [_model_card(driver, model_id, created)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        if refused(request):
            return refused(request)
        if name != model_id:
            return APIError(404, f"The model {name!r} does not exist; this server serves {model_id!r}",
                            param="model", code="model_not_found").response()
        return _model_card(driver, model_id, created)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return refused(request) or await _complete(request, driver, model_id, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return refused(request) or await _complete(request, driver, model_id, chat=False)

    @app.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def unknown(rest: str, request: Request):
        return refused(request) or APIError(404, f"no route {request.method} /v1/{rest}; this server has "
                                            "/v1/chat/completions, /v1/completions and /v1/models",
                                            code="unknown_url").response()

    return app


def _model_card(driver, model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "raytp",
            "max_model_len": driver.settings.max_context}


# ---- the server --------------------------------------------------------------------------------------------

def listen_socket(host: str, port: int) -> socket.socket:
    """A bound socket for host:port, or OSError. Uvicorn's own bind would sys.exit() inside the actor instead."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does; a listening port still fails
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def display_url(host: str, port: int) -> str:
    if host in ("0.0.0.0", "::", ""):  # every interface: show one that others can reach
        try:
            host = socket.gethostbyname(socket.gethostname())
        except OSError:
            pass
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


class HTTPServer:
    """Uvicorn running the API and the web chat as a task of the current event loop."""

    def __init__(self, server, task: asyncio.Task, url: str):
        self.server, self.task, self.url = server, task, url

    @classmethod
    async def start(cls, driver, host: str, port: int, api_key: str | None = None) -> HTTPServer:
        import gradio as gr
        import uvicorn

        from raytp.ui.chat import build_ui

        try:
            sock = listen_socket(host, port)
        except OSError as e:
            raise RequestError(f"cannot listen on {host}:{port}: {e.strerror}; choose another --port") from None
        app = build_app(driver, api_key)
        auth = None
        if api_key:  # the web chat is as protected as the API: any user name, the API key as password
            auth = lambda _user, password: hmac.compare_digest(password.encode(), api_key.encode())  # noqa: E731
        gr.mount_gradio_app(app, build_ui(driver), path="/", auth=auth, footer_links=[],
                            auth_message="Log in with any user name and the server's --api-key as password.")
        config = uvicorn.Config(app, host=host, port=port, loop="none", log_level="warning",
                                timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
        server = uvicorn.Server(config)

        async def serve():
            try:
                await server.serve(sockets=[sock])
            except SystemExit:  # uvicorn exits on startup failures; that must not end the actor's event loop
                raise RuntimeError(f"the HTTP server on {host}:{port} failed to start (see the log)") from None
            finally:
                sock.close()

        task = asyncio.create_task(serve())
        while not server.started:
            if task.done():
                task.result()  # raises why it stopped
                raise RuntimeError(f"the HTTP server on {host}:{port} stopped during startup")
            await asyncio.sleep(0.05)
        return cls(server, task, display_url(host, port))

    @property
    def port(self) -> int:
        return self.server.config.port

    async def stop(self) -> None:
        self.server.should_exit = True
        try:
            await asyncio.wait_for(self.task, SHUTDOWN_GRACE_S + 5)
        except Exception as e:  # noqa: BLE001 - shutting down anyway; say why it was not clean
            log.warning("the HTTP server did not stop cleanly: %s", e)
