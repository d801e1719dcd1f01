"""The GPU host-staged all-reduce kernel and graph-captured decode (run on a GPU host; skipped without CUDA).

Ranks are threads of one process, each with its own CUDA stream and its own mapping of the segment, placed on
the GPUs round-robin: with fewer GPUs than ranks several ranks share a GPU, their kernels resident at once, and
they meet in host memory as ranks on separate GPUs do.
"""

import multiprocessing
import threading
import time

import pytest
import torch

from raytp.parallel.comm import CommError
from raytp.parallel.comm.hoststaged import HostStagedCommunicator, segment_bytes
from raytp.parallel.comm.hoststaged_gpu import GpuHostStagedCommunicator
from raytp.parallel.comm.shm import SharedSegment, new_segment_name
from tests.test_comm import hoststaged_factory, run_ranks

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

MAX_ELEMS = 1 << 16


def gpu_ranks(world, body, timeout_s=10.0, absent=()):
    make_cpu = hoststaged_factory(world, slot_bytes=1 << 16, timeout_s=timeout_s)

    def per_rank(cpu):
        device = torch.device("cuda", cpu.rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        comm = GpuHostStagedCommunicator(cpu, device, max_elems=MAX_ELEMS, timeout_s=timeout_s)
        try:
            with torch.cuda.stream(torch.cuda.Stream()):
                return None if cpu.rank in absent else body(comm)
        finally:
            torch.cuda.synchronize()
            comm.close()  # unregisters the mapping: the next test may get the same addresses

    return run_ranks(world, make_cpu, per_rank)


def rank_order_sum(inputs, dtype):
    """What every rank must hold: the float32 sum in rank order, rounded once to the dtype."""
    acc = inputs[0].float()
    for x in inputs[1:]:
        acc = acc + x.float()
    return acc.to(dtype)


def reduce_each_rank(world, inputs):
    def body(comm):
        t = inputs[comm.rank].cuda()
        comm.reduce_in_place(t)  # the kernel itself, also at one rank (all_reduce skips a sum of one)
        torch.cuda.current_stream().synchronize()
        comm.check()
        return t.cpu()

    return gpu_ranks(world, body)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 7, 512, 8192, 65_536 + 3, 300_000])  # 300k > MAX_ELEMS: several launches
def test_kernel_sums_in_rank_order_with_identical_bits(world, dtype, n):
    g = torch.Generator().manual_seed(n * 10 + world)
    inputs = [torch.randn(n, generator=g).to(dtype) for _ in range(world)]
    expected = rank_order_sum(inputs, dtype)
    exact = torch.stack([x.double() for x in inputs]).sum(0)
    f32_error = torch.finfo(torch.float32).eps * torch.stack([x.double().abs() for x in inputs]).sum(0)
    for r in reduce_each_rank(world, inputs):
        assert torch.equal(r, expected)
        # and the float64 sum, within the one rounding to the dtype plus float32's rounding on the way
        assert ((r.double() - exact).abs() <= torch.finfo(dtype).eps * exact.abs() + world * f32_error).all()


def shared_gpu_rank(name: str, size: int, rank: int, world: int, results) -> None:
    """One rank in a process of its own, as raytp's actors are: attach the CPU segment, reduce, report the sum."""
    cpu = HostStagedCommunicator(SharedSegment.attach(name, size), rank, world, slot_bytes=1 << 16, timeout_s=60.0)
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    comm = GpuHostStagedCommunicator(cpu, device, max_elems=MAX_ELEMS, timeout_s=60.0)
    try:
        t = shared_gpu_inputs(world)[rank].cuda()
        comm.reduce_in_place(t)
        torch.cuda.synchronize()
        comm.check()
        results.put((rank, t.cpu().view(torch.int16).tolist()))  # plain numbers: a tensor would be shared memory
    finally:
        comm.close()


def shared_gpu_inputs(world: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(world)
    return [torch.randn(8192 + 5, generator=g).to(torch.bfloat16) for _ in range(world)]


@pytest.mark.parametrize("world", [12, 16])
def test_twelve_and_sixteen_ranks_sharing_gpus(world):
    """More ranks than GPUs, each rank a process as in raytp: the GPU time-slices their contexts, so a rank spinning
    for its peers is preempted and they run. (Rank threads of one process would share CUDA's hardware queues, where a
    kernel can wait behind a spinning one forever: the thread-based tests above stay at 8 ranks.)"""
    ctx = multiprocessing.get_context("spawn")
    name, size = new_segment_name(), segment_bytes(world, 1 << 16)
    leader = SharedSegment.create(name, size)
    results = ctx.Queue()
    ranks = [ctx.Process(target=shared_gpu_rank, args=(name, size, r, world, results)) for r in range(world)]
    try:
        for p in ranks:
            p.start()
        got = dict(results.get(timeout=240) for _ in range(world))
    finally:
        for p in ranks:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        leader.unlink()
        leader.close()
    expected = rank_order_sum(shared_gpu_inputs(world), torch.bfloat16).view(torch.int16).tolist()
    for rank in range(world):
        assert got[rank] == expected  # bit for bit


def test_kernel_writes_where_the_layout_says():
    world, n = 3, 5000  # 10000 bf16 bytes: the last chunk partial
    inputs = [torch.randn(n).to(torch.bfloat16) for _ in range(world)]

    def body(comm):
        comm.reduce_in_place(inputs[comm.rank].cuda())
        torch.cuda.current_stream().synchronize()
        comm.cpu.barrier()  # every rank's first all-reduce (seq 1, bank 1) is done
        layout, buf = comm.layout, comm.buf
        used = -(-n * 2 // layout.chunk_bytes)
        for r in range(world):
            sent = inputs[r].view(torch.uint8)
            for c in range(used):
                start = layout.cell(r, 1, c)
                part = sent[c * layout.chunk_bytes : (c + 1) * layout.chunk_bytes]
                assert torch.equal(buf[start : start + part.numel()], part)
                assert buf[start + layout.chunk_bytes :][:4].view(torch.int32).item() == 1
        return used, comm.counters[: used + 1].tolist()

    for used, counters in gpu_ranks(world, body):
        assert counters == [1] * used + [0]  # a chunk the message did not reach keeps its count


def test_messages_of_mixed_sizes_and_dtypes_interleave():
    world = 4  # chunk c always owns the same bytes of a cell, so mixed messages cannot overlap in flight
    g = torch.Generator().manual_seed(11)
    rounds = [(n, dtype, [torch.randn(n, generator=g).to(dtype) for _ in range(world)])
              for n, dtype in [(4096, torch.bfloat16), (1000, torch.float32), (70_000, torch.bfloat16),
                               (3, torch.float32), (8192, torch.float32), (4096, torch.bfloat16)] * 3]

    def body(comm):
        out = []
        for _, _, inputs in rounds:  # no sync between rounds: they queue back to back on the stream
            t = inputs[comm.rank].cuda()
            comm.reduce_in_place(t)
            out.append(t)
        torch.cuda.current_stream().synchronize()
        comm.check()
        return [t.cpu() for t in out]

    for results in gpu_ranks(world, body):
        for got, (_, dtype, inputs) in zip(results, rounds):
            assert torch.equal(got, rank_order_sum(inputs, dtype))


def test_unaligned_views_are_summed_too():
    world = 2
    inputs = [torch.randn(4099).to(torch.bfloat16) for _ in range(world)]

    def body(comm):
        t = inputs[comm.rank].cuda()
        comm.all_reduce(t[3:])  # a view 6 bytes past the allocation's start
        torch.cuda.current_stream().synchronize()
        comm.check()
        return t.cpu()

    expected = rank_order_sum([x[3:] for x in inputs], torch.bfloat16)
    for r, x in zip(gpu_ranks(world, body), inputs):
        assert torch.equal(r[3:], expected) and torch.equal(r[:3], x[:3])


def test_kernel_replays_inside_a_cuda_graph():
    world, n = 1, 8192  # several ranks in one process deadlock in capture; processes: benchmarks/allreduce_graph.py
    rounds = [[torch.randn(n) for _ in range(world)] for _ in range(4)]

    def body(comm):
        static = torch.zeros(n, device="cuda")
        comm.reduce_in_place(static)  # warm-up (compiles the kernel) outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=torch.cuda.current_stream(), capture_error_mode="thread_local"):
            comm.reduce_in_place(static)
        out = []
        for inputs in rounds:
            static.copy_(inputs[comm.rank])
            graph.replay()  # the sequence number advances in device memory, not in the arguments
            out.append(static.cpu())
        comm.check()
        return out

    for results in gpu_ranks(world, body):
        for got, inputs in zip(results, rounds):
            assert torch.equal(got, rank_order_sum(inputs, torch.float32))


def test_missing_rank_becomes_an_error_not_a_hung_gpu():
    def body(comm):
        t = torch.ones(4096, device="cuda")
        comm.reduce_in_place(t)
        torch.cuda.current_stream().synchronize()  # returns: the kernel gave up after its timeout
        with pytest.raises(CommError, match="timed out"):
            comm.check()
        comm.reduce_in_place(t)  # the error word is set: the next kernel gives up at once, not after a timeout
        torch.cuda.current_stream().synchronize()
        return "failed"

    # rank 2 maps the segment but never launches its kernel, like a crashed worker
    assert gpu_ranks(3, body, timeout_s=0.5, absent={2})[:2] == ["failed", "failed"]


def test_abort_from_the_host_releases_a_waiting_kernel():
    def body(comm):
        if comm.rank == 0:
            threading.Timer(0.3, comm.abort).start()  # e.g. the rank's driver saw a peer die
            start = time.monotonic()
            comm.reduce_in_place(torch.ones(4096, device="cuda"))
            torch.cuda.current_stream().synchronize()
            with pytest.raises(CommError):
                comm.check()
            return time.monotonic() - start

    waited = gpu_ranks(2, body, timeout_s=60.0, absent={1})[0]
    assert waited < 30.0  # well before the kernel's own 60 s timeout
