"""`raytp bench --profile`: where each rank's decode step goes, measured by torch.profiler in the running loop.

After the timed runs, the bench runs one more batch and every rank profiles a few of its decode steps from inside
its token loop (`StepProfiler`, handed to `Worker.watch_steps`): the profiler starts one step before the first
profiled one (its start-up stays out of the figures), and a step is the span from one end of step to the next on
the rank's own thread, so it holds everything the rank does: the command broadcast, the forward (graph replay or
eager kernels), sampling and its host sync.

Every event of the device (kernels, copies and memsets on a GPU rank; torch ops on the token loop's thread on a
CPU rank) gets one class from its name (`PATTERNS`, first match wins):

    gemm        weight GEMMs: cuBLAS/cuBLASLt/CUTLASS matmul kernels, aten::linear/mm/addmm, dequantizing GEMMs,
                the MXFP4 experts' kernels
    attention   the token mixers: attention (raytp's Triton decode kernels, SDPA, flash/cuDNN/FMHA) and linear
                attention (fla-core's gated delta rule kernels)
    allreduce   every collective: all-reduce (NCCL, torch symmetric memory, raytp's host-staged kernel and its
                CPU path), the sampler's all-gather and the command broadcast
    small       everything else: norms, RoPE, SwiGLU, embedding gathers, sampling, elementwise ops, copies

and `idle` is the step's time when the device runs none of them (the step minus the union of the events), e.g. a
GPU waiting for the host, or a CPU rank's loop thread in Python between ops. Where events overlap (nested torch
ops on a CPU rank, kernels of two streams), the time belongs to the event that started first: a parent op's
class covers its children. So the classes and idle add up to the step exactly.

With CUDA graphs, CUPTI traces the kernels of a graph replay one by one (it does with torch 2.11 and CUDA 13). Each
rank's row says whether its steps replayed graphs ("graph") or launched kernels ("eager"); graph steps in which no
kernel was traced are flagged (`kernels_unseen`: their time would all read as idle), and `--no-cuda-graphs`
profiles eager steps instead.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile, record_function

CLASSES = ("gemm", "attention", "allreduce", "small", "idle")
LABELS = {"gemm": "weight GEMMs", "attention": "attention", "allreduce": "all-reduce", "small": "small kernels",
          "idle": "idle"}

# (class, regular expression searched in the event name, case-insensitive); the first match wins, no match: small.
PATTERNS = (
    ("allreduce", r"nccl|all_?reduce|all_?gather|c10d::|gloo|symm_mem|multimem|one_shot|two_shot|hoststaged"
                  r"|symmetric_memory|cross_device_reduce"),
    ("attention", r"attention|attn|fmha|flash|sdpa|_decode_split_kernel|_decode_merge_kernel"
                  r"|delta_rule|chunk_fwd_kernel|chunk_scaled_dot_kkt|solve_tril|recompute_w_u"),
    ("gemm", r"gemm|gemv|matmul|linear|nvjet|cutlass|xmma|splitkreduce|aten::(mm|addmm|bmm|baddbmm)$|scaled_mm"
             r"|dequant|marlin|gptq|awq|mxfp4"),
)
_COMPILED = tuple((cls, re.compile(p, re.IGNORECASE)) for cls, p in PATTERNS)

STEP_MARK = "raytp.step"  # the user annotation around each profiled step
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")  # chrome-trace categories of GPU work
CPU_CATEGORIES = ("cpu_op", "user_annotation")
SKIP_STEPS = 2  # the prefill step, then the step the profiler starts in


def tokens_for(steps: int) -> int:
    """Tokens per request of a run that profiles `steps` steps: the skipped steps, those, one to end the last on."""
    return SKIP_STEPS + steps + 1 if steps else 0


def classify(name: str) -> str:
    """The class of one kernel or op, by its name."""
    for cls, pattern in _COMPILED:
        if pattern.search(name):
            return cls
    return "small"


@dataclass(frozen=True)
class Span:
    """One kernel or op: its name, start and duration in microseconds."""

    name: str
    start: float
    dur: float


def breakdown(spans: Iterable[Span], start: float, end: float) -> dict[str, float]:
    """Microseconds of [start, end) in each class of `CLASSES`, summing to end - start.

    Time covered by several spans belongs to the one that started first (the longer one on a tie: a parent op);
    time covered by none is idle."""
    out = dict.fromkeys(CLASSES, 0.0)
    cursor = start  # everything before it is attributed
    for s in sorted(spans, key=lambda s: (s.start, -s.dur)):
        lo, hi = max(s.start, cursor), min(s.start + s.dur, end)
        if hi > lo:
            out[classify(s.name)] += hi - lo
            cursor = hi
    out["idle"] = (end - start) - sum(out[c] for c in CLASSES if c != "idle")
    return out


def trace_steps(trace: dict, device: str) -> list[dict]:
    """Per profiled step of a chrome trace (torch.profiler's export): the step and each class in milliseconds, each
    class's share of the step, and the device events and CUDA graph launches it holds. `device` is "cuda" (classify GPU kernels, copies and
    memsets) or "cpu" (classify torch ops on the thread that marked the steps)."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    marks = sorted((e for e in events if e["name"] == STEP_MARK and e.get("cat") == "user_annotation"),
                   key=lambda e: e["ts"])
    if not marks:
        raise ValueError(f"the trace has no {STEP_MARK!r} annotation: no step was profiled")
    if device == "cuda":
        spans = [e for e in events if e.get("cat") in DEVICE_CATEGORIES]
    else:
        spans = [e for e in events if e.get("cat") in CPU_CATEGORIES and e["name"] != STEP_MARK
                 and e.get("tid") == marks[0].get("tid")]
    spans = [Span(e["name"], e["ts"], e.get("dur", 0.0)) for e in spans]
    launches = [e["ts"] for e in events if e.get("cat") == "cuda_runtime" and e["name"].startswith("cudaGraphLaunch")]
    steps = []
    for m in marks:
        start, end = m["ts"], m["ts"] + m["dur"]
        inside = [s for s in spans if s.start < end and s.start + s.dur > start]
        us = breakdown(inside, start, end)
        steps.append({"step_ms": (end - start) / 1000, **{f"{c}_ms": us[c] / 1000 for c in CLASSES},
                      **{f"{c}_share": us[c] / (end - start) for c in CLASSES},
                      "events": len(inside), "graph_launches": sum(start <= t < end for t in launches)})
    return steps


def summarize(steps: list[dict]) -> dict:
    """One rank's profile: the mean step and class times over its steps, each class's share of the mean step, how it
    decoded, and the steps themselves."""
    mean = {k: sum(s[k] for s in steps) / len(steps) for k in ("step_ms", *(f"{c}_ms" for c in CLASSES))}
    graph = any(s["graph_launches"] for s in steps)
    return {**mean, **{f"{c}_share": mean[f"{c}_ms"] / mean["step_ms"] for c in CLASSES},
            "decode": "graph" if graph else "eager",
            "kernels_unseen": graph and not any(s["events"] for s in steps), "steps": steps}


class StepProfiler:
    """A `Worker.watch_steps` watcher: profiles `steps` decode steps of the batch of `request_ids` (one id or
    several), counted from the step in which the last of them got its first token (so every request is decoding:
    no prefill of a late one and no capture of a larger batch's graph in the profiled steps), after `SKIP_STEPS`,
    and returns `summarize` of them (plus the gzipped chrome trace if `keep_trace`).

    Called on the token loop's thread at the end of every step that made events."""

    def __init__(self, request_ids: str | Iterable[str], steps: int, device: str, keep_trace: bool = False):
        self.waiting = {request_ids} if isinstance(request_ids, str) else set(request_ids)  # no token yet
        self.steps, self.device, self.keep_trace = steps, device, keep_trace
        self.seen = 0  # steps ended since the whole batch decodes, the step it began in included
        self.prof: profile | None = None
        self.mark: record_function | None = None

    def __call__(self, events) -> dict | None:
        if not self.seen:
            self.waiting -= {e.request_id for e in events}
            if self.waiting:
                return None
        self.seen += 1
        if self.seen < SKIP_STEPS:
            return None
        if self.seen == SKIP_STEPS:  # the step that ends now started before the profiler: not profiled
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device == "cuda" else [])
            self.prof = profile(activities=activities)
            self.prof.start()
            return None
        if self.mark is not None:  # the end of a profiled step
            self.mark.__exit__(None, None, None)
            self.mark = None
        if self.seen <= SKIP_STEPS + self.steps:  # the start of the next one
            self.mark = record_function(STEP_MARK)
            self.mark.__enter__()
            return None
        return self._finish()

    def _finish(self) -> dict:
        if self.device == "cuda":
            torch.cuda.synchronize()  # the last step's kernels are in the trace
        self.prof.stop()
        fd, path = tempfile.mkstemp(suffix=".json", prefix="raytp-profile-")
        os.close(fd)
        try:
            self.prof.export_chrome_trace(path)
            with open(path, "rb") as f:
                raw = f.read()
        finally:
            os.unlink(path)
        self.prof = None
        result = summarize(trace_steps(json.loads(raw), self.device))
        if self.keep_trace:
            result["trace_gz"] = gzip.compress(raw, compresslevel=3)
        return result
