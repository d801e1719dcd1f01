"""Decode GEMVs of Llama-3.1-8B's shapes with bf16, int4, int8 and FP8 weights: microseconds and GB/s of weights read.

    python benchmarks/quant_gemv.py [--rows 1,4,8,16] [--group-size 128] [--sweep] [--out results.json]

Each (shape, format, rows) is timed inside one CUDA graph of back-to-back calls that cycle through enough copies
of the weight (> 4x the L2 cache) that every call reads its bytes from HBM, as a decode step does. GB/s counts the
bytes a call must read: packed weights, scales and zero points (x and y are negligible). Formats:

    bf16          cuBLAS (F.linear)
    int4, int8    raytp's packed GEMV (raytp.kernels.packed_gemv), symmetric groups
    int4-zp       the same with zero points
    fp8           raytp's packed GEMV over e4m3 weights, weight-only
    torch-int4    torch's own int4 op, torch.ops.aten._weight_int4pack_mm (tinygemm; groups, zero points built in)
    scaled-mm     torch._scaled_mm over e4m3 weights and x quantized per row at run time (x padded to 16 rows;
                  the quantization of x is timed in: a W8A8 layer pays it)

`--sweep` also times launch shapes of raytp's kernels and prints the fastest per shape, to check `launch_for`.
The shapes are one rank's at 1 and at 4 ranks; the last tables are one decoder layer (the four matmuls) against bf16.
"""

import argparse
import json

import torch
import torch.nn.functional as F

from raytp.kernels import packed_gemv as pg

# Llama-3.1-8B on one rank and on each of 4: (name, out_features, in_features), fused as raytp fuses them
SHAPES = [("qkv", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336),
          ("qkv/4", 1536, 4096), ("o_proj/4", 4096, 1024), ("gate_up/4", 7168, 4096), ("down/4", 4096, 3584)]
LAYERS = 32
SWEEP = [pg.Launch(w, s, st, sc, mb) for w in (4, 8) for s in (1, 2, 4, 8) for st in (2, 3) for sc in (False, True)
         for mb in (1, 2)]


def make(fmt: str, out: int, cols: int, group_size: int):
    """One weight of `fmt`: (call(x, launch) -> y, bytes a call reads), or None where this torch lacks it."""
    dev = dict(device="cuda")
    if fmt == "bf16":
        w = torch.randn(out, cols, dtype=torch.bfloat16, **dev) * 0.02
        return (lambda x, launch=None: F.linear(x, w)), w.numel() * 2
    if fmt in ("fp8", "scaled-mm"):
        w = (torch.randn(out, cols, **dev) * 0.02).to(torch.float8_e4m3fn)
        s = torch.rand(out, 1, **dev) + 0.5
        if fmt == "fp8":
            kn = pg.pack_fp8(w, s)
            return (lambda x, launch=None: pg.mma_linear(x, kn, launch)), w.numel() + s.numel() * 4
        wt, s_row = w.t(), s.t().contiguous()  # column-major (K, N), as _scaled_mm wants its second operand

        def scaled_mm(x, launch=None):
            x16 = F.pad(x, (0, 0, 0, -x.shape[0] % 16))
            scale = x16.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / 448.0
            xq = (x16 / scale).to(torch.float8_e4m3fn)
            return torch._scaled_mm(xq, wt, scale_a=scale, scale_b=s_row, out_dtype=x.dtype)[:x.shape[0]]
        return scaled_mm, w.numel() + s.numel() * 4
    bits = 8 if fmt == "int8" else 4
    q = torch.randint(0, 1 << bits, (out, cols), dtype=torch.int32, **dev)
    groups = cols // group_size
    s = torch.rand(out, groups, dtype=torch.bfloat16, **dev) * 1e-3 + 1e-4
    if fmt == "torch-int4":
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
            return None
        packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
        zero = torch.zeros_like(s)  # w = (q - 8) * scale + zero: a symmetric group has zero 0
        scales_zeros = torch.stack([s.t(), zero.t()], dim=-1).contiguous()  # (groups, out, 2)
        return ((lambda x, launch=None: torch.ops.aten._weight_int4pack_mm(x, packed, group_size, scales_zeros)),
                packed.numel() * packed.element_size() + scales_zeros.numel() * 2)
    per = 32 // bits
    words = torch.zeros(out, cols // per, dtype=torch.int32, **dev)
    for j in range(per):
        words |= q[:, j::per] << (bits * j)
    zeros = torch.randint(0, 1 << bits, (out, groups), **dev).to(torch.bfloat16) if fmt == "int4-zp" else None
    kn = pg.pack_int(words, s, zeros, bits=bits, group_size=group_size)
    return (lambda x, launch=None: pg.mma_linear(x, kn, launch)), sum(t.numel() * t.element_size() for t in kn.tensors())


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
    p.add_argument("--rows", default="1,4,8,16", help="rows of x per call (decode batch)")
    p.add_argument("--formats", default="bf16,int4,int4-zp,int8,fp8,torch-int4,scaled-mm")
    p.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--iters", type=int, default=64, help="calls per graph")
    p.add_argument("--sweep", default="", help="formats whose launch shapes to sweep (int4,fp8,...)")
    p.add_argument("--sweep-rows", default="1", help="the row counts at which to sweep")
    p.add_argument("--out", default=None, help="write the measurements as JSON here")
    args = p.parse_args()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    print(f"# {torch.cuda.get_device_name(0)}, L2 {l2 >> 20} MiB, torch {torch.__version__}")
    results = []
    wanted = args.shapes.split(",")
    for name, out, cols in (s for s in SHAPES if s[0] in wanted):
        for fmt in args.formats.split(","):
            made = make(fmt, out, cols, args.group_size)
            if made is None:
                print(f"# {fmt}: not in this torch")
                continue
            first, nbytes = made
            calls = [first] + [make(fmt, out, cols, args.group_size)[0] for _ in range(max(1, 4 * l2 // nbytes))]
            for rows in map(int, args.rows.split(",")):
                x = torch.randn(rows, cols, dtype=torch.bfloat16, device="cuda")
                try:
                    us = timed(calls, x, None, args.iters)
                except RuntimeError as e:  # e.g. the int4 op refusing a shape
                    print(f"# {name} {fmt} rows {rows}: {str(e).splitlines()[0]}")
                    continue
                row = dict(shape=name, out=out, cols=cols, format=fmt, rows=rows, us=us, gbps=nbytes / us / 1e3)
                if fmt in args.sweep.split(",") and str(rows) in args.sweep_rows.split(","):
                    swept = {launch: timed(calls, x, launch, args.iters) for launch in SWEEP}
                    best = min(((us, launch) for launch, us in swept.items()), key=lambda t: t[0])
                    row |= dict(best_us=best[0], best_launch=str(best[1]), sweep={str(k): v for k, v in swept.items()},
                                heuristic=str(pg.launch_for(out, -(-cols // pg.TILE_K), pg.sm_count(0),
                                                            pg.KINDS[fmt.split('-')[0]], fmt.endswith("-zp"))))
                results.append(row)
                print(json.dumps(row), flush=True)
            del calls, first
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print("\n| shape | rows | format | us | GB/s | vs bf16 | best us (launch) |\n|---|---|---|---|---|---|---|")
    base = {(r["shape"], r["rows"]): r["us"] for r in results if r["format"] == "bf16"}
    for r in results:
        ref = base.get((r["shape"], r["rows"]))
        best = f"{r['best_us']:.1f} ({r['best_launch']})" if "best_us" in r else ""
        ratio = f"{ref / r['us']:.2f}x" if ref else "-"
        print(f"| {r['shape']} {r['out']}x{r['cols']} | {r['rows']} | {r['format']} | {r['us']:.1f} | "
              f"{r['gbps']:.0f} | {ratio} | {best} |")
    swept = [r for r in results if "sweep" in r]
    if swept:  # one launch for every shape of a (format, rows), and the best launch per shape, against the heuristic
        print("\n| format | rows | layer us, heuristic | best per shape | best single launch (us) | 4-rank layer: "
              "heuristic / best per shape |\n|---|---|---|---|---|---|")
        for fmt, rows in sorted({(r["format"], r["rows"]) for r in swept}):
            mine = [r for r in swept if (r["format"], r["rows"]) == (fmt, rows)]
            one = [r for r in mine if not r["shape"].endswith("/4")]
            four = [r for r in mine if r["shape"].endswith("/4")]
            single = min(SWEEP, key=lambda launch: sum(r["sweep"][str(launch)] for r in one))
            print(f"| {fmt} | {rows} | {sum(r['us'] for r in one):.1f} | {sum(r['best_us'] for r in one):.1f} | "
                  f"{single} ({sum(r['sweep'][str(single)] for r in one):.1f}) | "
                  f"{sum(r['us'] for r in four):.1f} / {sum(r['best_us'] for r in four):.1f} |")
    for suffix, title in (("", "one rank"), ("/4", "each of 4 ranks")):
        print(f"\n{title}: one decoder layer\n\n| rows | format | layer us | {LAYERS} layers ms | vs bf16 |"
              "\n|---|---|---|---|---|")
        layer = {}
        for r in results:
            if r["shape"].endswith("/4") == bool(suffix):
                key = (r["rows"], r["format"])
                layer[key] = layer.get(key, 0.0) + r["us"]
        for (rows, fmt), us in layer.items():
            ref = layer.get((rows, "bf16"))
            print(f"| {rows} | {fmt} | {us:.1f} | {us * LAYERS / 1000:.2f} | {f'{ref / us:.2f}x' if ref else '-'} |")


if __name__ == "__main__":
    main()
