"""Driver.submit without Ray: a request is checked before it reaches the leader, stop strings end it, and a request
that fails on the ranks is logged once, on one line carrying its id."""

from __future__ import annotations

import asyncio
import logging
import types

import pytest

from raytp.actors.driver import Driver
from raytp.runtime.engine import Add, Cancel, TokenEvent
from raytp.runtime.errors import RequestError
from raytp.runtime.sampling import SamplingParams
from raytp.serving.metrics import ServingMetrics


class FakeLeader:
    """Answers each Add with `script(request_id)`'s events, as the leader's event pump would deliver them."""

    def __init__(self, driver: Driver, script):
        self.driver, self.script, self.commands = driver, script, []
        self.submit = types.SimpleNamespace(remote=self._submit)

    def _submit(self, command):
        self.commands.append(command)
        if isinstance(command, Add):
            for e in self.script(command.request.id):
                self.driver.streams[command.request.id].put_nowait(e)
        done = asyncio.get_running_loop().create_future()  # awaitable, like the ObjectRef Ray returns
        done.set_result(None)
        return done


def fake_driver(script) -> Driver:
    """A Driver on a synthetic model (no tokenizer) whose leader is `FakeLeader(script)`."""
    d = object.__new__(Driver)
    d.settings = types.SimpleNamespace(model="synthetic:test", max_context=16, max_batch=2, draft_model=None)
    d.config = types.SimpleNamespace(vocab_size=100, eos_token_ids={2}, mtp_layers=0)
    d.tokenizer, d.harmony, d.streams, d.max_queue, d.ready, d.down = None, None, {}, 0, asyncio.Event(), None
    d.metrics, d._answering = ServingMetrics(), 0
    d.ready.set()
    d.group = types.SimpleNamespace(leader=FakeLeader(d, script))
    return d


async def items(driver: Driver, *args, **kw) -> list[dict]:
    return [item async for item in driver.submit(*args, **kw)]


def test_a_request_that_fails_on_the_ranks_is_logged_once_with_its_id(caplog):
    async def run():
        # the one error a rank reports inside a request's events: its grammar failed while decoding
        d = fake_driver(lambda rid: [TokenEvent(rid, 5), TokenEvent(rid, None, "error", error="grammar failed")])
        with pytest.raises(RequestError, match="grammar failed"):
            await items(d, [1, 2], SamplingParams(max_tokens=4))
        return d.group.leader.commands[0].request.id
    with caplog.at_level(logging.INFO, logger="raytp"):
        rid = asyncio.run(run())
    failed = [r for r in caplog.records if r.name == "raytp" and r.levelno >= logging.WARNING]
    assert len(failed) == 1 and rid in failed[0].getMessage() and "grammar failed" in failed[0].getMessage()
    assert "\n" not in failed[0].getMessage()


def test_a_bad_request_never_reaches_the_leader():
    async def run():
        d = fake_driver(lambda rid: [])
        for params, param in [(SamplingParams(top_k=101), "top_k"), (SamplingParams(max_tokens=15), "max_tokens")]:
            with pytest.raises(RequestError) as e:
                await items(d, [1, 2], params)
            assert e.value.param == param
        return d
    d = asyncio.run(run())
    assert d.group.leader.commands == [] and d.streams == {}


def test_finish_and_token_ids_come_through():
    async def run():
        d = fake_driver(lambda rid: [TokenEvent(rid, 5), TokenEvent(rid, 6), TokenEvent(rid, 7, "length")])
        out = await items(d, [1, 2], SamplingParams(max_tokens=3))
        return d, out
    d, out = asyncio.run(run())
    assert out[-1]["finish"] == "length" and out[-1]["token_ids"] == [5, 6, 7] and out[-1]["prompt_tokens"] == 2
    assert not any(isinstance(c, Cancel) for c in d.group.leader.commands)  # it ended on the ranks: nothing to free


class FakeRank:
    """Records `prepare_grammar` calls, as a rank compiles a grammar before the request is sent."""

    def __init__(self, leader: FakeLeader):
        self.leader, self.prepared = leader, []
        self.prepare_grammar = types.SimpleNamespace(remote=self._prepare)

    async def _prepare(self, request_id, grammar):
        self.prepared.append((request_id, len(self.leader.commands)))  # what the leader had got by then
        return None


def constrained_driver(model_dir, script) -> Driver:
    """`fake_driver` on a model with a tokenizer, and two ranks that take grammars."""
    from raytp.model.config import ModelConfig

    d = fake_driver(script)
    d.settings.max_context = 256
    d.config, d.tokenizer_dir = ModelConfig.from_file(model_dir), model_dir
    d._grammars, d._grammar_pool, d._compiling = None, None, 0
    d.group.workers = [FakeRank(d.group.leader), FakeRank(d.group.leader)]
    return d


def optional_integers(n: int) -> str:
    from raytp.runtime.constraints import json_schema_grammar

    return json_schema_grammar({"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(n)}})


def test_every_rank_compiles_a_grammar_before_its_request_is_sent(smollm2_dir):
    async def run():
        d = constrained_driver(smollm2_dir, lambda rid: [TokenEvent(rid, 90, "stop")])
        await items(d, [1, 2], SamplingParams(max_tokens=4, grammar=optional_integers(3)))
        return d
    d = asyncio.run(run())
    rid = d.group.leader.commands[0].request.id
    assert [rank.prepared for rank in d.group.workers] == [[(rid, 0)], [(rid, 0)]]  # before the Add, once each


@pytest.mark.parametrize("case", ["time", "size", "invalid"])
def test_a_grammar_past_a_bound_or_invalid_is_refused_and_never_reaches_a_rank(smollm2_dir, monkeypatch, case):
    from raytp.actors import driver
    from raytp.runtime import constraints

    grammar = optional_integers(1500 if case != "invalid" else 1)
    if case == "time":
        monkeypatch.setattr(driver, "GRAMMAR_COMPILE_S", 0.01)  # the schema takes seconds to compile
    elif case == "size":
        monkeypatch.setattr(constraints, "GRAMMAR_MAX_CHARS", len(grammar) - 1)
    else:
        grammar = grammar.replace('"type":"integer"', '"type":"nonsense"')
        assert "nonsense" in grammar

    async def run():
        d = constrained_driver(smollm2_dir, lambda rid: [TokenEvent(rid, 90, "stop")])
        with pytest.raises(RequestError) as e:
            await items(d, [1, 2], SamplingParams(max_tokens=4, grammar=grammar))
        return d, e.value
    d, error = asyncio.run(run())
    assert error.param == "response_format" and "\n" not in str(error)
    assert {"time": "within 0.01 s", "size": f"more than the {len(grammar) - 1}",
            "invalid": "nonsense"}[case] in str(error)
    assert d.group.leader.commands == [] and all(rank.prepared == [] for rank in d.group.workers)
