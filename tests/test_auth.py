"""A server with an API key, in process (the app `raytp serve` runs, over a stand-in driver; no Ray): every route
the app exposes, the API's and the mounted web chat's, refuses a request without the key, except the login form's
own paths and /health; the key opens the API as a bearer token and the web chat as a password, with any user name
or none; failed attempts are slowed per client without slowing anyone else."""

from __future__ import annotations

import asyncio
import re
import types
from pathlib import Path

import httpx
import pytest
from starlette.routing import Mount

from raytp.serving.auth import FailedAttempts, client_of
from raytp.serving.openai_api import build_app
from raytp.weights.generation_defaults import SamplingDefaults

KEY = "sk-raytp-auth-test"
# What answers without the key: the login form (Gradio's page at "/" without a session, its scripts, styles and
# fonts, and where it posts) and the probes' /health.
OPEN = {("GET", "/"), ("HEAD", "/"), ("GET", "/health"), ("GET", "/theme.css"), ("GET", "/favicon.ico"),
        ("GET", "/assets/{path:path}"), ("GET", "/static/{path:path}"), ("POST", "/login"), ("POST", "/login/")}


class StandInDriver:
    """What build_app and the web chat read of a Driver before any request runs."""

    settings = types.SimpleNamespace(model="smollm2", max_context=64)
    devices = ["cpu@1GiB"]
    sampling_defaults = SamplingDefaults()  # no generation_config.json: greedy

    def unavailable(self):
        return None

    async def health(self):
        return None  # every rank answered


def exposed(routes, prefix: str = ""):
    """(method, path pattern) of every route under `routes`, through mounted apps and included routers."""
    for route in routes:
        if isinstance(route, Mount):
            yield from exposed(route.routes, prefix + route.path)
        elif hasattr(route, "original_router"):  # FastAPI keeps an included router whole, with its prefix
            yield from exposed(route.original_router.routes, prefix + route.include_context.prefix)
        else:
            for method in getattr(route, "methods", None) or ["WEBSOCKET"]:
                yield method, prefix + route.path


@pytest.fixture(scope="module")
def app():
    return build_app(StandInDriver(), KEY)


def client(app, ip: str, **kwargs) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(ip, 40000)), base_url="http://raytp",
                             **kwargs)


async def ask(http: httpx.AsyncClient, method: str, path: str, **kwargs) -> httpx.Response:
    # a route let through by mistake may stream forever (Gradio's heartbeat did): fail, do not hang
    return await asyncio.wait_for(http.request(method, path, **kwargs), timeout=30)


def test_every_route_wants_the_key(app):
    routes = sorted(set(exposed(app.routes)))
    assert len(routes) > 80 and ("GET", "/gradio_api/heartbeat/{session_hash}") in routes
    assert "WEBSOCKET" not in {method for method, _ in routes}  # none to test; KeyGate would close them unopened
    assert OPEN <= set(routes)

    async def run():
        answers = {}
        async with client(app, "10.0.0.1") as http:
            for method, pattern in routes:
                if (method, pattern) in OPEN:
                    continue
                path = re.sub(r"\{[^}]*\}", "x", pattern)
                response = await ask(http, method, path, headers={"Accept": "application/json"})
                answers[method, pattern] = response.status_code
                if response.status_code == 401 and method != "HEAD":
                    assert response.json()["error"]["code"] == "invalid_api_key", (method, path)
            # a person's browser asking for a page is sent to the login form instead
            page = await ask(http, "GET", "/monitoring", headers={"Accept": "text/html"})
            assert (page.status_code, page.headers["location"]) == (303, "/")
        return answers

    answers = asyncio.run(run())
    assert set(answers.values()) == {401}, {route: status for route, status in answers.items() if status != 401}


def test_the_login_form_and_health_answer_without_the_key(app):
    async def run():
        async with client(app, "10.0.0.2") as http:
            page = await ask(http, "GET", "/")
            assert page.status_code == 200 and '"auth_required":true' in page.text  # the login form, nothing else
            assert "the user name may stay empty" in page.text
            health = await ask(http, "GET", "/health")
            assert health.status_code == 200 and health.json()["status"] == "ok"
            assert (await ask(http, "GET", "/openapi.json")).status_code == 401

    asyncio.run(run())


def test_gradio_stays_out_of_the_openapi_schema():
    async def run():
        async with client(build_app(StandInDriver()), "10.0.0.3") as http:
            return await ask(http, "GET", "/openapi.json")

    assert asyncio.run(run()).status_code == 404


@pytest.mark.parametrize("user", ["", "  ", "alice"])
def test_logging_in_with_the_key_opens_the_web_chat(app, user):
    async def run():
        async with client(app, "10.0.0.4") as http:
            assert (await ask(http, "GET", "/config")).status_code == 401
            wrong = await ask(http, "POST", "/login", files={"username": (None, user), "password": (None, "nope")})
            assert wrong.status_code == 400 and wrong.json()["detail"] == "Incorrect credentials."
            assert not http.cookies
            # as the login form posts it (multipart), an empty user name included
            login = await ask(http, "POST", "/login", files={"username": (None, user), "password": (None, KEY)})
            assert login.status_code == 200 and login.json() == {"success": True}
            config = await ask(http, "GET", "/config")
            assert config.status_code == 200 and config.json()["components"], config.text
            assert config.json()["username"] == (user.strip() or "user")
            page = await ask(http, "GET", "/")
            assert '"auth_required":true' not in page.text
            # the session opens the web chat's routes, never the key itself: the API wants the bearer token
            assert (await ask(http, "GET", "/gradio_api/login_check")).status_code == 200

    asyncio.run(run())


def test_the_key_as_bearer_token_opens_the_api(app):
    async def run():
        async with client(app, "10.0.0.5") as http:
            ok = await ask(http, "GET", "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
            assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "smollm2"
            wrong = await ask(http, "GET", "/v1/models", headers={"Authorization": "Bearer sk-wrong"})
            assert wrong.status_code == 401 and "wrong API key" in wrong.json()["error"]["message"]
            missing = await ask(http, "GET", "/v1/models")
            assert missing.status_code == 401 and "Authorization: Bearer KEY" in missing.json()["error"]["message"]

    asyncio.run(run())


def test_failed_attempts_are_slowed_for_that_client_alone(app):
    attempts: FailedAttempts = app.state.failed_attempts
    attempts.first_spacing_s, attempts.max_spacing_s = 0.02, 0.08  # the defaults' shape, sooner
    wrong = {"Authorization": "Bearer sk-guess"}
    right = {"Authorization": f"Bearer {KEY}"}
    guesser, other = "10.0.0.6", "10.0.0.7"

    async def run():
        async with client(app, guesser) as http, client(app, other) as bystander:
            delayed = attempts.delayed
            for _ in range(attempts.free):  # a few mistakes cost nothing
                assert (await ask(http, "GET", "/v1/models", headers=wrong)).status_code == 401
            assert attempts.delayed == delayed
            waits = []
            for _ in range(4):  # then each further attempt waits for its turn, twice as long each time, up to a cap
                waits.append(attempts.wait_s(guesser))
                assert (await ask(http, "POST", "/login", files={"password": (None, "guess")})).status_code == 400
            assert attempts.delayed == delayed + 4
            spacing = [attempts.spacing_s(attempts.free + i) for i in range(5)]
            assert spacing == [0.02, 0.04, 0.08, 0.08, 0.08]
            assert waits[0] > 0 and all(w <= s for w, s in zip(waits, spacing))
            # another client is not slowed, with or without the right key
            assert (await ask(bystander, "GET", "/v1/models", headers=wrong)).status_code == 401
            assert (await ask(bystander, "GET", "/v1/models", headers=right)).status_code == 200
            assert attempts.delayed == delayed + 4 and attempts.wait_s(other) == 0
            # guesses sent in parallel are spaced all the same; past max_wait_s they are refused without a check
            attempts.max_wait_s = 0.2
            refused = attempts.refused
            flood = await asyncio.gather(*(ask(http, "GET", "/v1/models", headers=wrong) for _ in range(12)))
            statuses = [r.status_code for r in flood]
            assert set(statuses) == {401, 429} and statuses.count(401) <= 4, statuses
            assert attempts.refused == refused + statuses.count(429)
            too_many = next(r for r in flood if r.status_code == 429)
            assert int(too_many.headers["Retry-After"]) >= 1
            assert too_many.json()["error"]["code"] == "too_many_failed_attempts"
            # the right key still opens, in its turn, and the client starts afresh
            await asyncio.sleep(attempts.wait_s(guesser))
            assert (await ask(http, "GET", "/v1/models", headers=right)).status_code == 200
            assert attempts.wait_s(guesser) == 0 and guesser not in attempts._clients

    asyncio.run(run())


def test_failed_attempts_forgotten_and_bounded():
    now = [0.0]
    attempts = FailedAttempts(free=1, first_spacing_s=0.0, forget_s=10, max_clients=3, clock=lambda: now[0])

    async def fail(client: str):
        async with attempts.attempt(client) as attempt:
            attempt.ok = False

    async def run():
        for client in ("a", "b", "c", "d"):
            await fail(client)
        assert list(attempts._clients) == ["b", "c", "d"]  # the one quiet longest is forgotten first
        await fail("b")
        assert attempts._clients["b"].failures == 2 and list(attempts._clients) == ["c", "d", "b"]
        now[0] = 11.0
        await fail("b")
        assert attempts._clients["b"].failures == 1  # forgotten after forget_s without a failure

    asyncio.run(run())
    assert FailedAttempts().spacing_s(10_000) == FailedAttempts().max_spacing_s  # no overflow, however many


@pytest.mark.parametrize("host, client", [("192.0.2.7", "192.0.2.7"), ("2001:db8::1", "2001:db8::/64"),
                                          ("2001:db8::ffff:1", "2001:db8::/64"), ("::ffff:192.0.2.7", "192.0.2.7")])
def test_clients_are_addresses_or_ipv6_64s(host, client):
    assert client_of({"client": (host, 1)}) == client


@pytest.mark.slow
def test_the_login_form_takes_the_key_with_an_empty_user_name(tmp_path):
    """In a real browser (as tests/test_browser.py drives one): a wrong key says so; the key alone opens the chat."""
    import threading

    import uvicorn

    from tests.test_browser import CHROMIUM, CHROMIUM_ARGS
    from tests.util import free_port

    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(StandInDriver(), KEY), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            page.locator("input[type=password]").fill("sk-wrong")
            page.get_by_role("button", name="Login").click()
            page.get_by_text("Incorrect Credentials", exact=False).wait_for()
            assert "the user name may stay empty" in page.inner_text("body")
            page.locator("input[type=password]").fill(KEY)
            page.get_by_role("button", name="Login").click()
            page.wait_for_selector("#raytp-input textarea, #raytp-input input")
            browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=30)
