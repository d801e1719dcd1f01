"""The cost of drafting k tokens with the model's own MTP layer (`--speculate mtp:k`, raytp.runtime.mtp_drafter) at
batch 1, against one decode step of the model, on one device: the drafter's catch-up over the two positions a verify
step that accepted one drafted token leaves, then k - 1 steps of its own, each with the row's draw, eager as raytp
runs it; the decode step eager and replayed from a CUDA graph (as raytp's plain steps run). Random weights say
nothing of acceptance: this measures what a draft costs, which the tokens it saves must pay for.

    python benchmarks/mtp_cost.py --model synthetic:qwen3.5-27b                            # on a GPU host
    python benchmarks/mtp_cost.py --model DIR --device cpu --dtype float32 --max-k 2       # a check of the script

Prints ms per draft and its ratio to a decode step for each k; --out writes them as JSON.
"""

import argparse
import json

import torch
from verify_cost import CONTEXT, one_rank_comm, timed

from raytp.model.llama import ShardedLlama
from raytp.model.pieces import plan_model
from raytp.runtime.draft_model import DraftRow
from raytp.runtime.mtp_drafter import MtpDrafter
from raytp.runtime.sampling import SamplingParams
from raytp.weights.source import ModelSource


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="synthetic:qwen3.5-27b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-k", type=int, default=4)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device, cuda = torch.device(args.device), args.device.startswith("cuda")
    source = ModelSource.parse(args.model)
    config = source.config()
    if not config.mtp_layers:
        raise SystemExit(f"{args.model} has no MTP layers (mtp.* tensors)")
    plan = plan_model(config, [(args.device, 1 << 40)], max_context=CONTEXT, max_batch=1, dtype=args.dtype)
    comm = one_rank_comm(device)
    with source.reader(getattr(torch, args.dtype), device) as reader:
        lm = ShardedLlama(config, plan.ranks[0], comm, reader, max_batch=1, max_context=CONTEXT)
    n = CONTEXT // 2  # the sequence's length; its last token is the next step's input
    sequence = torch.randint(config.vocab_size, (n,)).tolist()
    token, position, slot = (torch.tensor([[x]], device=device) for x in (sequence[-1], n - 1, 0))
    slots = slot.view(1)
    decode = {"eager_ms": timed(lambda: lm.forward(token, position, slots), args.iters, cuda)}
    if cuda:
        graph = torch.cuda.CUDAGraph()
        lm.forward(token, position, slots, span=CONTEXT)  # warm-up outside the capture
        with torch.cuda.graph(graph):
            lm.forward(token, position, slots, span=CONTEXT)
        decode["graph_ms"] = timed(graph.replay, args.iters, cuda)
    print(" ".join(f"decode_{key} {value:.3f}" for key, value in decode.items()), flush=True)
    drafter = MtpDrafter(lm, comm)
    hidden = torch.randn(2, config.hidden_size, dtype=getattr(torch, args.dtype), device=device)
    results = []
    for k in range(1, args.max_k + 1):
        def draft():
            drafter.record(0, n - 3, hidden)  # what a verify step that accepted one drafted token leaves pending
            drafter.propose([DraftRow(0, sequence, SamplingParams(), 0, k)])
        row = {"k": k, "draft_ms": timed(draft, args.iters, cuda)}
        row |= {f"vs_decode_{key.removesuffix('_ms')}": row["draft_ms"] / value for key, value in decode.items()}
        results.append(row)
        print(" ".join(f"{key} {value:.3f}" if isinstance(value, float) else f"{key} {value}"
                       for key, value in row.items()), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "dtype": args.dtype, "device": args.device, "decode": decode,
                       "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
