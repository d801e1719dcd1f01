"""The communicator factory's phases, its fall-backs, and the typed run-time options (CPU only, no Ray)."""

import os
from dataclasses import fields

import pytest
import torch

from raytp.cli import build_parser
from raytp.kernels import dispatch
from raytp.parallel.comm.base import IdentityCheckingCommunicator
from raytp.parallel.comm.factory import AUTO_SIZES, CommPlan, open_group
from raytp.parallel.comm.hoststaged import HostStagedCommunicator
from raytp.parallel.comm.shm import SHM_DIR
from raytp.runtime.options import RuntimeOptions
from tests.test_comm import run_ranks

CPU = torch.device("cpu")


def open_all(plan: CommPlan) -> tuple[list, list[dict]]:
    """Drive every rank through the phases as raytp.actors.group does, ranks as threads: (communicators, what
    each rank's finish answered)."""
    openings = [open_group(plan, r, CPU) for r in range(plan.world_size)]
    for phase, ranks in (("create", plan.creators), ("attach", plan.attachers), ("unlink", plan.creators)):
        run_ranks(len(ranks), lambda i: openings[ranks[i]], lambda o: o.step(phase))
    answers = run_ranks(plan.world_size, lambda r: openings[r], lambda o: o.step("finish"))
    return [o.comm for o in openings], answers


@pytest.mark.parametrize("world_size", [1, 3])
def test_hoststaged_opens_in_phases_and_leaves_no_name(world_size):
    plan = CommPlan.make("hoststaged", [list(range(world_size))], None, 10.0, check_identical=True)
    assert (plan.creators, plan.attachers) == ([0], list(range(1, world_size)))
    comms, answers = open_all(plan)
    assert not os.path.exists(os.path.join(SHM_DIR, plan.segments[0]))  # unlinked once every rank mapped it
    assert all(a == {"backend": "hoststaged", "why": "", "notes": [], "timings": {}, "table": []} for a in answers)
    assert all(isinstance(c, IdentityCheckingCommunicator) for c in comms)
    sums = run_ranks(world_size, lambda r: comms[r], lambda c: c.all_reduce(torch.full((5,), float(c.rank + 1))))
    assert all(torch.equal(s, torch.full((5,), float(sum(range(1, world_size + 1))))) for s in sums)
    for c in comms:
        c.close()
        c.close()  # idempotent


def test_auto_without_nccl_falls_back_to_hoststaged_on_every_rank_and_says_why():
    plan = CommPlan.make("measured", [[0, 1]], "tcp://127.0.0.1:1", 10.0)
    comms, answers = open_all(plan)
    assert [a["backend"] for a in answers] == ["hoststaged", "hoststaged"]
    assert all("NCCL needs CUDA" in a["notes"][0] for a in answers), answers
    assert all(isinstance(c, HostStagedCommunicator) for c in comms)
    for c in comms:
        c.close()


def test_p2p_and_nccl_plans_open_in_one_phase_and_bench_timing_adds_the_segment():
    for backend in ("nccl", "p2p"):
        plan = CommPlan.make(backend, [[0, 1, 2]], "tcp://127.0.0.1:1", 10.0)
        assert (plan.segments, plan.creators, plan.attachers) == ((), [0, 1, 2], [])
        timed = CommPlan.make(backend, [[0, 1, 2]], "tcp://127.0.0.1:1", 10.0, time_backends=True)
        assert len(timed.segments) == 1 and (timed.creators, timed.attachers) == ([0, 1, 2], [1, 2])


def test_timing_every_backend_reports_a_table_and_keeps_the_plans_own():
    plan = CommPlan.make("hoststaged", [[0, 1]], "tcp://127.0.0.1:1", 10.0, time_backends=True)
    comms, answers = open_all(plan)
    assert all(isinstance(c, HostStagedCommunicator) for c in comms)
    for a in answers:  # without CUDA only host-staged can run: it is timed alone, and the table says so
        assert a["backend"] == "hoststaged" and "NCCL needs CUDA" in a["notes"][0]
        assert list(a["timings"]) == ["hoststaged"] and sorted(a["timings"]["hoststaged"]) == list(AUTO_SIZES)
        assert len(a["table"]) == len(AUTO_SIZES) and all(line.endswith("-> hoststaged") for line in a["table"])
    assert answers[0]["timings"] == answers[1]["timings"]  # the slowest rank's figures, on every rank
    for c in comms:
        c.close()


def test_unknown_phase_is_an_error_that_names_the_phases():
    with pytest.raises(ValueError, match="create, attach, unlink, finish"):
        open_group(CommPlan.make("hoststaged", [[0]], None, 1.0), 0, CPU).step("open")


def test_options_come_from_flags_over_the_environment(monkeypatch):
    monkeypatch.setenv("RAYTP_TRITON", "0")
    monkeypatch.setenv("RAYTP_CHECK_IDENTICAL", "1")
    assert RuntimeOptions.from_env() == RuntimeOptions(triton=False, check_identical=True)
    for command in ("generate --prompt x", "chat", "serve", "bench"):
        args = build_parser().parse_args([*command.split(), "--no-cuda-graphs"])
        assert args.options == RuntimeOptions(triton=False, cuda_graphs=False, check_identical=True), command
    assert args.options.flags() == ["--no-triton", "--no-cuda-graphs", "--check-identical"]
    monkeypatch.delenv("RAYTP_TRITON")
    monkeypatch.delenv("RAYTP_CHECK_IDENTICAL")
    assert build_parser().parse_args(["serve"]).options == RuntimeOptions()
    monkeypatch.setenv("RAYTP_CUDA_GRAPHS", "0")
    assert build_parser().parse_args(["serve"]).options.flags() == ["--no-cuda-graphs"]


@pytest.mark.parametrize("flag", ["--routed-quantized-experts", "--weight-only-act-quant", "--fused-moe",
                                  "--grouped-mm-experts", "--no-triton-fp8-kv", "--no-triton-prefill-dequant",
                                  "--no-gpu-hoststaged"])
def test_kernel_choices_are_no_flags(flag, capsys):
    """Which kernel runs is chosen by measurement, per device, at load: only debugging switches are options."""
    assert [f.name for f in fields(RuntimeOptions)] == ["triton", "cuda_graphs", "check_identical"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", flag])
    assert f"unrecognized arguments: {flag}" in capsys.readouterr().err


def test_triton_switch_is_per_process(monkeypatch):
    monkeypatch.setattr(dispatch, "_enabled", dispatch._enabled)  # restored after the test
    dispatch.set_triton(False)
    assert not dispatch.use_triton(torch.zeros(1))
    dispatch.set_triton(True)
    assert dispatch._enabled == (dispatch.triton is not None)


def test_no_kernel_runs_on_cpu_tensors():
    t = torch.zeros(1, dtype=torch.bfloat16)
    assert not dispatch.use_triton(t) and not dispatch.use_triton_fp8_kv(t) and not dispatch.grouped_mm_runs(t)
