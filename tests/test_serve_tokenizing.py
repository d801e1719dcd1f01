"""A request that takes seconds to tokenize stalls no other: prompts are tokenized in child processes, never in the
event loop that streams every request's tokens.

The server here holds a context of 65536 tokens, so a 4 MB chat message is under the character bound (65536 x the
longest token's 81 characters) and must really be tokenized (4 MB of digits: seconds of work) before it is refused
for not fitting. A stream runs meanwhile; the check is an ordering: stream tokens arrive after the big request was
sent and before its refusal came back (while tokenizing in the event loop, none could).
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from tests.test_serve import next_event
from tests.util import running_server

pytestmark = pytest.mark.slow

MAX_CONTEXT = 65536


@pytest.fixture(scope="module")
def server(ray_head, smollm2_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with running_server(log, "--max-context", str(MAX_CONTEXT), "--max-batch", "2", "--kv-dtype", "fp8",
                        "--address", ray_head.address) as (_, url):
        yield url


def test_a_stream_keeps_its_tokens_while_a_4mb_message_is_tokenized_and_refused(server):
    body = {"model": "smollm2", "prompt": "Count: 1, 2, 3,", "max_tokens": 4000, "temperature": 0,
            "ignore_eos": True, "stream": True}
    digits = "".join(str(i % 10) for i in range(4_000_000))  # one token per digit: 4 million tokens of work
    big = json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": digits}], "max_tokens": 1})
    order: list[str] = []  # "token" per streamed chunk, "sent" and "refused" for the big request, in arrival order
    lock = threading.Lock()

    def note(what: str) -> None:
        with lock:
            order.append(what)

    refusal: list[httpx.Response] = []

    def send_big():
        with httpx.Client(timeout=120) as http:
            note("sent")
            refusal.append(http.post(f"{server}/v1/chat/completions", content=big,
                                     headers={"Content-Type": "application/json"}))
            note("refused")

    with httpx.Client(timeout=120) as http, http.stream("POST", f"{server}/v1/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        lines = response.iter_lines()
        next_event(lines)  # the stream is under way
        sender = threading.Thread(target=send_big)
        sender.start()
        for line in lines:
            if line.startswith("data: {"):
                note("token")
            if "refused" in order and order[order.index("refused"):].count("token") >= 3:
                break  # the stream goes on after the refusal too
        sender.join()
    assert refusal and refusal[0].status_code == 400, refusal and refusal[0].text
    error = refusal[0].json()["error"]
    assert error["param"] == "messages" and error["code"] == "context_length_exceeded", error
    during = order[order.index("sent"):order.index("refused")].count("token")
    assert during >= 3, f"only {during} stream tokens arrived while the 4 MB message was being tokenized: {order}"
