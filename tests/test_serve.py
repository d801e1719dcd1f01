"""`raytp serve` end to end: one real server (2 CPU ranks, SmolLM2, float32) driven by the official openai client.

Greedy answers must equal `raytp generate`'s, alone or with 8 clients batched together; bad requests get
OpenAI-style errors and leave the server serving; a full server answers 429, and a client that hangs up frees its
batch slot.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import openai
import pytest
import transformers

from raytp.runtime.errors import RequestError
from raytp.runtime.requests import StopScanner
from raytp.serving.openai_api import APIError, parse_completion
from raytp.runtime.sampling import SamplingParams
from raytp.weights.source import ModelSource
from raytp.weights.tokenizer import Tokenizer
from tests.util import RAYTP_ENV, SERVED_API_KEY, SERVED_DEVICES, raytp_command

DEVICES = SERVED_DEVICES
MAX_BATCH = 8
API_KEY = SERVED_API_KEY
QUESTION = "What is the capital of France? Answer in one sentence."
REFERENCE_TOKENS = 24
# Eight different requests for the batching test: (chat question, max_tokens).
REQUESTS = [("Name three colors.", 8), ("What is 2 + 2?", 12), ("Say hello in French.", 16),
            ("Name a large animal.", 10), ("What is the sun?", 14), ("Give me a fruit.", 20),
            ("What is water made of?", 6), ("Name a planet.", 11)]


# ---- no server -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stops, pieces, want", [
    ([], ["Hello", " world"], ("Hello world", False)),
    (["."], ["Paris", ". The", " end"], ("Paris", True)),
    (["\n\n"], ["one\n", "\ntwo"], ("one", True)),  # the stop string spans two pieces
    (["STOP"], ["a ST", "OP b"], ("a ", True)),
    (["STOP"], ["a ST", "ART b"], ("a START b", False)),  # held back, then released: not a stop after all
])
def test_stop_scanner(stops, pieces, want):
    scanner = StopScanner(stops)
    out, hit = "", False
    for piece in pieces:
        text, hit = scanner.feed(piece)
        out += text
        if hit:
            break
    if not hit:
        out += scanner.flush()
    assert (out, hit) == want


@pytest.mark.parametrize("body, status, param", [
    ({"model": "other", "prompt": "x"}, 404, "model"),
    ({"prompt": "x"}, 400, "model"),
    ({"model": "m", "prompt": "x", "temperature": -0.1}, 400, "temperature"),
    ({"model": "m", "prompt": "x", "max_tokens": True}, 400, "max_tokens"),  # JSON true is not a number
    ({"model": "m", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "m", "prompt": ["a", "b"]}, 400, "prompt"),
    ({"model": "m", "prompt": "x", "stop": 3}, 400, "stop"),
])
def test_parse_completion_rejects(body, status, param):
    with pytest.raises(APIError) as e:
        parse_completion(body, chat=False, model_id="m")
    assert (e.value.status, e.value.param) == (status, param)


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
DEEP = "[" * 100000 + "]" * 100000


@pytest.mark.parametrize("body, param", [
    # a call sent back with arguments nested 100000 deep (as a string: the body itself is shallow)
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "get_weather", "arguments": DEEP}}]}, {"role": "user", "content": "hi"}]}, "messages"),
    # a lone surrogate in a tool's parameters, which the template and the grammar would read
    ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required", "tools": [{
        "type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
            "\ud800": {"type": "string"}}}}}]}, "tools"),
])
def test_bodies_that_would_fail_later_are_refused_at_parse(body, param):
    with pytest.raises(APIError) as e:
        parse_completion({"model": "m", **body}, chat=True, model_id="m")
    assert (e.value.status, e.value.param) == (400, param), e.value.message


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {
        "type": "integer", "maximum": 10**30}}}}, "response_format"),
    ({"tool_choice": "required", "tools": [{**WEATHER_TOOL, "function": {**WEATHER_TOOL["function"], "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": -(10**30)}}}}}]}, "tools"),
])
def test_a_schema_llguidance_cannot_take_in_is_a_request_error_naming_the_field(body, param):
    """An integer beyond 64 bits in a schema: llguidance refuses it with a ValueError, which must reach the client
    as a 400 naming the field (the API turns RequestError into one), not a 500."""
    req = parse_completion({"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}, chat=True,
                           model_id="m")
    with pytest.raises(RequestError) as e:
        req.sampling()
    assert e.value.param == param and "cannot be used" in str(e.value), e.value


def test_parse_completion_accepts_openai_shapes():
    req = parse_completion({"model": "m", "messages": [{"role": "developer", "content": [{"type": "text", "text": "a"},
                            {"type": "text", "text": "b"}]}, {"role": "user", "content": "hi"}],
                            "max_completion_tokens": 5, "temperature": 0, "stop": "\n", "seed": 3,
                            "stream": True, "stream_options": {"include_usage": True}}, chat=True, model_id="m")
    assert [m.as_template_input() for m in req.messages] == [{"role": "system", "content": "ab"},
                                                             {"role": "user", "content": "hi"}]
    assert req.sampling() == SamplingParams(temperature=0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=3,
                                            max_tokens=5)
    assert (req.stop, req.stream, req.stream_options.include_usage) == (["\n"], True, True)
    assert parse_completion({"model": "m", "prompt": [[1, 2, 3]]}, chat=False, model_id="m").prompt == [1, 2, 3]


# ---- one real server ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference_run(ray_head, tmp_path_factory):
    """`raytp generate --json` for QUESTION on the session's Ray head, started first so that its startup overlaps
    the server's.

    Same devices, dtype and --max-batch as the server: the same plan, so the same arithmetic in every rank."""
    log = tmp_path_factory.mktemp("generate") / "stderr.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(raytp_command("generate", "--json", "--chat", "--prompt", QUESTION, "--temperature",
                                              "0", "--dtype", "float32", "--devices", DEVICES, "--max-batch",
                                              str(MAX_BATCH), "--max-tokens", str(REFERENCE_TOKENS),
                                              "--address", ray_head.address),
                                stdout=subprocess.PIPE, stderr=err, text=True, env=RAYTP_ENV)
    yield proc, log
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server(reference_run, shared_server):
    """The run's shared server (tests/conftest.py), after the reference's start: --max-queue 0 makes busy cheap to
    test."""
    _, url = shared_server
    return url


@pytest.fixture(scope="module")
def reference(reference_run) -> dict:
    proc, log = reference_run
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, Path(log).read_text()[-3000:]
    return json.loads(out)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def chat(client, question: str, max_tokens: int, **kw):
    return client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": question}],
                                          max_tokens=max_tokens, temperature=0, **kw)


@pytest.mark.slow
def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["smollm2"]


def scrape(server: str) -> dict:
    """/metrics parsed by prometheus-client's own parser: {(sample name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(f"{server}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain"), response.text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


@pytest.mark.slow
def test_metrics_count_a_request_and_health_says_ok(server):
    before = scrape(server)
    response = post(server, "completions", {**GOOD, "max_tokens": 5, "ignore_eos": True})
    assert response.status_code == 200, response.text
    prompt_tokens = response.json()["usage"]["prompt_tokens"]
    after = scrape(server)

    def delta(name, labels=()):
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    assert delta("raytp_generation_tokens_total") == 5
    assert delta("raytp_prompt_tokens_total") == prompt_tokens
    assert delta("raytp_time_to_first_token_seconds_count") == 1
    assert delta("raytp_inter_token_latency_seconds_count") == 4  # between 5 tokens
    assert after[("raytp_requests_running", ())] == after[("raytp_requests_waiting", ())] == 0
    assert after[("raytp_rebuilds_total", ())] == 0
    for rank, device in enumerate(DEVICES.split(",")):
        labels = (("device", device), ("rank", str(rank)))
        assert delta("raytp_rank_step_seconds_count", labels) >= 5, after  # a step per token, at least
        assert after[("raytp_rank_step_seconds_sum", labels)] > 0
    assert httpx.get(f"{server}/metrics", timeout=10).status_code == 401  # behind the API key, as /v1 is
    health = httpx.get(f"{server}/health", timeout=10)  # not: load balancers probe it
    assert health.status_code == 200 and health.json()["status"] == "ok", health.text


@pytest.mark.slow
def test_a_speculating_request_answers_as_a_plain_one_and_metrics_count_its_drafts(client, server):
    """The openai client's extra_body carries raytp's `speculate`; the server's default (--speculate) is off."""
    question = "Repeat exactly: red, green, blue, cyan, magenta, yellow, black, white."
    before = scrape(server)
    fast = chat(client, question, 40, extra_body={"speculate": "ngram:4"})
    between = scrape(server)
    plain = chat(client, question, 40)
    after = scrape(server)
    assert fast.choices[0].message.content == plain.choices[0].message.content
    assert fast.usage.completion_tokens == plain.usage.completion_tokens

    def delta(name, a, b):
        return b.get((name, ()), 0) - a.get((name, ()), 0)

    drafted = delta("raytp_speculative_drafted_tokens_total", before, between)
    accepted = delta("raytp_speculative_accepted_tokens_total", before, between)
    assert 0 < accepted <= drafted
    assert delta("raytp_speculative_drafted_tokens_total", between, after) == 0
    with pytest.raises(openai.BadRequestError) as e:  # this server was started without a draft model
        chat(client, question, 4, extra_body={"speculate": "draft:2"})
    assert e.value.body["param"] == "speculate" and "'draft:2'" in e.value.body["message"]


@pytest.mark.slow
def test_tokenize_and_detokenize_agree_with_transformers(server, smollm2_dir):
    hf = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    auth = {"Authorization": f"Bearer {API_KEY}"}
    text = "The capital of France is Paris. 🤖"
    got = httpx.post(f"{server}/tokenize", json={"model": "smollm2", "prompt": text}, headers=auth, timeout=30)
    assert got.status_code == 200, got.text
    assert got.json() == {"count": len(hf.encode(text)), "max_model_len": 2048, "tokens": hf.encode(text)}
    messages = [{"role": "user", "content": QUESTION}]
    chat_ids = httpx.post(f"{server}/tokenize", json={"messages": messages}, headers=auth, timeout=30).json()
    assert chat_ids["tokens"] == hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                        return_dict=False)
    back = httpx.post(f"{server}/detokenize", json={"tokens": chat_ids["tokens"]}, headers=auth, timeout=30)
    assert back.json() == {"prompt": hf.decode(chat_ids["tokens"])}
    for body, param in (({"tokens": [1, 10**9]}, "tokens"), ({"prompt": "a", "messages": messages}, None),
                        ({"prompt": "hi \ud800"}, "prompt")):
        refused = httpx.post(f"{server}/tokenize" if "tokens" not in body else f"{server}/detokenize",
                             content=json.dumps(body), headers={**auth, "Content-Type": "application/json"},
                             timeout=30)  # json.dumps escapes the lone surrogate, as a client's JSON would
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param, refused.text


@pytest.mark.slow
def test_greedy_chat_matches_generate(client, reference):
    want = reference["text"]
    assert want.strip(), reference
    response = chat(client, QUESTION, REFERENCE_TOKENS)
    assert response.choices[0].message.content == want
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].finish_reason == ("length" if reference["finish"] == "length" else "stop")
    usage = response.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (reference["prompt_tokens"],
                                                              reference["generated_tokens"])
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    chunks = list(chat(client, QUESTION, REFERENCE_TOKENS, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # it did stream
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [response.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == usage.completion_tokens


@pytest.mark.slow
def test_greedy_completion_matches_generate(client, reference, smollm2_dir):
    """/v1/completions on the chat template's text is the same request as the chat one."""
    prompt = Tokenizer.from_dir(smollm2_dir).apply_chat_template([{"role": "user", "content": QUESTION}])
    response = client.completions.create(model="smollm2", prompt=prompt, max_tokens=REFERENCE_TOKENS, temperature=0)
    assert response.choices[0].text == reference["text"]
    assert response.usage.prompt_tokens == reference["prompt_tokens"]
    chunks = list(client.completions.create(model="smollm2", prompt=prompt, max_tokens=REFERENCE_TOKENS,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == reference["text"]
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


@pytest.mark.slow
def test_sampling_is_seeded_and_stop_strings_cut(client):
    kw = dict(model="smollm2", prompt="Once upon a time", max_tokens=16, temperature=0.9, top_p=0.9)
    a, b = (client.completions.create(seed=7, **kw).choices[0].text for _ in range(2))
    assert a == b
    cut = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=24,
                                    temperature=0, stop=["."])
    assert "." not in cut.choices[0].text and cut.choices[0].text.strip()
    assert cut.choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_eight_clients_batched_get_what_they_get_alone(client):
    """Continuous batching: requests of different lengths join and leave the batch; greedy answers do not change."""
    def ask(question, max_tokens):
        return chat(client, question, max_tokens)

    start = time.perf_counter()
    alone = [ask(q, n) for q, n in REQUESTS]
    alone_s = time.perf_counter() - start

    together: list = [None] * len(REQUESTS)

    def run(i):
        together[i] = ask(*REQUESTS[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(REQUESTS))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    together_s = time.perf_counter() - start

    for (question, _), a, t in zip(REQUESTS, alone, together):
        assert t is not None, f"{question!r} failed"
        assert t.choices[0].message.content == a.choices[0].message.content, question
        assert t.usage.completion_tokens == a.usage.completion_tokens
    tokens = sum(r.usage.completion_tokens for r in alone)
    print(f"\n1 client at a time: {tokens} tokens in {alone_s:.1f} s = {tokens / alone_s:.1f} tokens/s; "
          f"8 clients at once: {tokens} tokens in {together_s:.1f} s = {tokens / together_s:.1f} tokens/s "
          f"({alone_s / together_s:.1f}x)")


def post(server: str, path: str, body, key: str | None = API_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(f"{server}/v1/{path}", content=content, headers={**headers, "Content-Type": "application/json"},
                      timeout=60)


GOOD = {"model": "smollm2", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
BAD_REQUESTS = {
    "malformed JSON": ("completions", '{"model": "smollm2", "prompt": ', API_KEY, 400, None),
    "not an object": ("completions", "[1, 2]", API_KEY, 400, None),
    "unknown model": ("completions", {**GOOD, "model": "gpt-4"}, API_KEY, 404, "model"),
    "negative temperature": ("completions", {**GOOD, "temperature": -0.5}, API_KEY, 400, "temperature"),
    "top_p zero": ("completions", {**GOOD, "top_p": 0}, API_KEY, 400, "top_p"),
    "max_tokens beyond the context": ("completions", {**GOOD, "max_tokens": 5000}, API_KEY, 400, "max_tokens"),
    "max_tokens not a number": ("completions", {**GOOD, "max_tokens": "ten"}, API_KEY, 400, "max_tokens"),
    "prompt too long": ("completions", {**GOOD, "prompt": "hello " * 3000}, API_KEY, 400, "prompt"),
    "n beyond --max-batch": ("chat/completions", {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}],
                                                  "n": MAX_BATCH + 1}, API_KEY, 400, "n"),
    "response_format xml": ("chat/completions", {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}],
                                                 "response_format": {"type": "xml"}}, API_KEY, 400, "response_format"),
    "tools with tool_choice auto": ("chat/completions", {"model": "smollm2", "messages": [{"role": "user",
                                    "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f"}}],
                                    "tool_choice": "auto"}, API_KEY, 400, "tool_choice"),
    "top_logprobs without logprobs": ("chat/completions", {"model": "smollm2", "messages": [{"role": "user",
                                      "content": "hi"}], "top_logprobs": 2}, API_KEY, 400, "top_logprobs"),
    "suffix": ("completions", {**GOOD, "suffix": "!"}, API_KEY, 400, "suffix"),
    "best_of beyond n": ("completions", {**GOOD, "best_of": 2}, API_KEY, 400, "best_of"),
    "no messages": ("chat/completions", {"model": "smollm2", "messages": []}, API_KEY, 400, "messages"),
    "bad role": ("chat/completions", {"model": "smollm2", "messages": [{"role": "robot", "content": "hi"}]},
                 API_KEY, 400, "messages"),
    "top_k beyond the vocabulary": ("completions", {**GOOD, "top_k": 10**12}, API_KEY, 400, "top_k"),
    "temperature 1e308": ("completions", '{"model": "smollm2", "prompt": "Hello", "temperature": 1e308}', API_KEY,
                          400, "temperature"),
    "temperature Infinity": ("completions", '{"model": "smollm2", "prompt": "Hello", "temperature": Infinity}',
                             API_KEY, 400, "temperature"),
    "token id outside the vocabulary": ("completions", {**GOOD, "prompt": [1, 10**9]}, API_KEY, 400, "prompt"),
    "five stop strings": ("completions", {**GOOD, "stop": list("abcde")}, API_KEY, 400, "stop"),
    "body past 4 MiB": ("completions", json.dumps({**GOOD, "prompt": "a" * (4 << 20)}), API_KEY, 413, None),
    "body nested 200k levels deep": ("chat/completions", '{"model": "smollm2", "messages": ' + "[" * 200_000
                                     + "]" * 200_000 + "}", API_KEY, 400, None),
    "lone surrogate in a message": ("chat/completions", '{"model": "smollm2", "messages": [{"role": "user", '
                                    '"content": "hi \\ud800"}]}', API_KEY, 400, "messages"),
    "lone surrogate in a prompt": ("completions", '{"model": "smollm2", "prompt": "\\udfff hi"}', API_KEY, 400,
                                   "prompt"),
    "more characters than the context holds": ("chat/completions", {"model": "smollm2", "messages": [
        {"role": "user", "content": "7" * (2048 * 81 + 1)}]}, API_KEY, 400, "messages"),
    "missing key": ("completions", GOOD, None, 401, None),
    "wrong key": ("completions", GOOD, "sk-wrong", 401, None),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_bad_request_gets_openai_error_and_server_keeps_serving(server, case):
    path, body, key, status, param = BAD_REQUESTS[case]
    response = post(server, path, body, key)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if case == "unknown model":
        assert error["code"] == "model_not_found"
    if case.startswith("lone surrogate"):
        assert "lone surrogate" in error["message"] and ("\\ud800" in error["message"]
                                                         or "\\udfff" in error["message"]), error
    if case == "more characters than the context holds":
        assert "no text of more than 165888" in error["message"] and "--max-context" in error["message"], error
    assert response.headers["X-Request-Id"]  # the id the server logged the error under
    good = post(server, "completions", GOOD)
    assert good.status_code == 200 and good.json()["choices"][0]["text"]


@pytest.mark.slow
def test_openai_client_raises_its_own_error_types(server, client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smollm2", prompt="hi", max_tokens=2, temperature=-1)
    assert e.value.body["param"] == "temperature"
    bad_key = openai.OpenAI(base_url=f"{server}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    assert httpx.get(f"{server}/v1/models", timeout=10).status_code == 401


@pytest.mark.slow
def test_a_get_on_a_post_route_is_405_naming_the_method(server):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    for path in ("chat/completions", "completions"):
        response = httpx.get(f"{server}/v1/{path}", headers=auth, timeout=10)
        assert response.status_code == 405 and response.headers["Allow"] == "POST", response.text
        error = response.json()["error"]
        assert error["code"] == "method_not_allowed" and f"/v1/{path} takes POST" in error["message"], error
    response = httpx.post(f"{server}/v1/models", headers=auth, timeout=10)
    assert response.status_code == 405 and response.headers["Allow"] == "GET", response.text
    unknown = httpx.get(f"{server}/v1/embeddings", headers=auth, timeout=10)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_url"


LONG = {"model": "smollm2", "prompt": "Count to a thousand: 1, 2, 3,", "max_tokens": 1500, "temperature": 0,
        "ignore_eos": True}  # minutes of work unless the slot is freed


def next_event(lines) -> str:
    """The next SSE data line (events are separated by blank lines)."""
    return next(line for line in lines if line)


def fill_batch(stack: ExitStack, server: str) -> list:
    """Open MAX_BATCH long streaming requests and read a first token of each: every batch slot is taken.

    Returns the line iterators: the caller must hold them, as dropping one closes its connection."""
    http = stack.enter_context(httpx.Client(timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}))
    streams = []
    for _ in range(MAX_BATCH):
        response = stack.enter_context(http.stream("POST", f"{server}/v1/completions", json={**LONG, "stream": True}))
        assert response.status_code == 200, response.read()
        streams.append(response.iter_lines())
        assert next_event(streams[-1]).startswith("data: {")
    return streams


@pytest.mark.slow
def test_busy_429_and_disconnect_frees_the_slot(server, client):
    """With --max-queue 0, a 9th concurrent request is refused; hanging up cancels a request at once."""
    with ExitStack() as stack:
        streams = fill_batch(stack, server)
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model="smollm2", prompt="hi", max_tokens=2)
        assert e.value.body["code"] == "server_busy"
        assert all(next_event(lines).startswith("data: {") for lines in streams)  # the 8 are still streaming
    # The 8 streams were closed mid-answer. A non-streaming request that the client abandons is cancelled too:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/completions", json=LONG, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=4)
    # ... so all 8 slots can be taken again (a slot still held by the abandoned request would make one a 429),
    deadline = time.monotonic() + 20
    while True:
        try:
            with ExitStack() as stack:
                assert len(fill_batch(stack, server)) == MAX_BATCH
            break
        except AssertionError:  # the server had not yet noticed a hang-up: it notices on its next token
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    # ... and a short request is answered at once, not after 8 x 1500 tokens of abandoned work.
    start = time.perf_counter()
    answer = chat(client, "Say hi.", 4)
    assert answer.choices[0].message.content
    assert time.perf_counter() - start < 30


def vocab_size() -> int:
    return ModelSource.parse("smollm2").config().vocab_size


@pytest.mark.slow
def test_token_id_prompts(server, smollm2_dir):
    """/v1/completions takes the prompt as text or token ids, alone or as a batch of one: the same request."""
    text = "The capital of France is"
    ids = Tokenizer.from_dir(smollm2_dir).encode(text)
    answers = []
    for prompt in (text, ids, [text], [ids]):
        response = post(server, "completions", {**GOOD, "prompt": prompt, "max_tokens": 8})
        assert response.status_code == 200, response.text
        answers.append((response.json()["choices"][0]["text"], response.json()["usage"]["prompt_tokens"]))
    assert answers[0][0] and answers[0][1] == len(ids)
    assert answers == [answers[0]] * 4
    for prompt in ([1, vocab_size()], [-1], [[ids[0], vocab_size()]]):
        response = post(server, "completions", {**GOOD, "prompt": prompt})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "prompt" and str(vocab_size()) in error["message"], error


@pytest.mark.slow
def test_top_k_up_to_the_vocabulary(server):
    response = post(server, "completions", {**GOOD, "top_k": vocab_size(), "temperature": 1.0, "max_tokens": 2})
    assert response.status_code == 200, response.text
    response = post(server, "completions", {**GOOD, "top_k": vocab_size() + 1, "temperature": 1.0})
    assert response.status_code == 400 and response.json()["error"]["param"] == "top_k"
    assert str(vocab_size()) in response.json()["error"]["message"]


@pytest.mark.slow
def test_hostile_requests_are_refused_while_a_stream_runs(server):
    """Requests that would size work without bound are refused at the front end; a stream running meanwhile
    completes with every token it asked for, the same tokens as when it runs alone."""
    tokens = 32
    body = {"model": "smollm2", "prompt": "Count: 1, 2, 3,", "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    hostile = [(json.dumps({**GOOD, "top_k": 10**12}), "top_k"),
               ('{"model": "smollm2", "prompt": "Hello", "temperature": 1e308}', "temperature"),
               ('{"model": "smollm2", "prompt": "Hello", "temperature": Infinity}', "temperature"),
               ('{"model": "smollm2", "prompt": "Hello", "temperature": NaN}', "temperature"),
               (json.dumps({**GOOD, "max_tokens": 10**12}), "max_tokens")]
    with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {API_KEY}"}) as http, \
            http.stream("POST", f"{server}/v1/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        lines = response.iter_lines()
        events = [next_event(lines)]  # the stream is under way
        for text, param in hostile:
            refused = post(server, "completions", text)
            assert refused.status_code == 400, refused.text
            assert refused.json()["error"]["param"] == param, refused.text
        events += [line for line in lines if line]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert chunks[-1]["usage"]["completion_tokens"] == tokens
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    alone = post(server, "completions", {**body, "stream": False})
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == alone.json()["choices"][0]["text"]
