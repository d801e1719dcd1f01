"""The device-resident token loop on CPU ranks (threads, in-process collectives): the tokens of a stepwise reference
(transformers' logits over the whole sequence, drawn by a one-rank sampler), stops found one step late without
the surplus token, cancellation, requests joining a running batch, long prompts in chunks between decode steps,
and command broadcasts only when there is news."""

import dataclasses
import json

import jsonschema
import pytest
import torch
import transformers

from raytp.parallel.comm import Communicator, InProcessGroup
from raytp.runtime.engine import Add, Cancel, RankEngine, Request, Stop
from raytp.runtime.sampling import SEED_MAX, SEED_MIN, FIRST_CANDIDATES, SamplingParams, ShardedSampler, sample_seed
from raytp.weights.tokenizer import Tokenizer
from tests.sharded import LocalGroup, shared_group
from tests.test_sampling import reference_logprobs

SPLIT = [3.0, 2.0, 1.0]
VOCAB = 1000


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=128, num_hidden_layers=2, max_position_embeddings=512)
    model = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path, safe_serialization=True)
    return path, model, LocalGroup(path, SPLIT)


def reference(model, prompt, params, n, stop_ids=()):
    """Token by token: transformers' logits of the whole sequence so far, drawn by a one-rank sampler."""
    sampler = ShardedSampler(InProcessGroup(1).communicator(0), 0)
    tokens = list(prompt)
    for generated in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([tokens])).logits[:, -1].float()
        token = sampler.sample(logits, [params], [generated], [torch.tensor(tokens)])[0]
        tokens.append(token)
        if token in stop_ids:
            break
    return tokens[len(prompt):]


class CountingCommunicator(Communicator):
    """Counts broadcasts: in the token loop, only the command exchange broadcasts."""

    def __init__(self, inner):
        self.inner, self.rank, self.world_size = inner, inner.rank, inner.world_size
        self.broadcasts = 0

    def all_reduce(self, t):
        return self.inner.all_reduce(t)

    def all_gather_equal(self, t):
        return self.inner.all_gather_equal(t)

    def broadcast(self, t, src=0):
        self.broadcasts += 1
        return super().broadcast(t, src)


def run_loop(group, first, on_event=None, prefill_chunk=512):
    """Run the real token loop on every rank with the commands `first` queued; `on_event(event, submit, events so far)`
    may submit more. Returns (events in order, each rank's engine); stops when every request added has finished."""
    engines = [RankEngine(m, CountingCommunicator(m.comm), prefill_chunk=prefill_chunk, draft=d)
               for m, d in zip(group.models, group.drafts)]
    seen, open_ids = [], set()

    def submit(cmd):
        if isinstance(cmd, Add):
            open_ids.add(cmd.request.id)
        engines[0].inbox.put(cmd)

    for cmd in first:
        submit(cmd)

    def emit(events):
        for e in events:
            seen.append(e)
            if e.finish:
                open_ids.discard(e.request_id)
            if on_event:
                on_event(e, submit, seen)
        if not open_ids:
            engines[0].inbox.put(Stop())

    group.on_all_ranks(lambda r, m: engines[r].run(emit if r == 0 else lambda ev: None))
    return seen, engines


def tokens_of(events, rid):
    return [e.token_id for e in events if e.request_id == rid and e.token_id is not None]


CASES = [SamplingParams(max_tokens=20),
         SamplingParams(temperature=0.8, seed=11, max_tokens=20),
         SamplingParams(temperature=1.0, top_p=0.95, seed=12, max_tokens=20),  # a nucleus past the candidates sent
         SamplingParams(temperature=1.0, top_k=100, top_p=0.9, seed=14, max_tokens=20),
         SamplingParams(temperature=0.7, top_k=5, repetition_penalty=1.4, seed=13, max_tokens=20)]


@pytest.mark.parametrize("params", CASES, ids=["greedy", "temperature", "top-p", "top-k-top-p", "top-k-penalty"])
def test_tokens_match_the_stepwise_reference_also_for_a_request_joining_a_running_batch(tiny, params):
    path, model, group = tiny
    prompts = {"a": [5, 17, 300, 42], "b": [999, 3, 3, 3, 64, 0, 12]}

    def join(event, submit, seen):  # b arrives while a is decoding
        if event.request_id == "a" and len(tokens_of(seen, "a")) == 6:
            submit(Add(Request("b", prompts["b"], params)))

    seen, _ = run_loop(group, [Add(Request("a", prompts["a"], params))], join)
    for rid, prompt in prompts.items():
        assert tokens_of(seen, rid) == reference(model, prompt, params, 20), rid


def test_flat_nucleus_needs_more_candidates_than_the_captured_step_sends(tiny):
    """The top-p case above is exact only through the redraw: its nucleus is wider than what one exchange sends."""
    _, model, _ = tiny
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([[5, 17, 300, 42]])).logits[0, -1], 0)
    nucleus = int((probs.sort(descending=True).values.cumsum(0) < 0.95).sum()) + 1
    assert nucleus > FIRST_CANDIDATES * len(SPLIT)


def test_stop_token_is_found_one_step_late_and_the_surplus_token_dropped(tiny):
    path, model, group = tiny
    params = SamplingParams(temperature=0.9, seed=5, max_tokens=30)
    free = reference(model, [7, 8, 9], params, 30)
    stop = free[9]  # the request must end at its first occurrence
    expected = free[: free.index(stop) + 1]
    # b keeps the loop stepping after a's stop: the step in flight when the stop is read drew a surplus token
    seen, _ = run_loop(group, [Add(Request("a", [7, 8, 9], params, [stop])),
                               Add(Request("b", [1, 2], SamplingParams(max_tokens=30)))])
    assert tokens_of(seen, "a") == expected
    assert [e.finish for e in seen if e.request_id == "a"] == [None] * (len(expected) - 1) + ["stop"]


def test_cancel_mid_stream_ends_one_request_and_the_other_goes_on(tiny):
    path, model, group = tiny
    params = SamplingParams(max_tokens=25)

    def cancel(event, submit, seen):
        if event.request_id == "a" and len(tokens_of(seen, "a")) == 5:
            submit(Cancel("a"))

    seen, _ = run_loop(group, [Add(Request("a", [1, 2, 3], params)), Add(Request("b", [4, 5], params))], cancel)
    a = [e for e in seen if e.request_id == "a"]
    assert a[-1].finish == "cancelled" and all(e.finish is None for e in a[:-1])
    got = tokens_of(seen, "a")
    assert 5 <= len(got) < 25 and got == reference(model, [1, 2, 3], params, len(got))
    assert tokens_of(seen, "b") == reference(model, [4, 5], params, 25)


def test_commands_are_broadcast_only_when_there_is_news(tiny):
    _, _, group = tiny

    def broadcasts(n):
        _, engines = run_loop(group, [Add(Request("a", [1, 2, 3], SamplingParams(max_tokens=n)))])
        counts = {e.comm.broadcasts for e in engines}
        assert len(counts) == 1  # every rank runs the same exchanges
        return counts.pop()

    assert broadcasts(40) == broadcasts(5) < 10  # no broadcast per decode step


def test_long_prompt_is_prefilled_in_chunks_between_decode_steps(tiny):
    path, model, group = tiny
    params = SamplingParams(max_tokens=24)
    long = [(7 * i) % VOCAB for i in range(1, 41)]  # 40 tokens: 5 chunks of 8

    def join(event, submit, seen):
        if event.request_id == "a" and len(tokens_of(seen, "a")) == 2:
            submit(Add(Request("b", long, SamplingParams(max_tokens=8))))

    seen, _ = run_loop(group, [Add(Request("a", [1, 2, 3], params))], join, prefill_chunk=8)
    ids = [e.request_id for e in seen]
    first_b = ids.index("b")
    assert ids[:first_b].count("a") >= 2 + 4  # a kept decoding while b's chunks went in
    assert tokens_of(seen, "a") == reference(model, [1, 2, 3], params, 24)
    assert tokens_of(seen, "b") == reference(model, long, SamplingParams(max_tokens=8), 8)


@pytest.mark.parametrize("params", [CASES[0], CASES[1], CASES[3]], ids=["greedy", "temperature", "top-k-top-p"])
def test_logprobs_and_prompt_logprobs_are_transformers_log_softmax(tiny, params):
    """Generated tokens' log-probabilities (of the distribution drawn from) and echo's prompt log-probabilities
    (a prompt in chunks), with a row that asks for neither in the same batch."""
    _, model, group = tiny
    prompt = [(11 * i) % VOCAB for i in range(1, 14)]  # 13 tokens: chunks of 4
    asking = dataclasses.replace(params, logprobs=3, prompt_logprobs=2)
    plain = SamplingParams(max_tokens=20)
    seen, _ = run_loop(group, [Add(Request("a", prompt, asking)), Add(Request("b", [4, 5], plain))], prefill_chunk=4)
    tokens = tokens_of(seen, "a")
    assert tokens == reference(model, prompt, params, 20)
    assert tokens_of(seen, "b") == reference(model, [4, 5], plain, 20)
    assert all(e.logprob is None and e.prompt_logprobs is None for e in seen if e.request_id == "b")
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0].double()

    def check(chosen, top, want, token, n):
        assert chosen == pytest.approx(want[token].item(), abs=1e-4)
        assert [v for _, v in top] == pytest.approx(want.topk(n).values.tolist(), abs=1e-4)
        assert [want[i].item() for i, _ in top] == pytest.approx([v for _, v in top], abs=1e-4)

    generated = [e for e in seen if e.request_id == "a" and e.token_id is not None]
    for j, e in enumerate(generated):
        position = len(prompt) + j - 1  # whose logits drew generated token j
        check(e.logprob, e.top_logprobs, reference_logprobs(logits[position : position + 1], params)[0], e.token_id, 3)
    scored = [row for e in seen if e.request_id == "a" and e.prompt_logprobs for row in e.prompt_logprobs]
    assert len(scored) == len(prompt) - 1
    for t, (chosen, top) in enumerate(scored):
        check(chosen, top, torch.log_softmax(logits[t], -1), prompt[t + 1], 2)


def test_n_samples_are_prefilled_once_and_equal_single_requests_with_their_seeds(tiny):
    """n=3 seeded samples: one prefill (one multi-token forward per rank), then sample i draws what a single
    request seeded `sample_seed(seed, i)` draws; a request asking for n=1 decodes beside them."""
    _, model, group = tiny
    prompt = [3, 141, 59, 26, 535]
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=SEED_MAX - 1, max_tokens=15, n=3)  # seeds wrap
    prefills = [0] * len(group.models)

    def counting(rank, forward):
        def counted(tokens, *args, **kw):
            prefills[rank] += tokens.shape[1] > 1
            return forward(tokens, *args, **kw)
        return counted

    for rank, m in enumerate(group.models):
        m.forward = counting(rank, m.forward)
    try:
        seen, _ = run_loop(group, [Add(Request("a", prompt, params)), Add(Request("b", [8, 9], CASES[1]))])
    finally:
        for m in group.models:
            del m.forward
    assert prefills == [2] * len(group.models)  # a's prompt once, b's once
    assert {e.index for e in seen if e.request_id == "a"} == {0, 1, 2}
    for i in range(3):
        single = dataclasses.replace(params, seed=sample_seed(params.seed, i), n=1)
        got = [e.token_id for e in seen if e.request_id == "a" and e.index == i and e.token_id is not None]
        assert got == reference(model, prompt, single, 15), i
    assert sample_seed(SEED_MAX - 1, 2) == SEED_MIN
    assert tokens_of(seen, "b") == reference(model, [8, 9], CASES[1], 20)


def test_grammar_rows_draw_what_llguidance_masked_transformers_logits_draw(smollm2_dir):
    """SmolLM2 at 3 uneven ranks: a JSON-schema row (sampled) and a free row side by side. The reference masks
    transformers' logits with llguidance's own torch helper and draws with a one-rank sampler."""
    import llguidance.torch

    from raytp.runtime.constraints import Grammars, json_schema_grammar

    group = shared_group(smollm2_dir, SPLIT)
    grammars = Grammars.for_model(smollm2_dir, group.config)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "ok": {"type": "boolean"}}, "required": ["n", "ok"],
              "additionalProperties": False}
    tokenizer = Tokenizer.from_dir(smollm2_dir)
    eos = sorted(tokenizer.eos_token_ids)
    params = SamplingParams(temperature=0.8, seed=4, max_tokens=40, grammar=json_schema_grammar(schema))
    prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "A number, as JSON."}]))
    engines = [RankEngine(m, m.comm, grammars=Grammars.for_model(smollm2_dir, group.config, m.vocab_start,
                                                                 m.lm_head.width)) for m in group.models]
    for engine in engines:
        engine.prepare_grammar("a", params.grammar)
    out = {"a": [], "b": []}

    def emit(events):
        for e in events:
            if e.token_id is not None:
                out[e.request_id].append(e.token_id)
            if e.finish:
                out[e.request_id + " finish"] = e.finish
        if "a finish" in out and "b finish" in out:
            engines[0].inbox.put(Stop())

    engines[0].inbox.put(Add(Request("a", prompt, params, eos)))
    engines[0].inbox.put(Add(Request("b", prompt, SamplingParams(max_tokens=12), eos)))
    group.on_all_ranks(lambda r, m: engines[r].run(emit if r == 0 else lambda ev: None))

    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    matcher = grammars.compile(params.grammar)
    sampler = ShardedSampler(InProcessGroup(1).communicator(0), 0)
    tokens, want = list(prompt), []
    for generated in range(params.max_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([tokens])).logits[:, -1].float()
        bitmask = llguidance.torch.allocate_token_bitmask(1, logits.shape[1])
        llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
        llguidance.torch.apply_token_bitmask_inplace(logits, bitmask)
        token = sampler.sample(logits, [params], [generated], [torch.tensor(tokens)])[0]
        want.append(token)
        tokens.append(token)
        assert matcher.consume_token(token)
        if token in eos:
            break
    assert out["a"] == want and out["a finish"] == "stop"
    text = tokenizer.decode(out["a"])
    jsonschema.validate(json.loads(text), schema)
    assert out["b"] == reference(model, prompt, SamplingParams(max_tokens=12), 12, eos)


def test_a_grammar_that_fails_while_decoding_ends_its_row_in_an_error_not_a_stop(smollm2_dir):
    """A schema that refers only to itself fails at its first mask (llguidance then allows an end token only): the
    row ends with finish "error" and llguidance's reason, never "stop" with an empty answer; the row beside it runs
    on. Compiling refuses such a schema before admission (Grammars.compile); the loop must not trust that alone, so
    here the ranks compile without that check."""
    import llguidance

    from raytp.runtime.constraints import Grammars, json_schema_grammar
    from raytp.runtime.errors import RequestError

    class Unchecked(Grammars):
        def compile(self, grammar):
            return llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)

    group = shared_group(smollm2_dir, SPLIT)
    grammar = json_schema_grammar({"$ref": "#"})
    with pytest.raises(RequestError, match="cannot be used: NoExtensionBias"):
        Grammars.for_model(smollm2_dir, group.config).compile(grammar)
    eos = sorted(Tokenizer.from_dir(smollm2_dir).eos_token_ids)
    engines = [RankEngine(m, m.comm, grammars=Unchecked.for_model(smollm2_dir, group.config, m.vocab_start,
                                                                  m.lm_head.width)) for m in group.models]
    for engine in engines:
        engine.prepare_grammar("bad", grammar)
    ends = {}

    def emit(events):
        ends.update({e.request_id: (e.finish, e.error) for e in events if e.finish})
        if len(ends) == 2:
            engines[0].inbox.put(Stop())

    engines[0].inbox.put(Add(Request("bad", [1, 2, 3], SamplingParams(max_tokens=8, grammar=grammar), eos)))
    engines[0].inbox.put(Add(Request("free", [1, 2, 3], SamplingParams(max_tokens=4), [])))
    group.on_all_ranks(lambda r, m: engines[r].run(emit if r == 0 else lambda ev: None))
    finish, error = ends["bad"]
    assert finish == "error" and "failed while decoding: NoExtensionBias" in error, ends
    assert ends["free"] == ("length", None)


def test_a_small_request_is_admitted_while_one_for_every_slot_waits(tiny):
    """max_batch 4: "a" decodes, "big" (n=4) must wait for it; "small", sent after big, goes in at once and ends
    before a does. Big runs once a has ended."""
    _, model, group = tiny
    long, short = SamplingParams(max_tokens=40), SamplingParams(max_tokens=3)

    def send(event, submit, seen):
        if event.request_id == "a" and len(tokens_of(seen, "a")) == 2:
            submit(Add(Request("big", [4, 5], dataclasses.replace(short, n=4))))
            submit(Add(Request("small", [6, 7], short)))

    seen, _ = run_loop(group, [Add(Request("a", [1, 2, 3], long))], send)
    order = [(e.request_id, e.finish) for e in seen]
    assert order.index(("small", "length")) < order.index(("a", "length")) < order.index(("big", None))
    assert tokens_of(seen, "small") == reference(model, [6, 7], short, 3)
    assert tokens_of(seen, "a") == reference(model, [1, 2, 3], long, 40)


def test_a_grammar_compiles_once_per_request_beside_the_loop_which_never_waits_for_it(smollm2_dir):
    """While "c"'s grammar compiles on every rank (held until "a" has finished), "a" decodes all its tokens: the
    loop never waits for a compile. Then c (n=3) is sent: its samples share the one compile of each rank and
    each answers JSON of the schema."""
    import threading

    from raytp.runtime.constraints import Grammars, json_schema_grammar

    group = shared_group(smollm2_dir, SPLIT)
    tokenizer = Tokenizer.from_dir(smollm2_dir)
    eos = sorted(tokenizer.eos_token_ids)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    grammar = json_schema_grammar(schema)
    engines = [RankEngine(m, m.comm, grammars=Grammars.for_model(smollm2_dir, group.config, m.vocab_start,
                                                                 m.lm_head.width)) for m in group.models]
    a_done, loops, compiles = threading.Event(), set(), []

    def held(compile_):
        def compile_after_a(g):
            assert a_done.wait(120), "the loop did not finish a while a grammar compiled"
            compiles.append(threading.get_ident())
            return compile_(g)
        return compile_after_a

    for engine in engines:
        engine.grammars.compile = held(engine.grammars.compile)

    def prepare_then_send():
        for engine in engines:
            engine.prepare_grammar("c", grammar)
        engines[0].inbox.put(Add(Request("c", [1, 2], SamplingParams(max_tokens=30, n=3, temperature=0.7, seed=1,
                                                                     grammar=grammar), eos)))

    out: dict[tuple[str, int], list[int]] = {}
    finished = set()

    def emit(events):
        for e in events:
            if e.token_id is not None:
                out.setdefault((e.request_id, e.index), []).append(e.token_id)
            if e.finish:
                finished.add((e.request_id, e.index))
        if ("a", 0) in finished:
            a_done.set()
        if len(finished) == 4:
            engines[0].inbox.put(Stop())

    def run(r, m):
        loops.add(threading.get_ident())
        engines[r].run(emit if r == 0 else lambda ev: None)

    engines[0].inbox.put(Add(Request("a", [1, 2, 3], SamplingParams(max_tokens=20))))  # no stop token: 20 tokens
    sender = threading.Thread(target=prepare_then_send)
    sender.start()
    group.on_all_ranks(run)
    sender.join()
    assert len(out[("a", 0)]) == 20
    assert len(compiles) == len(engines) and not loops & set(compiles)  # one per rank, none on a loop
    for i in range(3):
        jsonschema.validate(json.loads(tokenizer.decode(out[("c", i)])), schema)


def test_an_echo_prompt_is_scored_in_chunks_of_bounded_size_between_decode_steps(tiny, monkeypatch):
    """Echo's chunks hold at most PROMPT_SCORES_PER_CHUNK scores (here 6 positions of the 1000-token vocabulary),
    whatever prefill_chunk is: a running request decodes between them, and the prompt's log-probabilities are
    transformers' log_softmax."""
    from raytp.runtime import engine

    _, model, group = tiny
    monkeypatch.setattr(engine, "PROMPT_SCORES_PER_CHUNK", 6 * VOCAB + 5)
    prompt = [(13 * i) % VOCAB for i in range(1, 21)]  # 20 tokens: chunks of 6, 6, 6, 2
    params = SamplingParams(max_tokens=30)

    def join(event, submit, seen):
        if event.request_id == "a" and len(tokens_of(seen, "a")) == 2:
            submit(Add(Request("echo", prompt, SamplingParams(max_tokens=1, prompt_logprobs=1))))

    seen, _ = run_loop(group, [Add(Request("a", [1, 2, 3], params))], join)
    chunks = [e.prompt_logprobs for e in seen if e.request_id == "echo" and e.prompt_logprobs]
    assert [len(c) for c in chunks] == [6, 6, 6, 1]  # 19 scored: every position whose next token is the prompt's
    ids = [e.request_id for e in seen if e.token_id is not None or e.prompt_logprobs]
    first, last = ids.index("echo"), len(ids) - 1 - ids[::-1].index("echo")
    assert ids[first:last].count("a") >= 3  # a decoded between the chunks
    assert tokens_of(seen, "a") == reference(model, [1, 2, 3], params, 30)
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([prompt])).logits[0].double(), -1)
    scored = [chosen for c in chunks for chosen, _ in c]
    assert scored == pytest.approx([want[t, prompt[t + 1]].item() for t in range(len(prompt) - 1)], abs=1e-4)
