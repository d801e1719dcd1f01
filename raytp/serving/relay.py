"""`raytp serve`'s front door: the process that holds the clients' connections is not the one that can die with the
token loop.

`raytp serve` listens on --host:--port itself and relays each request, as it came, to the driver actor's HTTP server,
which listens on a Unix socket in a directory only this user can enter (nothing else listens on the network). The
driver's server does all the work (the key, the limits, the API, the web chat); the relay only adds the client's
address (X-Forwarded-For, which the driver's server trusts on that socket alone) and streams the bytes both ways, in
a thread of the `serve` process: no Ray call, per token or per request.

When the driver dies (killed, out of memory, crashed), its socket closes under every open request. The relay then
ends each one as the API promises: a request still waiting for its answer gets a 503 JSON error, an API stream gets
one `error` event and `data: [DONE]`; then `serve` exits, as it does whenever its driver is gone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile
import threading

import httpx

from raytp.serving.sockets import display_url, listen_socket

log = logging.getLogger("raytp")

DRIVER_DIED = ("raytp serve's driver actor died (killed, crashed or out of memory): the request was not finished; "
               "serve is exiting")
STOP_GRACE_S = 2.0  # after the driver's server is gone every relayed request ends at once; this bounds a slow client
START_TIMEOUT_S = 30.0
# Request headers that belong to one hop; the client's own X-Forwarded-* are dropped too: the relay says who it is
REQUEST_HOP_HEADERS = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                                 b"transfer-encoding", b"upgrade", b"expect", b"x-forwarded-for",
                                 b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"})
RESPONSE_HOP_HEADERS = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"trailer"})


class Relay:
    """Holds --host:--port from its creation (bound, not yet listening: the port is not taken while the model
    loads), relays to `upstream` (the driver's Unix socket) once `open`ed, and stops in `close`."""

    def __init__(self, host: str, port: int):
        self._sock = listen_socket(host, port)
        self._directory = tempfile.mkdtemp(prefix="raytp-serve-")  # mode 0700: no other user reaches the driver
        self.upstream = os.path.join(self._directory, "driver.sock")
        self.url = display_url(host, port)
        self.gone = DRIVER_DIED  # what requests are told once the driver's server is unreachable
        self._server = None
        self._client: httpx.AsyncClient | None = None
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def open(self) -> str:
        """Start listening and relaying (the driver's server must be up); returns the URL."""
        import uvicorn

        config = uvicorn.Config(self._app, interface="asgi3", loop="asyncio", ws="none", lifespan="off",
                                log_level="warning", proxy_headers=False, server_header=False, date_header=False,
                                timeout_graceful_shutdown=STOP_GRACE_S)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="raytp-relay", daemon=True)
        self._thread.start()
        waited = 0.0
        while not self._server.started:
            if not self._thread.is_alive() or waited > START_TIMEOUT_S:
                raise RuntimeError(f"the HTTP server on {self.url} did not start: {self._failure or 'timed out'}")
            self._thread.join(0.05)
            waited += 0.05
        return self.url

    def close(self) -> None:
        """Stop listening; requests still open get STOP_GRACE_S to end. Idempotent."""
        if self._thread is not None:
            self._server.should_exit = True
            self._thread.join(STOP_GRACE_S + 5)
            self._thread = None
        self._sock.close()
        shutil.rmtree(self._directory, ignore_errors=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:  # noqa: BLE001 - reported by `open`, which waits for the start
            self._failure = e
            if self._server.started:
                log.error("the HTTP server stopped: %s", e)

    async def _serve(self) -> None:
        # no pool limit: a limit would make one client's requests wait for another's; no read timeout: an answer
        # may take as long as it takes (a client that gives up disconnects)
        transport = httpx.AsyncHTTPTransport(uds=self.upstream, limits=httpx.Limits(max_connections=None))
        async with httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(None, connect=10)) as client:
            self._client = client
            await self._server.serve(sockets=[self._sock])

    # ---- one request ----------------------------------------------------------------------------------------

    async def _app(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        body_read = asyncio.Event()
        relay = asyncio.ensure_future(self._relay(scope, receive, send, body_read))
        gone = asyncio.ensure_future(_until_disconnected(receive, body_read))
        try:
            await asyncio.wait({relay, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            relay.cancel()  # the client left: closing the driver's connection cancels its request there
            await asyncio.wait({relay, gone})
        if not relay.cancelled() and relay.exception() is not None:
            raise relay.exception()

    async def _relay(self, scope, receive, send, body_read: asyncio.Event) -> None:
        headers = [(k, v) for k, v in scope["headers"] if k not in REQUEST_HOP_HEADERS]
        if scope.get("client"):
            headers.append((b"x-forwarded-for", scope["client"][0].encode()))
        with_body = any(k in (b"content-length", b"transfer-encoding") for k, _ in scope["headers"])
        if not with_body:
            body_read.set()
        path, query = scope.get("raw_path") or scope["path"].encode(), scope.get("query_string")
        url = httpx.URL(scheme="http", host="raytp", raw_path=path + b"?" + query if query else path)
        # a Request of its own, not the client's build_request, which would add httpx's default headers (an
        # Accept-Encoding the client never sent would have the answer compressed)
        request = httpx.Request(scope["method"], url, headers=headers,
                                content=_body(receive, body_read) if with_body else None)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError:  # the driver's server is gone: nothing was answered yet
            await _send_json(send, 503, self._gone_error())
            return
        try:
            await self._relay_response(scope, response, send)
        finally:
            await response.aclose()

    async def _relay_response(self, scope, response: httpx.Response, send) -> None:
        events = scope["path"].startswith("/v1/") and \
            response.headers.get("content-type", "").startswith("text/event-stream")
        await send({"type": "http.response.start", "status": response.status_code,
                    "headers": [(k, v) for k, v in response.headers.raw if k.lower() not in RESPONSE_HOP_HEADERS]})
        pending = b""  # an API stream's bytes after its last whole event: an event goes out whole or not at all
        try:
            async for chunk in response.aiter_raw():
                if events:
                    pending += chunk
                    cut = pending.rfind(b"\n\n") + 2 if b"\n\n" in pending else 0
                    chunk, pending = pending[:cut], pending[cut:]
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except httpx.HTTPError:
            if not events:
                return  # cut: the client sees the connection end before the body does
            pending = f"data: {json.dumps(self._gone_error())}\n\ndata: [DONE]\n\n".encode()
        await send({"type": "http.response.body", "body": pending, "more_body": False})

    def _gone_error(self) -> dict:
        """The API's error body (raytp.serving.openai_api.APIError's shape) saying why the request was not finished."""
        return {"error": {"message": self.gone, "type": "server_error", "param": None, "code": "unavailable"}}


async def _body(receive, body_read: asyncio.Event):
    """The client's request body as it arrives."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise asyncio.CancelledError("the client disconnected")
        if message.get("body"):
            yield message["body"]
        if not message.get("more_body"):
            break
    body_read.set()


async def _until_disconnected(receive, body_read: asyncio.Event) -> None:
    """Returns when the client goes away (once its body is read, the next message is the disconnect)."""
    await body_read.wait()
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
