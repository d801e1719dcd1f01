"""The routed experts of one MoE layer at decode batch sizes: microseconds and GB/s of the selected experts' weights.

    python benchmarks/moe_gemv.py [--tokens 1,8,16] [--sweep] [--int4 | --int4-only | --mxfp4] [--out results.json]

Shapes are one whole layer on one GPU, bf16: Qwen3-30B-A3B (128 experts, top 8, hidden 2048, expert width 768) and
Mixtral-8x7B (8 experts, top 2, hidden 4096, width 14336). Each row is timed inside one CUDA graph of back-to-back
calls, each with its own routing, so that the selected experts change from call to call and (with Qwen3's 75 MB per
token over 60 MB of L2, Mixtral's 700 MB) are read from HBM as a decode step reads them. GB/s counts the bytes of the
distinct experts a call selects, gate, up and down (x and the outputs are negligible). Variants:

    triton   raytp.kernels.moe_gemv's routed kernels (GATE_UP_LAUNCH, DOWN_LAUNCH; with --sweep, each kernel's tiles
             below with the other's default)
    torch    the grouped torch version, eager (host sync per call: timed with events around a Python loop)
    gemv     cuBLAS over one dense matrix holding as many bytes as the selected experts: the bandwidth to beat

With --int4 (--int4-only: without the bf16 rows) the same shapes in w4a16 (groups of 128, symmetric), GB/s of the
selected experts' int4 bytes and scales, through raytp.kernels.routed_packed_gemv (the packed GEMV's routed launch).
With --mxfp4 only gpt-oss's MXFP4 experts (20b: 32 experts, 120b: 128, top 4, hidden and width 2880, biases), GB/s
of their bytes (half a byte a weight, a byte per 32), through raytp.kernels.mxfp4's token tiles and its per-pair GEMVs,
each with its default launch (with --sweep, each kernel's launches too); the line printed per shape gives the tiles'
default and best, and the pairs' best.
"""

import argparse
import json

import torch
import torch.nn.functional as F

from raytp.kernels import moe_gemv
from raytp.kernels.packed_gemv import pack_int, reserve
from raytp.kernels.routed_packed_gemv import StackedMMA, routed_packed_experts

SHAPES = {"qwen3-30b-a3b": (128, 8, 2048, 768), "mixtral-8x7b": (8, 2, 4096, 14336)}
CALLS = 8  # calls per graph, each with its own routing
SWEEP_GATE_UP = [moe_gemv.Launch(n, k, w) for n in (16, 32, 64) for k in (64, 128, 256) for w in (4, 8)]
SWEEP_DOWN = [moe_gemv.Launch(n, k, w) for n in (32, 64, 128) for k in (64, 128) for w in (4, 8)]
MXFP4_SHAPES = {"gpt-oss-20b": (32, 4, 2880, 2880), "gpt-oss-120b": (128, 4, 2880, 2880)}
SWEEP_PAIRS_GATE_UP = [moe_gemv.Launch(n, k, w) for n in (8, 16, 32) for k in (128, 256, 512) for w in (2, 4)
                       if n * k <= 8192]
SWEEP_PAIRS_DOWN = [moe_gemv.Launch(n, k, w) for n in (16, 32, 64) for k in (128, 256, 512) for w in (2, 4)
                    if n * k <= 16384]
SWEEP_MXFP4 = [moe_gemv.Launch(n, k, w) for n in (32, 64) for k in (128, 256, 512) for w in (4, 8)]


def graphed_us(fn, calls: int = CALLS) -> float:
    """Median microseconds per call of `fn(i)`, i = 0..calls-1, captured back to back in one CUDA graph."""
    for i in range(calls):
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return sorted(times)[len(times) // 2]


def routing(T: int, E: int, k: int, H: int):
    """CALLS calls' inputs (x, expert ids, routing weights) and the distinct experts a call selects, on average."""
    x = torch.randn(CALLS, T, H, device="cuda", dtype=torch.bfloat16)
    ids = torch.rand(CALLS, T, E, device="cuda").topk(k, dim=-1).indices
    weights = torch.rand(CALLS, T, k, device="cuda")
    return x, ids, weights, sum(len(ids[i].unique()) for i in range(CALLS)) / CALLS


def launches(default: tuple[moe_gemv.Launch, moe_gemv.Launch], sweeps: tuple[list, list],
             sweep: bool) -> list[tuple[moe_gemv.Launch, moe_gemv.Launch]]:
    """A kernel pair's default tiles, and with `sweep` each kernel's tiles of `sweeps` with the other's default."""
    if not sweep:
        return [default]
    return [default] + [(a, default[1]) for a in sweeps[0]] + [(default[0], b) for b in sweeps[1]]


def report(shape: str, T: int, timed: dict[str, float], nbytes: float, distinct: float, kernel: str,
           others: list[str]) -> list[dict]:
    """One row per variant; prints the default and best tiles of `kernel` and the `others` on one line."""
    best = min((v for v in timed if v.startswith(kernel)), key=timed.get)
    default = next(v for v in timed if v.startswith(kernel))  # the first timed: the default launch
    print(f"{shape} T={T}: {distinct:.1f} experts, {nbytes / 1e6:.1f} MB | " + " | ".join(
        f"{v}: {timed[v]:.1f} us {nbytes / timed[v] / 1e3:.0f} GB/s"
        for v in dict.fromkeys([default, best, *others])), flush=True)
    return [dict(shape=shape, tokens=T, variant=v, us=us, gb_s=nbytes / us / 1e3, experts_read=distinct)
            for v, us in timed.items()]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", default="1,8,16")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--int4", action="store_true", help="also the w4a16 experts")
    parser.add_argument("--int4-only", action="store_true", help="only the w4a16 experts")
    parser.add_argument("--mxfp4", action="store_true", help="only gpt-oss's MXFP4 experts")
    parser.add_argument("--out")
    args = parser.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    if args.mxfp4:
        rows = mxfp4_rows(tokens, args.sweep)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)
        return
    rows = []
    for name, (E, k, H, C) in ({} if args.int4_only else SHAPES).items():
        gate_up = torch.randn(E, 2 * C, H, device="cuda", dtype=torch.bfloat16) * 0.02
        down = torch.randn(E, H, C, device="cuda", dtype=torch.bfloat16) * 0.02
        for T in tokens:
            x, ids, weights, distinct = routing(T, E, k, H)
            nbytes = distinct * 3 * C * H * 2
            timed = {f"triton {a} {b}": graphed_us(lambda i: moe_gemv.routed_experts(x[i], ids[i], weights[i],
                                                                                       gate_up, down, a, b))
                     for a, b in launches((moe_gemv.GATE_UP_LAUNCH, moe_gemv.DOWN_LAUNCH),
                                          (SWEEP_GATE_UP, SWEEP_DOWN), args.sweep)}
            dense = torch.randn(int(nbytes // 2 // H), H, device="cuda", dtype=torch.bfloat16)
            copies = [dense] + [torch.empty_like(dense).normal_() for _ in range(max(1, (256 << 20) // int(nbytes)))]
            timed["gemv"] = graphed_us(lambda i: F.linear(x[i], copies[i % len(copies)]))
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            moe_gemv.routed_experts_torch(x[0], ids[0], weights[0], gate_up, down)
            start.record()
            for i in range(CALLS):
                moe_gemv.routed_experts_torch(x[i], ids[i], weights[i], gate_up, down)
            end.record()
            end.synchronize()
            timed["torch"] = start.elapsed_time(end) * 1000 / CALLS
            rows += report(name, T, timed, nbytes, distinct, "triton", ["gemv", "torch"])
    if args.int4 or args.int4_only:
        rows += int4_rows(tokens)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


def int4_rows(tokens: list[int]) -> list[dict]:
    from raytp.model.formats import IntWeight

    rows = []
    for name, (E, k, H, C) in SHAPES.items():
        def weight(out: int, inp: int) -> IntWeight:
            packed = torch.randint(-(1 << 31), 1 << 31, (out, inp // 8), device="cuda", dtype=torch.int32)
            return IntWeight(packed, torch.rand(out, inp // 128, device="cuda", dtype=torch.bfloat16) * 1e-3,
                             None, 4, 128)

        gate_up, down = [weight(2 * C, H) for _ in range(E)], [weight(H, C) for _ in range(E)]
        packed = [pack_int(w.packed, w.scales, None, bits=4, group_size=128) for w in gate_up + down]
        for p in packed:
            reserve(p)
        stacked = StackedMMA.stack(packed[:E]), StackedMMA.stack(packed[E:])
        for T in tokens:
            x, ids, weights, distinct = routing(T, E, k, H)
            nbytes = distinct * 3 * C * H * (0.5 + 2 / 128)
            timed = {"int4 routed": graphed_us(lambda i: routed_packed_experts(x[i], ids[i], weights[i], *stacked))}
            rows += report(f"{name} w4a16", T, timed, nbytes, distinct, "int4 routed", [])
    return rows


def mxfp4_rows(tokens: list[int], sweep: bool) -> list[dict]:
    from raytp.kernels import mxfp4

    rows = []
    for name, (E, k, H, C) in MXFP4_SHAPES.items():
        def projection(out: int, inp: int):
            return (torch.randint(0, 256, (E, out, inp // 2), device="cuda", dtype=torch.uint8),
                    torch.randint(118, 122, (E, out, inp // 32), device="cuda", dtype=torch.uint8),
                    torch.randn(E, out, device="cuda", dtype=torch.bfloat16))

        gate_up, down = projection(2 * C, H), projection(H, C)
        tiled = launches((mxfp4.GATE_UP_LAUNCH, mxfp4.DOWN_LAUNCH), (SWEEP_MXFP4, SWEEP_MXFP4), sweep)
        paired = launches(mxfp4.PAIR_LAUNCHES, (SWEEP_PAIRS_GATE_UP, SWEEP_PAIRS_DOWN), sweep)
        variants = [("tiles", 0, tiled), ("pairs", 1 << 30, paired)]
        for T in tokens:
            x, ids, weights, distinct = routing(T, E, k, H)
            nbytes = distinct * 3 * C * H * (0.5 + 1 / 32)
            timed = {f"mxfp4 {kind} {a} {b}": graphed_us(lambda i: mxfp4.mxfp4_routed_experts(
                x[i], ids[i], weights[i], gate_up, down, 1.702, 7.0, (a, b), pairs_up_to))
                for kind, pairs_up_to, launch in variants for a, b in launch}
            best_pairs = min((v for v in timed if v.startswith("mxfp4 pairs")), key=timed.get)
            rows += report(f"{name} mxfp4", T, timed, nbytes, distinct, "mxfp4 tiles", [best_pairs])
    return rows


if __name__ == "__main__":
    main()
