"""The step profile of `raytp bench --profile` (raytp.bench.profile): classification by name, the breakdown of a step
against a brute-force reference, chrome-trace parsing, and the real profiler driven the way a rank's loop drives it.
The end-to-end run is tests/test_bench.py::test_bench_profile_on_two_cpu_ranks."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from raytp.bench.profile import CLASSES, SKIP_STEPS, STEP_MARK, Span, StepProfiler, breakdown, classify, trace_steps
from raytp.runtime.engine import TokenEvent


@pytest.mark.parametrize("name, cls", [
    # kernel names from a traced one-GPU 8B decode step (torch 2.11, CUDA 13)
    ("nvjet_sm90_tst_128x8_64x12_2x1_v_bz_splitK_TNT", "gemm"),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16>", "gemm"),
    ("_decode_split_kernel", "attention"),
    ("_decode_merge_kernel", "attention"),
    ("_add_rms_norm_kernel", "small"),
    ("_rope_cache_kernel", "small"),
    ("_swiglu_kernel", "small"),
    ("void at::native::(anonymous namespace)::indexSelectSmallIndex<c10::BFloat16, long, unsigned int>", "small"),
    ("Memcpy HtoD (Pageable -> Device)", "small"),
    # collectives: NCCL, torch symmetric memory, raytp's host-staged kernel and its CPU path, gloo
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "allreduce"),
    ("ncclDevKernel_AllGather_RING_LL", "allreduce"),
    ("void c10d::symmetric_memory::one_shot_all_reduce_kernel<c10::BFloat16, 16, 4>", "allreduce"),
    ("hoststaged_allreduce_bf16_t", "allreduce"),
    ("raytp::hoststaged_all_reduce", "allreduce"),
    ("c10d::allreduce_", "allreduce"),
    # other GEMM and attention kernels, eager SDPA and quantized GEMMs
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x64x64", "gemm"),
    ("void gemv2T_kernel_val<int, int, __nv_bfloat16, __nv_bfloat16, float, 128, 16, 4, 4, false>", "gemm"),
    ("packed_gemv_int4_bf16_s_8_2", "gemm"),
    ("void cutlass::device_kernel<cutlass3x_sm90_tensorop_gemm_e4m3_scaled_mm>", "gemm"),
    ("flash_fwd_splitkv_kernel", "attention"),
    ("_mxfp4_gate_up", "gemm"),  # raytp.kernels.mxfp4
    ("_mxfp4_down", "gemm"),
    ("fused_recurrent_gated_delta_rule_fwd_kernel", "attention"),  # fla-core's, Qwen3.5's linear attention
    ("chunk_gated_delta_rule_fwd_kernel_h_blockdim64", "attention"),
    ("chunk_fwd_kernel_o", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention"),
    # CPU ops
    ("aten::linear", "gemm"),
    ("aten::mm", "gemm"),
    ("aten::scaled_dot_product_attention", "attention"),
    ("aten::mul", "small"),
    ("aten::multinomial", "small"),
])
def test_classify(name, cls):
    assert classify(name) == cls


def _reference(spans: list[Span], start: int, end: int) -> dict[str, int]:
    """Unit by unit of an integer time grid: the class of the earliest-started span covering it (longer on a tie)."""
    out = dict.fromkeys(CLASSES, 0)
    for t in range(start, end):
        covering = [s for s in spans if s.start <= t < s.start + s.dur]
        out[classify(min(covering, key=lambda s: (s.start, -s.dur)).name) if covering else "idle"] += 1
    return out


def test_breakdown_nested_ops_count_for_their_parent():
    spans = [Span("aten::linear", 10, 30), Span("aten::t", 10, 2), Span("aten::mm", 14, 25),
             Span("aten::scaled_dot_product_attention", 50, 20), Span("aten::mul", 55, 5),
             Span("c10d::allreduce_", 80, 15)]
    assert breakdown(spans, 0, 100) == {"gemm": 30, "attention": 20, "allreduce": 15, "small": 0, "idle": 35}


def test_breakdown_clips_to_the_step():
    spans = [Span("nvjet_gemm", -10, 20), Span("ncclDevKernel_AllReduce", 95, 10)]
    assert breakdown(spans, 0, 100) == {"gemm": 10, "attention": 0, "allreduce": 5, "small": 0, "idle": 85}


@pytest.mark.parametrize("seed", range(5))
def test_breakdown_matches_a_brute_force_reference(seed):
    rng = random.Random(seed)
    names = ["nvjet_x", "_decode_split_kernel", "ncclDevKernel_AllReduce", "_add_rms_norm_kernel"]
    spans = [Span(rng.choice(names), rng.randrange(-20, 200), rng.randrange(0, 40)) for _ in range(40)]
    start, end = rng.randrange(0, 20), rng.randrange(150, 220)
    got = breakdown(spans, start, end)
    assert got == _reference(spans, start, end)
    assert sum(got.values()) == end - start


def _x(name, cat, ts, dur, tid=1):
    return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "tid": tid, "pid": 1}


def test_trace_steps_reads_the_device_rows_of_each_marked_step():
    trace = {"traceEvents": [
        _x(STEP_MARK, "user_annotation", 1000, 100), _x(STEP_MARK, "user_annotation", 1100, 200),
        _x("cudaGraphLaunch", "cuda_runtime", 1005, 5), _x("cudaGraphLaunch", "cuda_runtime", 1105, 5),
        _x("nvjet_gemm", "kernel", 1010, 40, tid=7), _x("ncclDevKernel_AllReduce", "kernel", 1050, 20, tid=7),
        _x("Memcpy DtoH (Device -> Pinned)", "gpu_memcpy", 1080, 10, tid=7),
        _x("aten::linear", "cpu_op", 1000, 90),  # host ops: not the device's time on a GPU rank
        _x("nvjet_gemm", "kernel", 1110, 150, tid=7),
        _x("nvjet_gemm", "kernel", 900, 50, tid=7),  # before the steps: ignored
        {"ph": "i", "name": "instant", "ts": 1000},
    ]}
    first, second = trace_steps(trace, "cuda")
    assert first == pytest.approx({"step_ms": 0.1, "gemm_ms": 0.04, "attention_ms": 0, "allreduce_ms": 0.02,
                                   "small_ms": 0.01, "idle_ms": 0.03, "gemm_share": 0.4, "attention_share": 0,
                                   "allreduce_share": 0.2, "small_share": 0.1, "idle_share": 0.3, "events": 3,
                                   "graph_launches": 1})
    assert second == pytest.approx({"step_ms": 0.2, "gemm_ms": 0.15, "attention_ms": 0, "allreduce_ms": 0,
                                    "small_ms": 0, "idle_ms": 0.05, "gemm_share": 0.75, "attention_share": 0,
                                    "allreduce_share": 0, "small_share": 0, "idle_share": 0.25, "events": 1,
                                    "graph_launches": 1})
    # on a CPU rank: the ops of the thread that marked the steps
    trace["traceEvents"].append(_x("aten::mm", "cpu_op", 1020, 30, tid=2))
    cpu = trace_steps(trace, "cpu")[0]
    assert (cpu["gemm_ms"], cpu["idle_ms"], cpu["events"]) == (pytest.approx(0.09), pytest.approx(0.01), 1)


def test_step_profiler_profiles_the_steps_after_the_first_token():
    """Driven as Worker._emit drives it: once per step, with that step's events, real work in between."""
    w, x = torch.randn(256, 256), torch.randn(4, 256)
    steps = 3
    profiler = StepProfiler("r", steps, "cpu", keep_trace=True)
    assert profiler([TokenEvent("other", 1)]) is None  # another request's steps come before
    result = None
    for n in range(1, SKIP_STEPS + steps + 2):
        for _ in range(20):
            F.linear(F.relu(x), w)
        result = profiler([TokenEvent("r", n)])
        if result is not None:
            break
    assert n == SKIP_STEPS + steps + 1 and result is not None
    assert len(result["steps"]) == steps and result["decode"] == "eager" and result["trace_gz"]
    for s in result["steps"]:
        assert all(s[f"{c}_ms"] >= 0 for c in CLASSES)
        assert sum(s[f"{c}_ms"] for c in CLASSES) == pytest.approx(s["step_ms"])
        assert sum(s[f"{c}_share"] for c in CLASSES) == pytest.approx(1)
        assert s["gemm_ms"] > s["small_ms"] > 0 and s["attention_ms"] == s["allreduce_ms"] == 0
    assert sum(result[f"{c}_share"] for c in CLASSES) == pytest.approx(1)


def test_step_profiler_waits_for_the_whole_batch():
    """With several requests the count starts once the last of them got a token: a late request's prefill (and a
    larger batch's graph capture) stays out of the profiled steps."""
    profiler = StepProfiler(["a", "b"], 1, "cpu")
    assert profiler([TokenEvent("a", 1)]) is None and profiler.seen == 0
    assert profiler([TokenEvent("a", 2)]) is None and profiler.seen == 0
    assert profiler([TokenEvent("a", 3), TokenEvent("b", 1)]) is None and profiler.seen == 1
