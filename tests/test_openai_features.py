"""Logprobs, echo and n through `raytp serve` (SmolLM2, float32) at 2 uneven CPU ranks, against references
nobody here wrote: lm-evaluation-harness as the client (its `local-completions` model, which scores multiple choice
with `echo: true, logprobs: 1, max_tokens: 1`) must give the per-choice loglikelihoods and the accuracy of its own
`hf` backend on the same weights; the logprobs of /v1/completions and /v1/chat/completions (the official openai
client, streamed and not) must be transformers' log-softmax; n seeded samples are the single requests with the
samples' seeds."""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
import torch
import transformers

from raytp.runtime.sampling import sample_seed
from raytp.weights.tokenizer import Tokenizer
from tests.util import SERVED_API_KEY

AUTH = {"Authorization": f"Bearer {SERVED_API_KEY}"}
API = httpx.Client(headers=AUTH)  # the shared server is behind its key
# Requests a test sends at once: the server batches them (half its 8 slots, so that a request lm-eval sends before
# the server has freed the slot of the one it answered is never one too many). What a request gets does not depend
# on its batch (tests/test_serve.py: test_eight_clients_batched_get_what_they_get_alone).
CONCURRENT = 4


def at_once(*calls):
    """The results of these calls (no arguments), made concurrently."""
    with ThreadPoolExecutor(CONCURRENT) as pool:
        return [f.result() for f in [pool.submit(c) for c in calls]]

pytestmark = pytest.mark.slow

# lm-eval's tasks over one JSONL of (question, choices, answer index): multiple choice (each choice scored with
# `echo: true, logprobs: 1, max_tokens: 1`, after lm-eval's " " delimiter) and generate_until (greedy, to a newline)
TASKS = {"raytp_multiple_choice": """output_type: multiple_choice
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
""", "raytp_generate_until": """output_type: generate_until
doc_to_target: "{{choices[answer]}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
"""}
TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
"""
QUESTIONS = [
    ("What is the capital of France?", ["Paris", "Berlin", "Madrid", "Rome"], 0),
    ("How many legs does a spider have?", ["six", "eight", "ten", "four"], 1),
    ("Which planet is known as the red planet?", ["Venus", "Jupiter", "Mars", "Saturn"], 2),
    ("What is frozen water called?", ["steam", "ice", "fog", "sand"], 1),
    ("What is 3 + 4?", ["6", "7", "8", "12"], 1),
    # after these answers the model's greedy next token is its end token: the one generated token lm-eval asks for
    # (max_tokens 1) is a stop token, whose logprob entry lm-eval's slice counts on
    ("What is the boiling point of water at sea level in Celsius?",
     ["100 degrees.", "50 degrees.", "0 degrees.", "212 degrees."], 0),
    ("What is the capital of Italy?", ["Rome.", "Paris.", "Oslo.", "Lima."], 0),
    ("What is 2 + 2?", ["4.", "5.", "22.", "3."], 0),
    ("What is the largest ocean?", ["The Pacific Ocean.", "The Atlantic Ocean.", "The Indian Ocean.",
                                    "The Arctic Ocean."], 0),
    ("How many continents are there?", ["Seven.", "Five.", "Nine.", "Three."], 0),
]


@pytest.fixture(scope="module")
def server(shared_server):
    """The run's shared server (tests/conftest.py) over 2 uneven ranks: every feature meets the sharded vocabulary."""
    return shared_server[1]


@pytest.fixture(scope="module")
def model(smollm2_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return Tokenizer.from_dir(smollm2_dir)


def log_softmax(model, ids: list[int]) -> torch.Tensor:
    """(len(ids), vocab) float64: transformers' next-token log-probabilities at each position."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)


# ---- lm-evaluation-harness ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def task_manager(tmp_path_factory, offline):
    from lm_eval.tasks import TaskManager

    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    for task, kind in TASKS.items():
        (folder / f"{task}.yaml").write_text(TASK_YAML.format(task=task, data=data) + kind)
    return TaskManager(include_path=str(folder))


def evaluate(task_manager, model: str, model_args: dict) -> dict[str, tuple[float, list]]:
    """Per task (its metric, per document lm-eval's filtered responses): for multiple choice the (loglikelihood,
    is_greedy) of each choice, for generate_until the generated text."""
    import lm_eval

    results = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(TASKS),
                                      task_manager=task_manager, log_samples=True, batch_size=1)
    scores = {}
    for task in TASKS:
        metric = next(v for k, v in results["results"][task].items() if k.endswith(",none") and "stderr" not in k)
        samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
        scores[task] = metric, [s["filtered_resps"] for s in samples]
    return scores


@pytest.fixture(scope="module")
def offline():
    with pytest.MonkeyPatch.context() as mp:  # the task's data and the weights are local files: no hub look-ups
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def hf_scores(task_manager, smollm2_dir):
    return evaluate(task_manager, "hf", {"pretrained": str(smollm2_dir), "dtype": "float32", "device": "cpu"})


def test_lm_eval_through_the_server_scores_as_its_hf_backend(server, task_manager, smollm2_dir, hf_scores):
    """Loglikelihoods (answers the end token follows among them), greedy flags, generations and both metrics."""
    ours = evaluate(task_manager, "local-completions", {
        "model": "smollm2", "base_url": f"{server}/v1/completions", "tokenizer": str(smollm2_dir),
        "tokenizer_backend": "huggingface", "max_retries": 1, "header": AUTH, "num_concurrent": CONCURRENT})
    (accuracy, scores), (want_accuracy, want) = ours["raytp_multiple_choice"], hf_scores["raytp_multiple_choice"]
    assert len(scores) == len(want) == len(QUESTIONS)
    for doc, (got, theirs) in enumerate(zip(scores, want)):
        assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in theirs], abs=1e-3), doc
        assert [greedy for _, greedy in got] == [greedy for _, greedy in theirs], doc
    assert accuracy == want_accuracy
    (matched, texts), (want_matched, want_texts) = ours["raytp_generate_until"], hf_scores["raytp_generate_until"]
    assert texts == want_texts and matched == want_matched
    assert any(text[0].strip() for text in texts)  # the model answered something


# ---- /v1/completions ----------------------------------------------------------------------------------------

def completion(server: str, body: dict) -> dict:
    response = API.post(f"{server}/v1/completions", json={"model": "smollm2", **body}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.7, "seed": 5}], ids=["greedy", "t0.7"])
def test_completion_logprobs_with_echo_are_transformers_log_softmax(server, model, tokenizer, sampling):
    prompt = "The three primary colors are"
    ids = tokenizer.encode(prompt)
    choice = completion(server, {"prompt": prompt, "max_tokens": 6, "logprobs": 4, "echo": True, **sampling})
    lp = choice["logprobs"]
    assert choice["text"].startswith(prompt)
    tokens = lp["tokens"]
    assert len(tokens) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    assert "".join(tokens) == choice["text"]  # SmolLM2's byte-level tokens spell the text
    assert lp["text_offset"] == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    # the generated ids: the prompt's are known; each generated token's string spells one id only
    strings = [tokenizer.decode([i], skip_special_tokens=False) for i in range(tokenizer.vocab_size)]
    unique = Counter(strings)
    vocab = {text: i for i, text in enumerate(strings) if unique[text] == 1}
    all_ids = ids + [vocab[t] for t in tokens[len(ids):]]
    assert tokens[: len(ids)] == [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
    temperature = sampling["temperature"] or 1.0  # greedy: the unscaled distribution
    with torch.no_grad():
        logits = model(torch.tensor([all_ids])).logits[0].double()
    want = torch.log_softmax(logits, dim=-1)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for t in range(1, len(all_ids)):
        dist = want[t - 1] if t < len(ids) else torch.log_softmax(logits[t - 1] / temperature, dim=-1)
        assert lp["token_logprobs"][t] == pytest.approx(dist[all_ids[t]].item(), abs=1e-4), t
        values, top_ids = dist.topk(4)
        top = lp["top_logprobs"][t]
        assert sorted(top.values(), reverse=True) == pytest.approx(values.tolist(), abs=1e-4), t
        assert set(top) == {tokenizer.decode([i], skip_special_tokens=False) for i in top_ids.tolist()}, t


def test_streamed_completion_logprobs_equal_the_whole_answer(server):
    body = {"prompt": "Once upon a time", "max_tokens": 8, "logprobs": 2, "temperature": 0}
    whole = completion(server, body)["logprobs"]
    chunks = []
    with API.stream("POST", f"{server}/v1/completions", json={"model": "smollm2", "stream": True, **body},
                      timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:])["choices"])
    streamed = [c[0]["logprobs"] for c in chunks if c and c[0]["logprobs"]]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for lp in streamed for x in lp[key]] == whole[key], key


# ---- /v1/chat/completions -----------------------------------------------------------------------------------

def test_chat_logprobs_are_transformers_log_softmax_streamed_and_not(server, model, tokenizer):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=SERVED_API_KEY, max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "Name a fruit."}]
    kw = {"model": "smollm2", "messages": messages, "max_tokens": 8, "temperature": 0, "logprobs": True,
          "top_logprobs": 3}
    answer = client.chat.completions.create(**kw).choices[0]
    content = answer.logprobs.content
    streamed = [entry for chunk in client.chat.completions.create(stream=True, **kw)
                if chunk.choices and chunk.choices[0].logprobs for entry in chunk.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages))
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                             eos_token_id=sorted(tokenizer.eos_token_ids))
    generated = [i for i in out[0, len(prompt):].tolist() if i not in tokenizer.eos_token_ids]
    want = log_softmax(model, prompt + generated)
    assert [e.token for e in content] == [tokenizer.decode([i], skip_special_tokens=False) for i in generated]
    assert "".join(e.token for e in content) == answer.message.content
    for j, (entry, token) in enumerate(zip(content, generated)):
        dist = want[len(prompt) + j - 1]
        assert entry.logprob == pytest.approx(dist[token].item(), abs=1e-4)
        assert entry.bytes == list(entry.token.encode())
        values, ids = dist.topk(3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(values.tolist(), abs=1e-4)
        assert [t.token for t in entry.top_logprobs] == [tokenizer.decode([i], skip_special_tokens=False)
                                                          for i in ids.tolist()]


# ---- n ------------------------------------------------------------------------------------------------------

def test_n_seeded_samples_equal_single_requests_with_their_seeds(server):
    """Sample i of a request seeded s is the single request seeded sample_seed(s, i) = s + i: text and logprobs,
    in the whole answer and streamed (chat, by the openai client)."""
    body = {"prompt": "Once upon a time", "max_tokens": 10, "temperature": 0.9, "top_p": 0.95, "seed": 11,
            "logprobs": 2}
    response = API.post(f"{server}/v1/completions", json={"model": "smollm2", "n": 3, **body}, timeout=120)
    assert response.status_code == 200, response.text
    many = response.json()["choices"]
    assert [c["index"] for c in many] == [0, 1, 2]
    singles = at_once(*(lambda i=i: completion(server, {**body, "seed": sample_seed(11, i)}) for i in range(3)))
    assert len({c["text"] for c in singles}) == 3  # really three different samples
    for got, want in zip(many, singles):
        assert got["text"] == want["text"]
        assert got["logprobs"]["tokens"] == want["logprobs"]["tokens"]
        assert got["logprobs"]["token_logprobs"] == pytest.approx(want["logprobs"]["token_logprobs"], abs=1e-4)

    client = openai.OpenAI(base_url=f"{server}/v1", api_key=SERVED_API_KEY, max_retries=0, timeout=120)
    kw = {"model": "smollm2", "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 8,
          "temperature": 1.0, "seed": 5}

    def stream() -> list[str]:
        texts = ["", "", ""]
        for chunk in client.chat.completions.create(n=3, stream=True, **kw):
            for choice in chunk.choices:
                texts[choice.index] += choice.delta.content or ""
        return texts

    whole, streamed, *alone = at_once(lambda: client.chat.completions.create(n=3, **kw).choices, stream,
                                      *(lambda i=i: client.chat.completions.create(**{**kw, "seed": 5 + i})
                                        .choices[0].message.content for i in range(3)))
    assert [c.message.content for c in whole] == streamed == alone


def test_n_beyond_the_batch_is_refused_naming_n(server):
    response = API.post(f"{server}/v1/completions", json={"model": "smollm2", "prompt": "x", "n": 1000},
                          timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "n"


# ---- response_format ----------------------------------------------------------------------------------------

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 150}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                                 "minItems": 1, "maxItems": 3}},
     "required": ["colors"], "additionalProperties": False},
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}, "sunny": {"type": "boolean"},
                                      "temperature": {"type": "integer", "minimum": -50, "maximum": 60}},
     "required": ["city", "sunny", "temperature"], "additionalProperties": False},
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=["person", "colors", "weather"])
def test_json_schema_output_parses_and_validates(server, schema):
    """Sampled at temperature 0.7 (free text would rarely be JSON), the answer follows the schema: the mask of each
    rank's vocabulary slice is applied before the sampler's exchange."""
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=SERVED_API_KEY, max_retries=0, timeout=120)
    answers = at_once(*(lambda seed=seed: client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Answer in JSON."}], max_tokens=120, temperature=0.7,
        seed=seed, response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
                        for seed in range(2)))
    for answer in answers:
        choice = answer.choices[0]
        assert choice.finish_reason == "stop", choice.message.content  # the schema's end, then end-of-turn
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_object_streamed_and_with_logprobs(server):
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Give me a JSON object about a cat."}],
            "max_tokens": 200, "temperature": 0, "response_format": {"type": "json_object"},
            "logprobs": True}
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=SERVED_API_KEY, max_retries=0, timeout=120)
    whole, streamed = at_once(lambda: client.chat.completions.create(**body).choices[0],
                              lambda: "".join(c.choices[0].delta.content or ""
                                              for c in client.chat.completions.create(stream=True, **body)
                                              if c.choices))
    assert streamed == whole.message.content
    assert whole.finish_reason == "stop", whole.message.content
    assert isinstance(json.loads(whole.message.content), dict)
    assert all(t.logprob <= 0 for t in whole.logprobs.content)


def test_a_schema_that_cannot_be_used_is_refused_naming_response_format(server):
    response = API.post(f"{server}/v1/chat/completions", json={
        "model": "smollm2", "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
        timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "response_format", response.text


# ---- tools ----------------------------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 40}},
                   "required": ["zone"], "additionalProperties": False}}}


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}],
                         ids=["required", "named"])
def test_forced_tool_calls_come_back_as_tool_calls(server, tool_choice):
    """With the official openai client, whole and streamed: the calls name offered tools and their arguments
    validate against the tools' parameter schemas (jsonschema)."""
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=SERVED_API_KEY, max_retries=0, timeout=120)
    kw = {"model": "smollm2", "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
          "tools": [WEATHER, TIME], "tool_choice": tool_choice, "max_tokens": 100, "temperature": 0.7, "seed": 1}
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}

    def stream() -> tuple[dict, list]:
        calls, finishes = {}, []
        for chunk in client.chat.completions.create(stream=True, **kw):
            for c in chunk.choices:
                for delta in c.delta.tool_calls or ():
                    calls[delta.index] = (delta.function.name, delta.function.arguments)
                finishes.append(c.finish_reason)
        return calls, finishes

    choice, (streamed, finishes) = at_once(lambda: client.chat.completions.create(**kw).choices[0], stream)
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert calls and all(c.type == "function" and c.id.startswith("call_") for c in calls)
    if isinstance(tool_choice, dict):
        assert [c.function.name for c in calls] == ["get_weather"]
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    assert [streamed[k] for k in sorted(streamed)] == [(c.function.name, c.function.arguments) for c in calls]
    assert finishes[-1] == "tool_calls"


# ---- failures that must not pass for answers --------------------------------------------------------------------

# A string whose automaton outgrows llguidance's lexer a token or two in: it compiles and its first mask is fine, so
# only decoding finds it out.
FAILING_SCHEMA = {"type": "string", "pattern": "^(.{1,1000}){1,1000}$"}


def sse_events(server: str, path: str, body: dict) -> list:
    """The `data:` events of a streamed request, decoded ("[DONE]" as it is); an error before the first token
    (an HTTP status other than 200) as one event of its own."""
    with API.stream("POST", f"{server}{path}", json={"model": "smollm2", "stream": True, **body},
                      timeout=120) as response:
        if response.status_code != 200:
            return [json.loads(response.read())]
        return [line[6:] if line == "data: [DONE]" else json.loads(line[6:])
                for line in response.iter_lines() if line.startswith("data: ")]


def test_a_grammar_that_fails_while_decoding_is_an_error_whole_streamed_and_as_a_forced_call(server):
    """Never a 200 "stop" with a cut answer, nor a 500 from parsing the cut call; streamed, an error event and
    [DONE] (or the error status, where it fails before the first token)."""
    chat = {"messages": [{"role": "user", "content": "Say something."}], "max_tokens": 30, "temperature": 0}
    formats = {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": FAILING_SCHEMA}}}
    tools = {"tool_choice": "required", "tools": [{"type": "function", "function": {
        "name": "say",
        "parameters": {"type": "object", "properties": {"text": FAILING_SCHEMA}, "required": ["text"]}}}]}
    for constraint in (formats, tools):
        response = API.post(f"{server}/v1/chat/completions", json={"model": "smollm2", **chat, **constraint},
                              timeout=120)
        assert response.status_code == 400, response.text
        assert "failed while decoding" in response.json()["error"]["message"], response.text
        events = sse_events(server, "/v1/chat/completions", {**chat, **constraint})
        if len(events) > 1:  # a 200 stream: it ends in the error event and [DONE], and no choice finished
            assert events[-1] == "[DONE]", events
            assert not any(c["finish_reason"] for e in events[:-1] for c in e.get("choices", ())), events
        assert "failed while decoding" in events[-2 if len(events) > 1 else -1]["error"]["message"], events


def test_a_tiny_temperature_is_greedy_with_finite_logprobs_whole_and_streamed(server):
    body = {"prompt": "The capital of France is", "max_tokens": 5, "logprobs": 1}
    greedy = completion(server, {**body, "temperature": 0})
    tiny = completion(server, {**body, "temperature": 1e-40})
    assert tiny["text"] == greedy["text"] and tiny["logprobs"] == greedy["logprobs"]
    events = sse_events(server, "/v1/completions", {**body, "temperature": 1e-40})
    assert events[-1] == "[DONE]"
    json.dumps(events[:-1], allow_nan=False)  # no NaN came (json.loads takes a literal NaN; this refuses it)
