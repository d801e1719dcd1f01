"""All-reduce latency inside a CUDA graph: P2P, the GPU host-staged kernel and NCCL, one process per GPU (no Ray).

    python benchmarks/allreduce_graph.py --ranks 2 [--backends p2p,hoststaged,nccl,nccl-nop2p]
        [--sizes 512,1024,...,65536] [--label new] [--out rows.jsonl]

Each rank captures `iters` back-to-back all-reduces of a bf16 tensor in one graph and replays it `replays`
times; rank 0 reports microseconds per all-reduce, the median (and the range) over replays (CUDA events, the
ranks started together by a barrier). This is the setting of a decode step. Before timing, each size is checked
in a graph of one all-reduce: the host-staged kernel must give every rank the float32 sum in rank order bit for
bit, NCCL (which sums in bf16) must come within bf16 rounding of it. Backends: `p2p` (exact like host-staged),
`hoststaged` (`hoststaged:CHUNK` sets the kernel's chunk bytes), `nccl`, `nccl-nop2p` (NCCL_P2P_DISABLE=1:
through host memory, as on a host without P2P). With a PYTHONPATH that leads to another raytp tree first, `hoststaged`
times that tree's kernel (`--label old` names its rows). More ranks than GPUs: checked, not timed (hoststaged only;
NCCL refuses two ranks on one GPU).
"""

import argparse
import json
import math
import os
import socket
import statistics

import torch
import torch.multiprocessing as mp

from raytp.parallel.comm.hoststaged import HostStagedCommunicator, segment_bytes
from raytp.parallel.comm.hoststaged_gpu import GpuHostStagedCommunicator
from raytp.parallel.comm.p2p import P2PCommunicator
from raytp.parallel.comm.shm import SharedSegment, new_segment_name
from raytp.parallel.comm.torchdist import TorchDistCommunicator

DECODE_SIZES = "512,1024,2048,4096,8192,16384,32768,65536"


def check_in_graph(comm, n: int, rank: int, world: int, exact: bool) -> None:
    inputs = [torch.randn(n, generator=torch.Generator().manual_seed(n * 100 + r)).to(torch.bfloat16)
              for r in range(world)]
    expected = inputs[0].float()
    for x in inputs[1:]:
        expected = expected + x.float()
    static = inputs[rank].cuda()
    comm.all_reduce(static)  # warm-up outside the capture: compiles the kernel, sets NCCL up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        comm.all_reduce(static)
    static.copy_(inputs[rank])
    graph.replay()
    got = static.cpu()
    if exact and not torch.equal(got, expected.to(torch.bfloat16)):
        raise AssertionError(f"rank {rank}, {n} elements: not the float32 sum in rank order")
    # NCCL rounds every partial sum to bf16: up to half a bf16 step of the running magnitude per addition
    bound = world * 2.0**-8 * torch.stack([x.float().abs() for x in inputs]).sum(0) + 1e-6
    if not bool(((got.float() - expected).abs() <= bound).all()):
        raise AssertionError(f"rank {rank}, {n} elements: off the float32 sum by more than bf16 rounding")


def timed_in_graph(comm, barrier, n: int, world: int, iters: int, replays: int) -> float:
    # scaled so that `iters` sums (each multiplies by about `world`) neither underflow nor overflow bf16
    start_values = torch.randn(n, device="cuda") * 2.0 ** (-math.log2(world) * iters / 2)
    t = start_values.to(torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            comm.all_reduce(t)
    per_call = []
    for _ in range(replays + 1):  # the first replay warms up
        t.copy_(start_values)
        torch.cuda.synchronize()
        barrier()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        per_call.append(begin.elapsed_time(end) * 1e3 / iters)
    timed = sorted(per_call[1:])
    return {"us_in_graph": statistics.median(timed), "us_min": timed[0], "us_max": timed[-1]}


def rank_main(rank, world, backend, seg_name, init, sizes, iters, replays, results):
    """With more ranks than GPUs, ranks share GPUs round-robin and are only checked: ranks time-sliced on one GPU
    say nothing about speed."""
    os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    if backend == "nccl-nop2p":
        os.environ["NCCL_P2P_DISABLE"] = "1"
    torch.cuda.set_device(rank % torch.cuda.device_count())
    shared = world > torch.cuda.device_count()
    if backend.startswith("hoststaged"):
        cpu = HostStagedCommunicator(SharedSegment.attach(seg_name, segment_bytes(world)), rank, world)
        chunk = {"chunk_bytes": int(backend.split(":")[1])} if ":" in backend else {}
        comm = GpuHostStagedCommunicator(cpu, torch.device("cuda"), max_elems=max(sizes), **chunk)
        barrier = cpu.barrier
    else:
        comm = TorchDistCommunicator("nccl", init, rank, world)
        barrier = comm.barrier
        if backend == "p2p":
            comm = P2PCommunicator(comm, torch.device("cuda", torch.cuda.current_device()))
    out = {}
    for n in sizes:
        check_in_graph(comm, n, rank, world, exact=backend.startswith("hoststaged") or backend == "p2p")
        if not shared:
            out[n] = timed_in_graph(comm, barrier, n, world, iters, replays)
    if backend.startswith("hoststaged") or backend == "p2p":
        comm.check()
    if rank == 0:
        results.update(out or {"checked": len(sizes)})
    comm.close()


def measure(world, backend, sizes, iters, replays):
    seg = SharedSegment.create(new_segment_name(), segment_bytes(world))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        init = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    results = mp.Manager().dict()
    try:
        mp.spawn(rank_main, args=(world, backend, seg.name, init, sizes, iters, replays, results), nprocs=world)
    finally:
        seg.close()
    return dict(results)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--backends", default="p2p,hoststaged,nccl,nccl-nop2p")
    p.add_argument("--sizes", default=DECODE_SIZES)
    p.add_argument("--iters", type=int, default=64)
    p.add_argument("--replays", type=int, default=7)
    p.add_argument("--label", default="", help="prefix of the hoststaged rows' name, e.g. old or new")
    p.add_argument("--out", default=None, help="append one JSON row per measurement to this file")
    a = p.parse_args()
    sizes = [int(x) for x in a.sizes.split(",")]
    rows = []
    for backend in a.backends.split(","):
        name = f"{a.label} {backend}".strip() if backend.startswith("hoststaged") else backend
        results = measure(a.ranks, backend, sizes, a.iters, a.replays)
        if "checked" in results:
            print(f"{name}: {a.ranks} ranks on {torch.cuda.device_count()} GPUs, every rank's sum right at "
                  f"{results['checked']} sizes in a graph (ranks share GPUs: not timed)")
            continue
        for n, us in sorted(results.items()):
            rows.append({"ranks": a.ranks, "backend": name, "elements": n} | {k: round(v, 2) for k, v in us.items()})
    print(f"{'ranks':>5} {'backend':>22} {'elements':>9} {'us/all-reduce (graph), median [min, max] of replays':>52}")
    for r in rows:
        print(f"{r['ranks']:>5} {r['backend']:>22} {r['elements']:>9} "
              f"{r['us_in_graph']:>34.1f} [{r['us_min']:.1f}, {r['us_max']:.1f}]")
    if a.out:
        with open(a.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
