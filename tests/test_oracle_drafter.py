"""The benchmark drafter (`oracle:RATE[:K]`, raytp.runtime.oracle) on CPU ranks: a row of the same prompt and sampling
as a finished one replays its tokens as drafts, right with probability RATE per position; the tokens are plain
decoding's at 1 and 2 ranks; the acceptance per position comes out near RATE; bench labels its rows, and every
other front end refuses it naming the value."""

import dataclasses
import json

import pytest
import torch
import transformers

from raytp import cli
from raytp.runtime.engine import Add, Request
from raytp.runtime.errors import RequestError
from raytp.runtime.oracle import Scripts
from raytp.runtime.sampling import SamplingParams
from raytp.runtime.speculation import check_drafter, drafted_tokens, oracle_rate
from raytp.serving.openai_api import APIError, parse_completion
from tests.sharded import LocalGroup, shared_group
from tests.test_cli_checks import SMALL, refused
from tests.test_decode_loop import run_loop, tokens_of

VOCAB = 256
ROWS = 4  # SPECULATE_MAX_BATCH: every row of the batch may draft
TOKENS = 90  # per row: a few hundred positions checked per run, for the acceptance's band


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=128, num_hidden_layers=2, max_position_embeddings=256)
    path = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path


def group_of(tiny_dir, ranks: int) -> LocalGroup:
    return shared_group(tiny_dir, [1.0] * ranks, max_context=256, max_batch=ROWS)


@pytest.fixture(params=[1, 2], ids=["1-rank", "2-ranks"])
def group(request, tiny_dir):
    return group_of(tiny_dir, request.param)


PROMPTS = [[(7 * i + 3 * j) % VOCAB for j in range(12 + i)] for i in range(ROWS)]


def replayed(group, params: list[SamplingParams]):
    """Each row once (nothing scripted yet: plain steps), then again once it finished: (events of the second runs,
    events of the first)."""
    def again(event, submit, seen):
        if event.finish and event.request_id.startswith("first"):
            i = int(event.request_id.removeprefix("first"))
            submit(Add(Request(f"again{i}", PROMPTS[i], params[i], [])))

    seen, _ = run_loop(group, [Add(Request(f"first{i}", p, params[i], [])) for i, p in enumerate(PROMPTS)], again)
    return [e for e in seen if e.request_id.startswith("again")], [e for e in seen if e.request_id.startswith("first")]


def acceptance_per_position(events) -> tuple[float, int]:
    """(accepted over checked, checked): each draft checks its accepted tokens and its first wrong one."""
    accepted = sum(e.accepted for e in events if e.drafted)
    checked = accepted + sum(e.accepted < e.drafted for e in events if e.drafted)
    return accepted / checked, checked


def test_oracle_values_are_checked_naming_the_value():
    assert [drafted_tokens(v) for v in ("oracle:0.7", "oracle:0:2", "oracle:1:8")] == [4, 2, 8]
    assert oracle_rate("oracle:0.25:3") == 0.25
    for bad in ("oracle", "oracle:1.5", "oracle:-0.1", "oracle:x", "oracle:nan", "oracle:0.7:9", "oracle:0.7:0",
                "oracle:0.5:2:3"):
        with pytest.raises(RequestError, match="oracle:RATE") as e:
            SamplingParams(speculate=bad)
        assert repr(bad) in str(e.value) and e.value.param == "speculate"


def test_the_replayed_tokens_are_plain_decodings_greedy_and_seeded(group):
    """oracle:0.7: drafts accepted and rejected, and every row's tokens those of a run with drafting off."""
    params = [SamplingParams(max_tokens=TOKENS, speculate="oracle:0.7:4"),
              SamplingParams(temperature=0.9, seed=5, max_tokens=TOKENS, speculate="oracle:0.7:3"),
              SamplingParams(temperature=0.6, top_k=20, top_p=0.9, seed=9, max_tokens=TOKENS, speculate="oracle:0.7"),
              SamplingParams(max_tokens=TOKENS // 2, speculate="oracle:0.7:8")]
    fast, first = replayed(group, params)
    plain, _ = run_loop(group, [Add(Request(f"plain{i}", p, dataclasses.replace(params[i], speculate="off"), []))
                                for i, p in enumerate(PROMPTS)])
    assert not any(e.drafted for e in first)  # nothing was scripted yet
    for i in range(ROWS):
        assert tokens_of(fast, f"again{i}") == tokens_of(plain, f"plain{i}") == tokens_of(first, f"first{i}"), i
    steps = [(e.drafted, e.accepted) for e in fast if e.drafted]
    assert any(a == d for d, a in steps) and any(a < d for d, a in steps)


# One rank: which drafts the target accepts is the same at any split, whose drafts and verify steps the test above
# runs on 1 and 2 ranks
@pytest.mark.parametrize("rate, low, high", [(1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (0.5, 0.3, 0.7), (0.7, 0.55, 0.85)])
def test_the_acceptance_per_position_comes_out_near_the_rate(tiny_dir, rate, low, high):
    group = group_of(tiny_dir, 1)
    params = [SamplingParams(max_tokens=TOKENS, speculate=f"oracle:{rate}:4")] * ROWS
    fast, _ = replayed(group, params)
    measured, checked = acceptance_per_position(fast)
    assert checked >= (40 if rate == 0 else 150)  # at 0 the rows pause after failed drafts, and draft less
    assert low <= measured <= high, (measured, checked)


def test_a_row_that_left_its_script_drafts_nothing_more():
    scripts = Scripts()
    params = SamplingParams(speculate="oracle:1:3")
    drafter = scripts.drafter([1, 2], params, VOCAB)
    assert drafter.propose([1, 2, 5], 3) == []  # nothing scripted
    drafter.record([1, 2, 5, 6, 7, 8, 9])
    assert scripts.drafter([1, 2], params, VOCAB).propose([1, 2, 5], 3) == [6, 7, 8]
    assert drafter.propose([1, 2, 5, 6, 7, 8], 3) == [9]  # no further than scripted
    off_script = scripts.drafter([1, 2], params, VOCAB)
    assert off_script.propose([1, 2, 5, 4], 3) == []  # a token off the script: it belongs to another prefix now
    assert off_script.propose([1, 2, 5, 4, 8], 3) == []  # for good, though a later token matches again
    wrong = scripts.drafter([1, 2], SamplingParams(speculate="oracle:0:3"), VOCAB)
    assert wrong.propose([1, 2, 5], 3) == [7, 8, 9]  # each the scripted token + 1: certain to be rejected


def test_only_bench_takes_the_oracle(capsys):
    for command in (["generate", "--prompt", "hi"], ["chat"], ["serve"], ["plan"]):
        line = refused(capsys, *command, *SMALL, "--speculate", "oracle:0.7")
        assert "'oracle:0.7'" in line and "benchmark drafter" in line, command
    line = refused(capsys, "bench", *SMALL, "--speculate", "oracle:2")  # bench takes it, with a rate in [0, 1]
    assert "'oracle:2'" in line and "RATE in [0, 1]" in line
    with pytest.raises(RequestError, match="benchmark drafter"):
        check_drafter("oracle:0.5:4", None)  # what the driver checks for generate, chat, serve and the web chat
    with pytest.raises(APIError) as e:
        parse_completion({"model": "m", "prompt": "x", "speculate": "oracle:0.7"}, chat=False, model_id="m")
    assert (e.value.status, e.value.param) == (400, "speculate")
    assert "benchmark drafter" in e.value.message and "oracle:0.7" in e.value.message


def test_bench_labels_oracle_rows_and_reports_their_acceptance(ray_head, tmp_path):
    out = tmp_path / "bench"
    rc = cli.main(["bench", "--model", "synthetic:tiny", "--devices", "cpu*2", "--dtype", "float32", "--batch", "1",
                   "--prompt-len", "8", "--decode-tokens", "40", "--repeats", "2", "--allreduce-sizes", "64",
                   "--allreduce-iters", "5", "--comm", "hoststaged", "--speculate", "oracle:1.0:4", "--out", str(out),
                   "--address", ray_head.address])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    (d,) = results["runs"][0]["decode"]
    assert d["speculate"] == "oracle:1.0:4" and d["acceptance"] == d["position_acceptance"] == 1.0
    assert d["tokens_per_step"] > 3  # 4 drafted and the target's own, bar the run's ends
    assert d["same_tokens_as_plain"] is True
    (row,) = results["rows"]
    assert row["speculate"] == "oracle:1.0:4" and row["position_acceptance"] == 1.0
    summary = (out / "summary.md").read_text()
    assert "benchmark drafter" in summary and "`oracle:1.0:4`" in summary
