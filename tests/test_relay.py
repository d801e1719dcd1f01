"""`raytp serve`'s relay (raytp.serving.relay) against a stand-in for the driver's HTTP server in a process of its own,
which the tests kill with SIGKILL as the driver can die: open API streams end with one error event and [DONE], a
request waiting for its whole answer gets a 503, and the relay otherwise passes requests through as they came."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from raytp.serving.relay import DRIVER_DIED, Relay
from tests.util import free_port

# The stand-in: /v1/completions streams an SSE event every 20 ms until its client goes (then it writes `gone` in its
# directory), /v1/whole never answers, /inspect answers what it was sent.
UPSTREAM = textwrap.dedent("""
    import asyncio, json, sys
    from pathlib import Path
    import uvicorn

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["path"] == "/v1/completions":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            n, gone = 0, asyncio.ensure_future(receive())  # the body is read: the next message is the disconnect
            try:
                while not gone.done():
                    # one event in two writes: the relay must never pass on half an event
                    await send({"type": "http.response.body", "body": b'data: {"n": %d' % n, "more_body": True})
                    await send({"type": "http.response.body", "body": b'}\\n\\n', "more_body": True})
                    n += 1
                    await asyncio.sleep(0.02)
            finally:
                Path(sys.argv[1]).with_name("gone").write_text("gone")
        if scope["path"] == "/v1/whole":
            await asyncio.sleep(3600)
        answer = json.dumps({"client": scope["client"], "method": scope["method"], "path": scope["path"],
                             "query": scope["query_string"].decode(), "body": len(body),
                             "headers": {k.decode(): v.decode() for k, v in scope["headers"]}}).encode()
        await send({"type": "http.response.start", "status": 201, "headers": [
            (b"content-type", b"application/json"), (b"content-length", b"%d" % len(answer))]})
        await send({"type": "http.response.body", "body": answer})

    uvicorn.run(app, uds=sys.argv[1], log_level="warning", forwarded_allow_ips="*", lifespan="off")
""")


@pytest.fixture
def relayed():
    """(relay URL, stand-in process, its directory), the relay open on a free loopback port."""
    port = free_port()
    with Relay("127.0.0.1", port) as relay:
        upstream = subprocess.Popen([sys.executable, "-c", UPSTREAM, relay.upstream])
        try:
            deadline = time.monotonic() + 30
            while not Path(relay.upstream).exists():
                assert upstream.poll() is None and time.monotonic() < deadline, "the stand-in did not start"
                time.sleep(0.05)
            yield relay.open(), upstream, Path(relay.upstream).parent
        finally:
            upstream.kill()
            upstream.wait()


def test_a_killed_upstream_ends_streams_with_an_error_event_and_waiting_answers_with_503(relayed):
    url, upstream, _ = relayed
    with httpx.Client(timeout=30) as http, concurrent.futures.ThreadPoolExecutor(1) as pool:
        whole = pool.submit(http.post, f"{url}v1/whole", json={"model": "m"})
        with http.stream("POST", f"{url}v1/completions", json={"stream": True}) as response:
            lines = response.iter_lines()
            assert json.loads(next(lines).removeprefix("data: ")) == {"n": 0}
            time.sleep(0.3)
            upstream.send_signal(signal.SIGKILL)
            rest = [line for line in lines if line]
        answer = whole.result(timeout=30)
        after = http.post(f"{url}v1/completions", json={"stream": True})
    events = [json.loads(line.removeprefix("data: ")) for line in rest[:-1]]
    assert rest[-1] == "data: [DONE]", rest[-3:]
    assert events[-1] == {"error": {"message": DRIVER_DIED, "type": "server_error", "param": None,
                                    "code": "unavailable"}}, rest[-3:]
    assert [e["n"] for e in events[:-1]] == list(range(1, len(events)))  # whole events only, none lost
    for refused in (answer, after):
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["message"] == DRIVER_DIED


def test_requests_pass_through_as_they_came_from_the_clients_address(relayed):
    url, _, _ = relayed
    body = b"x" * (3 << 20)
    answer = httpx.put(f"{url}inspect/a%20b?q=1&r=%2F", content=body,
                       headers={"X-Forwarded-For": "6.6.6.6", "Authorization": "Bearer k", "Host": "example.org"})
    assert answer.status_code == 201, answer.text
    seen = answer.json()
    assert (seen["method"], seen["path"], seen["query"], seen["body"]) == ("PUT", "/inspect/a b", "q=1&r=%2F",
                                                                           len(body))
    assert seen["client"][0] == "127.0.0.1"  # the relay's word, not the forged header's
    assert seen["headers"]["authorization"] == "Bearer k" and seen["headers"]["host"] == "example.org"

    with socket.create_connection((urlsplit(url).hostname, urlsplit(url).port)) as bare:  # a client of few headers
        bare.sendall(b"GET /inspect HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        reply = b"".join(iter(lambda: bare.recv(65536), b""))
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["headers"] == {"host": "h", "x-forwarded-for": "127.0.0.1"}


def test_a_client_that_goes_away_closes_its_connection_to_the_upstream(relayed):
    """As a client's disconnect cancels its request in the driver."""
    url, _, directory = relayed
    with httpx.Client(timeout=30) as http, http.stream("POST", f"{url}v1/completions") as response:
        assert next(response.iter_lines()).startswith("data: ")
    deadline = time.monotonic() + 10
    while not (directory / "gone").exists():
        assert time.monotonic() < deadline, "the upstream never saw the client go"
        time.sleep(0.05)
