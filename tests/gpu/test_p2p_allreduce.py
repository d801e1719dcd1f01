"""The P2P all-reduce on real GPUs: one process per GPU (as torch.multiprocessing spawns them, and through Ray
actors, the real path). Needs 2 or more GPUs that reach each other; skipped otherwise.

The kernels sum every rank's values in rank order in float32 and round once, so every rank must hold the same
bits, and those bits must equal the float32 reference sum in rank order rounded to the dtype.
"""

import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from raytp.parallel.comm import CommError
from raytp.parallel.comm.p2p import P2PCommunicator
from raytp.parallel.comm.torchdist import TorchDistCommunicator

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPUS < 2, reason="needs 2 or more GPUs")]
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

# one-shot (<= 128 KiB), two-shot in one launch, two-shot in several launches (> 2 MiB), and one tensor the
# kernels do not take (not whole 16-byte vectors: NCCL carries it)
CASES = [(dtype, n) for dtype in (torch.bfloat16, torch.float32) for n in (8, 4096, 8192, 65536, 300_000, 1_100_000)]
ODD = (torch.bfloat16, 3)


def inputs(world: int, dtype, n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g).to(dtype) for _ in range(world)]


def reference_sum(parts, dtype):
    acc = parts[0].float()
    for x in parts[1:]:
        acc = acc + x.float()
    return acc.to(dtype)


def _rank_main(rank, world, init, timeout_s, body, results):
    os.environ.update(NO_MULTICAST)
    torch.cuda.set_device(rank)
    nccl = TorchDistCommunicator("nccl", init, rank, world, timeout_s=60)
    comm = P2PCommunicator(nccl, torch.device("cuda", rank), timeout_s=timeout_s)
    try:
        results[rank] = body(comm)
    finally:
        comm.close()


def spawn(world: int, body, timeout_s: float = 30.0) -> list:
    """body(comm) on `world` processes, one per GPU, each with a P2P communicator; their return values."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        init = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    results = mp.Manager().dict()
    mp.spawn(_rank_main, args=(world, init, timeout_s, body, results), nprocs=world)
    return [results[r] for r in range(world)]


def _every_case(comm):
    """Every case back to back on the stream (one-shot and two-shot calls interleave), then each again in a graph."""
    world, rank = comm.world_size, comm.rank
    eager = []
    for seed, (dtype, n) in enumerate(CASES * 2):
        t = inputs(world, dtype, n, seed)[rank].cuda()
        comm.all_reduce(t)
        eager.append(t)
    odd = comm.all_reduce(inputs(world, *ODD, seed=99)[rank].cuda())
    torch.cuda.synchronize()
    comm.check()
    graphed = []
    statics = [torch.zeros(n, dtype=dtype, device="cuda") for dtype, n in CASES]
    for t in statics:
        comm.all_reduce(t)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for t in statics:
            comm.all_reduce(t)
    for replay in range(3):  # the sequence numbers advance in device memory, not in the captured arguments
        for seed, (t, (dtype, n)) in enumerate(zip(statics, CASES)):
            t.copy_(inputs(world, dtype, n, 1000 * (replay + 1) + seed)[rank])
        graph.replay()
        graphed.append([t.cpu() for t in statics])
    torch.cuda.synchronize()
    comm.check()
    return [t.cpu() for t in eager], odd.cpu(), graphed


@pytest.mark.parametrize("world", range(2, GPUS + 1))
def test_p2p_sums_in_rank_order_with_identical_bits_eager_and_in_a_graph(world):
    per_rank = spawn(world, _every_case)
    eager0, odd0, graphed0 = per_rank[0]
    for eager, odd, graphed in per_rank[1:]:  # every rank holds rank 0's bits
        assert all(torch.equal(a, b) for a, b in zip(eager, eager0))
        assert torch.equal(odd, odd0)
        assert all(torch.equal(a, b) for rounds, rounds0 in zip(graphed, graphed0) for a, b in zip(rounds, rounds0))
    for seed, ((dtype, n), got) in enumerate(zip(CASES * 2, eager0)):
        assert torch.equal(got, reference_sum(inputs(world, dtype, n, seed), dtype)), (dtype, n)
    torch.testing.assert_close(odd0, reference_sum(inputs(world, *ODD, seed=99), ODD[0]))  # NCCL's own order
    for replay, rounds in enumerate(graphed0):
        for seed, ((dtype, n), got) in enumerate(zip(CASES, rounds)):
            assert torch.equal(got, reference_sum(inputs(world, dtype, n, 1000 * (replay + 1) + seed), dtype))


def _last_rank_never_arrives(comm):
    if comm.rank == comm.world_size - 1:
        time.sleep(4)  # alive, buffer mapped, but never calls: like a stuck worker
        return "absent"
    t = torch.ones(8192, dtype=torch.bfloat16, device="cuda")
    start = time.monotonic()
    comm.all_reduce(t)
    torch.cuda.synchronize()  # returns: the kernel gave up after its timeout
    waited = time.monotonic() - start
    with pytest.raises(CommError, match="timed out"):
        comm.check()
    return waited


def test_a_rank_that_never_arrives_is_an_error_after_the_timeout_not_a_hang():
    results = spawn(2, _last_rank_never_arrives, timeout_s=1.0)
    assert results[-1] == "absent"
    assert all(0.9 < waited < 10 for waited in results[:-1]), results


def _sum_on_rank(comm, device, seed):
    t = inputs(comm.world_size, torch.bfloat16, 8192, seed)[comm.rank].to(device)
    comm.all_reduce(t)
    return device.index, type(comm).__name__, t.cpu()


def test_p2p_through_ray_actors_each_on_its_own_gpu():
    ray = pytest.importorskip("ray")
    from raytp.actors.group import GPU_RANK_ENV
    from raytp.actors.worker import WorkerActor
    from raytp.parallel.comm.factory import CommPlan
    from raytp.parallel.devices import DeviceSpec

    world = GPUS
    ray.init(address="local", num_gpus=world, include_dashboard=False)
    try:
        workers = [WorkerActor.options(num_gpus=1, runtime_env={"env_vars": GPU_RANK_ENV})
                   .remote(r, DeviceSpec("cuda", None, None)) for r in range(world)]
        ray.get([w.describe.remote() for w in workers])
        port = ray.get(workers[0].free_port.remote())
        plan = CommPlan.make("p2p", [list(range(world))], f"tcp://127.0.0.1:{port}", 30.0)
        for phase in ("create", "unlink"):
            ray.get([w.open_comm.remote(phase, plan) for w in workers])
        answers = ray.get([w.open_comm.remote("finish", plan) for w in workers])
        assert [a["backend"] for a in answers] == ["p2p"] * world, answers
        results = ray.get([w.on_rank.remote(_sum_on_rank, 7) for w in workers])
        assert sorted(index for index, _, _ in results) == list(range(world))  # each rank selected its own GPU
        assert all(kind == "P2PCommunicator" for _, kind, _ in results)
        expected = reference_sum(inputs(world, torch.bfloat16, 8192, 7), torch.bfloat16)
        assert all(torch.equal(t, expected) for _, _, t in results)
        ray.get([w.close.remote() for w in workers])
    finally:
        ray.shutdown()
