"""Activation-quantized matmuls (FP8_DYNAMIC, W8A8) on Llama-3.1-8B's shapes, per batch size, against the weight-only
FP8 kernel and bf16 cuBLAS: the measurement that sets raytp.kernels.act_quant_matmul.WEIGHT_ONLY_MAX_ROWS.

    python benchmarks/act_quant_matmul.py [--rows 1,2,4,8,16,32,64] [--out results.json]

Microseconds per call, each the whole call as a layer makes it (per-token quantization of x included), timed inside
one CUDA graph of back-to-back calls cycling through enough weight copies (> 4x the L2 cache) that every call reads
its weight from HBM, as a decode step does.
"""

import argparse
import json

import torch
import torch.nn.functional as F

from raytp.kernels import act_quant_matmul as aq
from raytp.kernels.fp8_matmul import fp8_linear

SHAPES = [("qkv", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]
L2_BYTES = 60 << 20


def weights(kind: str, out: int, cols: int) -> list[tuple]:
    copies = max(2, -(-4 * L2_BYTES // (out * cols * (2 if kind == "bf16" else 1))))
    made = []
    for _ in range(copies):
        w = torch.randn(out, cols, device="cuda") * 0.02
        if kind == "bf16":
            made.append((w.bfloat16(),))
        else:
            made.append(aq.quantize_per_token(w, torch.int8 if kind == "int8" else aq.E4M3))
    return made


CALLS = {
    "bf16": lambda x, w: F.linear(x, w[0]),
    "fp8 weight-only": lambda x, w: fp8_linear(x, *w),
    "fp8 _scaled_mm": lambda x, w: aq.act_quant_linear(x, *w),
    "int8 _int_mm": lambda x, w: aq.act_quant_linear(x, *w),
}
KINDS = {"bf16": "bf16", "fp8 weight-only": "fp8", "fp8 _scaled_mm": "fp8", "int8 _int_mm": "int8"}


def time_us(call, x, ws, repeats: int = 5) -> float:
    for w in ws:  # warm-up off the capture (cuBLAS workspaces, Triton compilation)
        call(x, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in ws:
            call(x, w)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (repeats * len(ws))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,2,4,8,16,32,64")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    results = []
    for name, out, cols in SHAPES:
        for label, call in CALLS.items():
            ws = weights(KINDS[label], out, cols)
            for r in rows:
                x = torch.randn(r, cols, device="cuda", dtype=torch.bfloat16)
                results.append(dict(shape=name, path=label, rows=r, us=round(time_us(call, x, ws), 2)))
            del ws
    print(f"{'shape':8} {'path':16} " + " ".join(f"{r:>8}" for r in rows))
    for name, _, _ in SHAPES:
        for label in CALLS:
            us = [x["us"] for x in results if x["shape"] == name and x["path"] == label]
            print(f"{name:8} {label:16} " + " ".join(f"{u:8.1f}" for u in us))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
