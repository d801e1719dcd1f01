"""The Ray runtime end to end on CPU: real actors, real shared memory, the real CLI.

The run's Ray head (tests/conftest.py) serves every test.
"""

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import ray

from raytp.actors.driver import DriverActor
from raytp.actors.group import GroupSettings
from raytp.parallel.devices import parse_devices
from raytp.runtime.options import RuntimeOptions
from raytp.runtime.sampling import SamplingParams
from tests.util import raytp_segments, transformers_greedy

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def connected(ray_head):
    """This process joined to the run's Ray head (tests/conftest.py), as the driver actor's tests need."""
    ray.init(address=ray_head.address, logging_level="WARNING", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def expected_greedy(smollm2_dir):
    return transformers_greedy(smollm2_dir, PROMPT, 32)


def raytp_cli(*args, env_extra=None, timeout=300):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "raytp", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


# Gloo between Ray actor processes, through the CLI, on the uneven split whose third rank holds no heads; the
# host-staged backend on the same split is the driver's below (test_the_driver_gives_transformers_greedy_tokens).
# Splits of 1 to 12 ranks, past the 8 a peer group allows, are checked in process against transformers
# (tests/test_smollm2.py), the host-staged all-reduce alone at 1 to 12 ranks in tests/test_comm.py.
def test_generate_matches_transformers(ray_head, expected_greedy):
    before = raytp_segments()
    devices = "cpu@3GiB,cpu@2GiB,cpu@1GiB"
    # RAYTP_CHECK_IDENTICAL makes every rank compare its bits after every all-reduce; a mismatch fails the run
    r = raytp_cli("generate", "--model", "smollm2", "--devices", devices, "--comm", "gloo", "--prompt", PROMPT,
                  "--temperature", "0", "--dtype", "float32", "--max-tokens", "32", "--json",
                  "--address", ray_head.address, env_extra={"RAYTP_CHECK_IDENTICAL": "1"})
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["token_ids"] == expected_greedy
    assert result["generated_tokens"] == len(expected_greedy)
    assert result["backend"] == "gloo" and len(result["plan"]["ranks"]) == len(parse_devices(devices))
    assert raytp_segments() <= before


@pytest.fixture(scope="module")
def driver(connected, smollm2_dir):
    """The driver actor of SmolLM2 on the uneven split, its ranks in Ray actor processes on one node (so the
    host-staged backend), every rank comparing its bits with every other's after every all-reduce."""
    settings = GroupSettings(model="smollm2", devices=tuple(parse_devices("cpu@3GiB,cpu@2GiB,cpu@1GiB")),
                             dtype="float32", max_batch=4, max_context=512, timeout_s=10, progress=False,
                             options=RuntimeOptions(check_identical=True))
    d = DriverActor.remote(settings)
    ray.get(d.start.remote())
    yield d
    ray.get(d.shutdown.remote())


def submit(driver, prompt, max_tokens):
    """The driver's streaming `submit` of `prompt`, greedy, as the CLI calls it."""
    return driver.submit.remote(ray.get(driver.encode.remote(prompt=prompt)), SamplingParams(max_tokens=max_tokens))


def collect(driver, prompt, max_tokens):
    *_, final = [ray.get(ref) for ref in submit(driver, prompt, max_tokens)]
    return final


def test_the_driver_gives_transformers_greedy_tokens(driver, expected_greedy):
    assert ray.get(driver.info.remote())["backend"] == "hoststaged"
    assert collect(driver, PROMPT, 32)["token_ids"] == expected_greedy


def test_four_concurrent_requests_return_what_each_returns_alone(driver):
    prompts = [PROMPT, "1, 2, 3, 4,", "Water boils at", "My favourite book is"]
    alone = [collect(driver, p, 20 + 5 * i)["token_ids"] for i, p in enumerate(prompts)]

    async def together():
        async def one(p, n):
            items = [await ref async for ref in submit(driver, p, n)]
            return items[-1]["token_ids"]
        return await asyncio.gather(*(one(p, 20 + 5 * i) for i, p in enumerate(prompts)))

    assert asyncio.run(together()) == alone


def test_killed_worker_fails_the_request_fast_then_the_group_recovers(driver):
    before = raytp_segments()
    victim = ray.get(driver.info.remote())["ranks"][1]["pid"]
    stream = submit(driver, PROMPT, 400)
    first = ray.get(next(stream))  # generation is under way
    assert "text" in first
    os.kill(victim, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(Exception, match=r"rank 1 \(cpu@2GiB\) failed"):
        for ref in stream:
            ray.get(ref)
    assert time.monotonic() - t0 < 10
    # the driver rebuilds the group; the next request succeeds
    assert collect(driver, PROMPT, 8)["generated_tokens"] == 8
    assert raytp_segments() <= before


def test_prompt_longer_than_the_context_is_refused(driver):
    with pytest.raises(Exception, match=r"prompt has \d+ tokens but the context holds 512"):
        collect(driver, "word " * 600, 4)


def test_ray_job_submit_runs_generate_with_a_draft_model(ray_head, expected_greedy, smollm2_dir):
    """`raytp generate` as a Ray job, SmolLM2 drafting for itself, both split over two ranks: transformers' greedy
    tokens, nearly every drafted token accepted, the draft's share planned on each rank; the host-staged group's
    shared memory gone once the job ends."""
    before = raytp_segments()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run(
        ["ray", "job", "submit", "--address", ray_head.dashboard, "--working-dir", repo, "--",
         "python", "-m", "raytp", "generate", "--model", "smollm2", "--devices", "cpu*2", "--speculate",
         f"draft:{smollm2_dir}", "--prompt", PROMPT, "--temperature", "0", "--dtype", "float32", "--max-tokens", "32",
         "--json"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_AUTH_MODE": "disabled"}, cwd=repo)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith('{"text"')))
    assert result["token_ids"] == expected_greedy
    assert 0.9 * result["drafted_tokens"] <= result["accepted_tokens"] and result["drafted_tokens"] >= 16
    assert [rank["weight_bytes"] > 0 for rank in result["draft_plan"]["ranks"]] == [True, True]
    assert result["backend"] == "hoststaged" and raytp_segments() <= before


def test_more_ranks_than_the_cluster_has_are_refused_in_one_line(ray_head):
    """Refused once the cluster is known (what is refused before Ray is tested in process: tests/test_cli_args.py)."""
    r = raytp_cli("generate", "--prompt", "hi", "--dtype", "float32", "--devices", "cpu*64", "--address",
                  ray_head.address, "--model", "smollm2", timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert re.search(r"asks for 64 cpu ranks, the Ray cluster has \d+ CPUs", r.stderr), r.stderr
