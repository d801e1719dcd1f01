"""All-reduce latency inside a CUDA graph: P2P, the GPU host-staged kernel and NCCL, one process per GPU (no Ray).

    python benchmarks/allreduce_graph.py [--ranks 2,4] [--sizes 4096,8192,131072,2097152]
                                         [--backends p2p,hoststaged,nccl] [--out F.json]

Each rank captures `iters` back-to-back all-reduces of a bf16 tensor in one graph, replays it, and reports
microseconds per all-reduce (rank 0's wall time, after a barrier). This is the setting of a decode step.
"""

import argparse
import json
import os
import socket
import time

import torch
import torch.multiprocessing as mp

from raytp.parallel.comm.hoststaged import HostStagedCommunicator, segment_bytes
from raytp.parallel.comm.hoststaged_gpu import GpuHostStagedCommunicator
from raytp.parallel.comm.p2p import P2PCommunicator
from raytp.parallel.comm.shm import SharedSegment, new_segment_name
from raytp.parallel.comm.torchdist import TorchDistCommunicator


def timed_in_graph(comm, n: int, iters: int) -> float:
    t = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        comm.all_reduce(t)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            comm.all_reduce(t)
    graph.replay()  # warm replay
    torch.cuda.synchronize()
    start = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e6


def rank_main(rank, world, backend, seg_name, init, sizes, iters, results):
    os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    torch.cuda.set_device(rank)
    if backend == "hoststaged":
        cpu = HostStagedCommunicator(SharedSegment.attach(seg_name, segment_bytes(world)), rank, world)
        comm = GpuHostStagedCommunicator(cpu, torch.device("cuda", rank), max_elems=max(sizes))
    else:
        comm = TorchDistCommunicator("nccl", init, rank, world)
        if backend == "p2p":
            comm = P2PCommunicator(comm, torch.device("cuda", rank))
    out = {}
    for n in sizes:
        comm.cpu.barrier() if backend == "hoststaged" else comm.barrier()
        out[n] = timed_in_graph(comm, n, iters)
    comm.check()
    if rank == 0:
        results.update(out)
    comm.close()


def measure(world, backend, sizes, iters):
    seg = SharedSegment.create(new_segment_name(), segment_bytes(world))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        init = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    results = mp.Manager().dict()
    try:
        mp.spawn(rank_main, args=(world, backend, seg.name, init, sizes, iters, results), nprocs=world)
    finally:
        seg.close()
    return dict(results)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", default="2,4")
    p.add_argument("--sizes", default="4096,8192,131072,2097152")
    p.add_argument("--backends", default="p2p,hoststaged,nccl")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    sizes = [int(x) for x in a.sizes.split(",")]
    rows = []
    for world in [int(x) for x in a.ranks.split(",")]:
        if world > torch.cuda.device_count():
            print(f"skipping {world} ranks: {torch.cuda.device_count()} GPUs")
            continue
        for backend in a.backends.split(","):
            for n, us in measure(world, backend, sizes, a.iters).items():
                rows.append({"ranks": world, "backend": backend, "elements": n, "us_in_graph": us})
    print(f"{'ranks':>5} {'backend':>10} {'elements':>9} {'us/all-reduce (graph)':>22}")
    for r in rows:
        print(f"{r['ranks']:>5} {r['backend']:>10} {r['elements']:>9} {r['us_in_graph']:>22.1f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)
