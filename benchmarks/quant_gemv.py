"""Decode GEMVs of Llama-3.1-8B's shapes with bf16, int4, int8 and FP8 weights: microseconds and GB/s of weights read.

    python benchmarks/quant_gemv.py [--rows 1,4,16] [--group-size 128] [--sweep] [--out results.json]

Each (shape, format, rows) is timed inside one CUDA graph of back-to-back calls that cycle through enough copies
of the weight (> 4x the L2 cache) that every call reads its bytes from HBM, as a decode step does. GB/s counts the
bytes a call must read: packed weights, scales and zero points (x and y are negligible). `--sweep` also times every
launch shape of the quantized kernels and prints the fastest per shape, to check the heuristic in `launch_for`.
The last table is one decoder layer (the four matmuls) and the 32-layer sum, against bf16.
"""

import argparse
import json

import torch
import torch.nn.functional as F

from raytp.kernels import dequant_matmul as dm
from raytp.kernels import fp8_matmul as f8

# Llama-3.1-8B on one rank: (name, out_features, in_features), fused as raytp fuses them
SHAPES = [("qkv", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]
LAYERS = 32
SWEEP = [dm.Launch(n, k, s) for n in (16, 32, 64) for k in (128, 256) for s in (1, 2, 4, 8)]


def make(fmt: str, out: int, cols: int, group_size: int):
    """One weight of `fmt`: (call(x, launch) -> y, bytes a call reads)."""
    dev = dict(device="cuda")
    if fmt == "bf16":
        w = torch.randn(out, cols, dtype=torch.bfloat16, **dev) * 0.02
        return (lambda x, launch=None: F.linear(x, w)), w.numel() * 2
    if fmt == "fp8":
        w = (torch.randn(out, cols, **dev) * 0.02).to(torch.float8_e4m3fn)
        s = torch.rand(out, 1, **dev) + 0.5
        return (lambda x, launch=None: f8.fp8_linear(x, w, s, launch=launch)), w.numel() + s.numel() * 4
    bits = 4 if fmt == "int4" else 8
    q = torch.randint(-2 ** 31, 2 ** 31 - 1, (out, cols * bits // 32), dtype=torch.int32, **dev)
    s = torch.rand(out, cols // group_size, dtype=torch.bfloat16, **dev) * 1e-3  # symmetric, as W4A16 usually is
    call = (lambda x, launch=None: dm.int_linear(x, q, s, None, bits=bits, group_size=group_size, launch=launch))
    return call, q.numel() * 4 + s.numel() * 2


def timed(calls, x, launch, iters: int) -> float:
    """Microseconds per call, `iters` calls cycling over `calls` in one CUDA graph."""
    for c in calls:
        c(x, launch)  # compile and warm outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(iters):
            calls[i % len(calls)](x, launch)
    graph.replay()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) * 1000 / (5 * iters)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,4,16", help="rows of x per call (decode batch)")
    p.add_argument("--formats", default="bf16,int4,int8,fp8")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--iters", type=int, default=64, help="calls per graph")
    p.add_argument("--sweep", action="store_true", help="also time every launch shape of the quantized kernels")
    p.add_argument("--out", default=None, help="write the measurements as JSON here")
    args = p.parse_args()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    print(f"# {torch.cuda.get_device_name(0)}, L2 {l2 >> 20} MiB, torch {torch.__version__}")
    results = []
    for name, out, cols in SHAPES:
        for fmt in args.formats.split(","):
            first, nbytes = make(fmt, out, cols, args.group_size)
            calls = [first] + [make(fmt, out, cols, args.group_size)[0] for _ in range(max(1, 4 * l2 // nbytes))]
            for rows in map(int, args.rows.split(",")):
                x = torch.randn(rows, cols, dtype=torch.bfloat16, device="cuda")
                us = timed(calls, x, None, args.iters)
                row = dict(shape=name, out=out, cols=cols, format=fmt, rows=rows, us=us, gbps=nbytes / us / 1e3)
                if args.sweep and fmt != "bf16":
                    best = min(((timed(calls, x, launch, args.iters), launch) for launch in SWEEP
                                if launch.block_k <= cols), key=lambda t: t[0])
                    row |= dict(best_us=best[0], best_launch=str(best[1]),
                                heuristic=str(dm.launch_for(rows, out, cols, 8 if fmt == "fp8" else
                                                            int(fmt[3:]), dm.sm_count(x.device))))
                results.append(row)
                print(json.dumps(row), flush=True)
            del calls, first
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print("\n| shape | rows | format | us | GB/s | vs bf16 |" + (" best us (launch) |" if args.sweep else ""))
    print("|---|---|---|---|---|---|" + ("---|" if args.sweep else ""))
    base = {(r["shape"], r["rows"]): r["us"] for r in results if r["format"] == "bf16"}
    for r in results:
        ref = base.get((r["shape"], r["rows"]))
        line = (f"| {r['shape']} {r['out']}x{r['cols']} | {r['rows']} | {r['format']} | {r['us']:.1f} | "
                f"{r['gbps']:.0f} | {ref / r['us']:.2f}x |" if ref else "")
        if args.sweep:
            line += f" {r['best_us']:.1f} ({r['best_launch']}) |" if "best_us" in r else " |"
        print(line)
    print(f"\n| rows | format | one layer us | {LAYERS} layers ms | vs bf16 |\n|---|---|---|---|---|")
    layer = {}
    for r in results:
        layer[(r["rows"], r["format"])] = layer.get((r["rows"], r["format"]), 0.0) + r["us"]
    for (rows, fmt), us in layer.items():
        ref = layer.get((rows, "bf16"))
        print(f"| {rows} | {fmt} | {us:.1f} | {us * LAYERS / 1000:.2f} | {f'{ref / us:.2f}x' if ref else '-'} |")


if __name__ == "__main__":
    main()
