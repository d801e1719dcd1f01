"""The cost of a verify step of k drafted tokens (k + 1 positions per row, logits of every position) against a
one-token decode step, k = 0..8, on one device: eager, and replayed from a CUDA graph on GPUs (what a captured
verify step would cost; raytp's verify steps run eagerly today), the graph with the torch attention over the cache
and with the Triton split kernels reading every query (raytp.kernels.attention.TRITON_VERIFY).

    python benchmarks/verify_cost.py --model synthetic:llama-3.1-8b --batch 1,4 [--context 4096]  # on a GPU host
    python benchmarks/verify_cost.py --model synthetic:tiny --device cpu --dtype float32  # a check of the script

Prints ms per step and the ratio to k = 0 for each batch; --out writes them as JSON.
"""

import argparse
import json
import socket
import time

import torch

from raytp.kernels import attention
from raytp.model.llama import ShardedLlama
from raytp.model.pieces import plan_model
from raytp.parallel.comm import InProcessGroup
from raytp.parallel.comm.factory import PHASES, CommPlan, open_group
from raytp.weights.source import ModelSource



def timed(fn, iters: int, cuda: bool) -> float:
    """ms per call of fn after a warm-up."""
    for _ in range(3):
        fn()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / iters


def one_rank_comm(device: torch.device):
    """NCCL on a GPU (its all-reduce of one rank is what a one-GPU group captures), in-process threads on CPU."""
    if device.type != "cuda":
        return InProcessGroup(1).communicator(0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    opening = open_group(CommPlan.make("nccl", [[0]], f"tcp://127.0.0.1:{port}", timeout_s=60), 0, device)
    for phase in PHASES:
        opening.step(phase)
    return opening.comm


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="synthetic:llama-3.1-8b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", default="1,4")
    p.add_argument("--max-k", type=int, default=8)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--context", type=int, default=512, help="positions cached per sequence; the verified ones sit "
                   "at its middle")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    device, cuda = torch.device(args.device), args.device.startswith("cuda")
    source = ModelSource.parse(args.model)
    config = source.config()
    plan = plan_model(config, [(args.device, 1 << 40)], max_context=args.context, max_batch=max(batches),
                      dtype=args.dtype)
    comm = one_rank_comm(device)
    with source.reader(getattr(torch, args.dtype), device) as reader:
        lm = ShardedLlama(config, plan.ranks[0], comm, reader, max_batch=max(batches), max_context=args.context)
    results = []
    for b in batches:
        base = None
        for k in range(args.max_k + 1):
            tokens = torch.randint(config.vocab_size, (b, k + 1), device=device)
            positions = (args.context // 2 + torch.arange(k + 1, device=device)).repeat(b, 1)
            slots = torch.arange(b, device=device)
            row = {"batch": b, "k": k,
                   "eager_ms": timed(lambda: lm.forward(tokens, positions, slots, every=True), args.iters, cuda)}
            for key, triton_verify in (("graph_ms", False), ("graph_triton_ms", True)) if cuda else ():
                attention.TRITON_VERIFY = triton_verify
                graph = torch.cuda.CUDAGraph()
                lm.forward(tokens, positions, slots, span=args.context, every=True)  # warm-up outside the capture
                with torch.cuda.graph(graph):
                    lm.forward(tokens, positions, slots, span=args.context, every=True)
                row[key] = timed(graph.replay, args.iters, cuda)
            base = base or row
            row |= {f"{key}_vs_1": row[key] / base[key] for key in ("eager_ms", "graph_ms", "graph_triton_ms")
                    if key in row}
            results.append(row)
            print(" ".join(f"{key} {value:.3f}" if isinstance(value, float) else f"{key} {value}"
                           for key, value in row.items()), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "dtype": args.dtype, "device": args.device, "context": args.context,
                       "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
