"""Who may use a server started with an API key: every route wants the key, sent as 'Authorization: Bearer KEY' or
as the web chat's session cookie (got by logging in with the key), except what a person needs to reach the login
form (the page, its scripts, styles and fonts) and /health for load balancers' probes. Failed attempts are slowed
per client, so the key cannot be guessed at speed.

The web chat's sessions are Gradio's own (its login page, its cookie names, its table of tokens). `KeyGate` answers
the login POST itself, to take an empty user name and to count failures, and opens the session as Gradio would.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import math
import secrets
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, RedirectResponse, Response

log = logging.getLogger("raytp")

OPEN_PATHS = frozenset({"/", "/health", "/theme.css", "/favicon.ico"})  # GET or HEAD without the key
OPEN_PREFIXES = ("/assets/", "/static/")  # Gradio's own scripts, styles and fonts, which its login form needs
LOGIN_PATHS = frozenset({"/login", "/login/"})  # where the login form posts (its page is "/" without a session)
LOGIN_BODY_MAX_BYTES = 64 << 10  # a user name and a password; more is not a login
DEFAULT_USER = "user"  # the name of a session logged in with an empty user name: only the key matters


# ---- failed attempts -----------------------------------------------------------------------------------------

class TooManyAttempts(Exception):
    """A client's next attempt would wait longer than FailedAttempts.max_wait_s: it is refused without a check."""

    def __init__(self, retry_after_s: float):
        super().__init__(f"too many failed attempts with a wrong API key from this address; try again in "
                         f"{math.ceil(retry_after_s)} s")
        self.retry_after_s = max(1, math.ceil(retry_after_s))


@dataclass
class Attempt:
    ok: bool | None = None  # the key's check, set by the caller; None: the attempt ended before its check


@dataclass
class _Client:
    failures: int = 0        # since its last success (or since its failures were forgotten)
    pending: int = 0         # attempts waiting for or under their check: counted as failures until settled
    next_check: float = 0.0  # when its next attempt may be checked (the limiter's clock)
    last_failure: float = 0.0


class FailedAttempts:
    """How often each client may try a key: a few failures freely, then each further attempt waits for its turn,
    at twice the previous spacing, up to `max_spacing_s` (one guess per 30 s: ~3000 a day per client).

    A client is an IP address, or an IPv6 /64 (which one host may hold whole); clients are not told apart by
    headers such as X-Forwarded-For, which they could forge. Attempts still waiting count as failures when the
    next one is spaced, so sending guesses in parallel gains nothing. Waiting is an asyncio sleep of that request
    alone: other clients and the event loop go on. An attempt whose turn is more than `max_wait_s` away is refused
    at once (429) instead, so a flood of guesses holds no connections open.
    """

    def __init__(self, free: int = 5, first_spacing_s: float = 0.5, max_spacing_s: float = 30.0,
                 max_wait_s: float = 60.0, forget_s: float = 900.0, max_clients: int = 10_000,
                 clock: Callable[[], float] = time.monotonic):
        self.free = free                        # a person mistyping the key a few times is not slowed
        self.first_spacing_s = first_spacing_s
        self.max_spacing_s = max_spacing_s
        self.max_wait_s = max_wait_s
        self.forget_s = forget_s                # a client's failures are forgotten after this long without one
        self.max_clients = max_clients          # clients remembered; the one quiet longest is forgotten first
        self.clock = clock
        self.delayed = 0                        # attempts that waited for their turn, since the start
        self.refused = 0                        # attempts refused at once (TooManyAttempts), since the start
        self._clients: OrderedDict[str, _Client] = OrderedDict()

    def spacing_s(self, tries: int) -> float:
        """The wait before a client's attempt number `tries` (from 0, counted since its last success)."""
        if tries < self.free:
            return 0.0
        return min(self.first_spacing_s * 2.0 ** min(tries - self.free, 64), self.max_spacing_s)

    def wait_s(self, client: str) -> float:
        """How long `client`'s next attempt would wait for its turn."""
        state = self._clients.get(client)
        return max(0.0, state.next_check - self.clock()) if state else 0.0

    @asynccontextmanager
    async def attempt(self, client: str):
        """Wait for `client`'s turn to have a key checked; yields an Attempt whose `ok` the caller sets to the
        check's outcome. Raises TooManyAttempts when the turn is more than max_wait_s away."""
        now = self.clock()
        state = self._state(client, now)
        start = max(now, state.next_check)
        if start - now > self.max_wait_s:
            self.refused += 1
            raise TooManyAttempts(start - now - self.max_wait_s)
        state.next_check = start + self.spacing_s(state.failures + state.pending + 1)
        state.pending += 1
        attempt = Attempt()
        try:
            if start > now:
                self.delayed += 1
                await asyncio.sleep(start - now)
            yield attempt
        finally:
            self._settle(client, state, attempt.ok)

    def _state(self, client: str, now: float) -> _Client:
        state = self._clients.get(client)
        if state is None:
            state = self._clients[client] = _Client()
            while len(self._clients) > self.max_clients:
                self._clients.popitem(last=False)
        elif state.failures and not state.pending and now - state.last_failure > self.forget_s:
            state.failures = 0
        return state

    def _settle(self, client: str, state: _Client, ok: bool | None) -> None:
        state.pending -= 1
        now = self.clock()
        if ok is False:
            state.failures += 1
            state.last_failure = now
            if client in self._clients:
                self._clients.move_to_end(client)
            if state.failures == self.free:
                log.warning("%d failed attempts with a wrong API key from %s: its further attempts are slowed",
                            state.failures, client)
        elif ok:
            state.failures = 0
            if not state.pending:  # nothing else in its queue: its next attempt need not wait
                state.next_check = min(state.next_check, now)
        if not state.failures and not state.pending and state.next_check <= now \
                and self._clients.get(client) is state:
            del self._clients[client]  # only clients with something to remember are kept


def client_of(scope: Mapping[str, Any]) -> str:
    """Who sent a request, as FailedAttempts counts clients: its IP address, or its IPv6 /64."""
    host = (scope.get("client") or ("unknown", 0))[0]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.version == 6:
        if address.ipv4_mapped:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


# ---- the web chat's sessions -----------------------------------------------------------------------------------

class WebSessions:
    """The web chat's login sessions where Gradio looks them up: a random token in its App's `tokens` table, sent
    back as two cookies (a Secure one for HTTPS, one for plain HTTP), as Gradio's own /login issues them."""

    def __init__(self, gradio_app):
        self.gradio_app = gradio_app
        self.cookie_names = (f"access-token-{gradio_app.cookie_id}", f"access-token-unsecure-{gradio_app.cookie_id}")

    def valid(self, cookies: Mapping[str, str]) -> bool:
        return any(cookies.get(name) in self.gradio_app.tokens for name in self.cookie_names)

    def open(self, response: Response, user: str) -> None:
        token = secrets.token_urlsafe(32)
        self.gradio_app.tokens[token] = user
        secure, plain = self.cookie_names
        response.set_cookie(secure, token, httponly=True, samesite="none", secure=True)
        response.set_cookie(plain, token, httponly=True)


# ---- the gate ----------------------------------------------------------------------------------------------------

class _BodyTooLarge(Exception):
    pass


def _error(status: int, message: str, code: str, headers: dict | None = None) -> JSONResponse:
    """An OpenAI-style error, as the API's other errors are: logged on one line with a request id, also sent as
    X-Request-Id."""
    request_id = f"req-{secrets.token_hex(16)}"
    log.info("request %s: %d %s", request_id, status, message)
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}},
                        status_code=status, headers={**(headers or {}), "X-Request-Id": request_id})


def _too_many(e: TooManyAttempts) -> JSONResponse:
    return _error(429, str(e), "too_many_failed_attempts", {"Retry-After": str(e.retry_after_s)})


def _is_open(method: str, path: str) -> bool:
    return method in ("GET", "HEAD") and (path in OPEN_PATHS or path.startswith(OPEN_PREFIXES))


class KeyGate:
    """ASGI middleware in front of every route (the API's and the mounted web chat's): a request passes with the
    key as a bearer token or with a web-chat session; without either, the login page's own paths pass, a browser
    asking for a page is sent to the login form, and anything else gets 401. Websockets are held to the same."""

    def __init__(self, app, key: str, sessions: WebSessions | None, attempts: FailedAttempts):
        self.app, self.key, self.sessions, self.attempts = app, key.encode(), sessions, attempts

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        method, path = scope.get("method", "GET"), scope["path"]
        if scope["type"] == "http" and method == "POST" and path in LOGIN_PATHS and self.sessions:
            response = await self._login(scope, receive)
            await response(scope, receive, send)
            return
        if (scope["type"] == "http" and _is_open(method, path)) or \
                (self.sessions and self.sessions.valid(HTTPConnection(scope).cookies)):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        given = headers.get("authorization")
        if given is None:
            await self._refuse(scope, headers, "missing API key: send the header 'Authorization: Bearer KEY'")(
                scope, receive, send)
            return
        scheme, _, token = given.partition(" ")
        try:
            async with self.attempts.attempt(client_of(scope)) as attempt:
                attempt.ok = scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key)
        except TooManyAttempts as e:
            await self._deny(scope, _too_many(e))(scope, receive, send)
            return
        if attempt.ok:
            await self.app(scope, receive, send)
        else:
            await self._refuse(scope, headers, "wrong API key")(scope, receive, send)

    def _refuse(self, scope, headers: Headers, why: str):
        """A request without a valid key: a person's browser goes to the login form, a program gets 401."""
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD") and "text/html" in headers.get("accept", ""):
            return RedirectResponse("/", status_code=303)
        return self._deny(scope, _error(401, f"{why} (the server's --api-key)", "invalid_api_key",
                                        {"WWW-Authenticate": "Bearer"}))

    @staticmethod
    def _deny(scope, response: Response):
        if scope["type"] == "websocket":
            async def close(_scope, _receive, send):  # closed before the handshake: the client sees 403
                await send({"type": "websocket.close", "code": 1008})
            return close
        return response

    async def _login(self, scope, receive) -> Response:
        """The login form's POST: the key as password opens a web-chat session; any user name, or none."""
        try:
            form = await Request(scope, _bounded(receive, LOGIN_BODY_MAX_BYTES)).form(max_files=0, max_fields=8)
        except _BodyTooLarge:
            return _error(413, f"a login body holds a user name and a password; this one has more than "
                               f"{LOGIN_BODY_MAX_BYTES} bytes", "body_too_large")
        except (MultiPartException, HTTPException) as e:
            return _error(400, f"the login form could not be read: {getattr(e, 'detail', e)}", "bad_form")
        password, user = form.get("password"), form.get("username")
        try:
            async with self.attempts.attempt(client_of(scope)) as attempt:
                attempt.ok = isinstance(password, str) and hmac.compare_digest(
                    password.encode("utf-8", "surrogatepass"), self.key)
        except TooManyAttempts as e:
            return _too_many(e)
        if not attempt.ok:  # Gradio's answer, which its login form shows as "Incorrect credentials"
            return JSONResponse({"detail": "Incorrect credentials."}, status_code=400)
        response = JSONResponse({"success": True})
        self.sessions.open(response, (user.strip() if isinstance(user, str) else "") or DEFAULT_USER)
        return response


def _bounded(receive, limit: int):
    """`receive` that raises _BodyTooLarge once the body passes `limit` bytes."""
    seen = 0

    async def bounded():
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise _BodyTooLarge
        return message
    return bounded
