"""The GPU host-staged all-reduce kernel and graph-captured decode (run on a GPU host; skipped without CUDA).

Ranks are threads of one process, each with its own CUDA stream and its own mapping of the segment, so one
GPU is enough: the kernels of all ranks are resident at once and meet in host memory as separate GPUs do.
"""

import pytest
import torch

from raytp.parallel.comm import CommError
from raytp.parallel.comm.hoststaged_gpu import GpuHostStagedCommunicator
from tests.test_comm import hoststaged_factory, run_ranks

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def gpu_ranks(world, body, timeout_s=10.0, absent=()):
    make_cpu = hoststaged_factory(world, slot_bytes=1 << 16, timeout_s=timeout_s)

    def per_rank(cpu):
        comm = GpuHostStagedCommunicator(cpu, torch.device("cuda"), max_elems=1 << 16, timeout_s=timeout_s)
        try:
            with torch.cuda.stream(torch.cuda.Stream()):
                return None if cpu.rank in absent else body(comm)
        finally:
            torch.cuda.synchronize()
            comm.close()  # unregisters the mapping: the next test may get the same addresses

    return run_ranks(world, make_cpu, per_rank)


def reference_sum(inputs, dtype):
    acc = inputs[0].float()
    for x in inputs[1:]:
        acc = acc + x.float()
    return acc.to(dtype)


@pytest.mark.parametrize("world", [1, 2, 4, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 4096, 8192, 100_003, 300_000])  # 300k > max_elems: several launches
def test_kernel_sums_in_rank_order_with_identical_bits(world, dtype, n):
    g = torch.Generator().manual_seed(n)
    inputs = [torch.randn(n, generator=g).to(dtype) for _ in range(world)]

    def body(comm):
        t = inputs[comm.rank].cuda()
        comm.reduce_in_place(t)  # the kernel itself, also at one rank (all_reduce skips a sum of one)
        torch.cuda.current_stream().synchronize()
        comm.check()
        return t.cpu()

    expected = reference_sum(inputs, dtype)
    for r in gpu_ranks(world, body):
        assert torch.equal(r, expected)


def test_messages_of_mixed_sizes_and_dtypes_interleave():
    world = 4  # block b always owns the same bytes of a slot, so mixed messages cannot overlap in flight
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
            assert torch.equal(got, reference_sum(inputs, dtype))


def test_kernel_replays_inside_a_cuda_graph():
    world, n = 1, 8192  # several ranks in one process deadlock in capture; 4 processes: benchmarks/gpu_run.sh
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
            assert torch.equal(got, reference_sum(inputs, torch.float32))


def test_missing_rank_becomes_an_error_not_a_hung_gpu():
    def body(comm):
        t = torch.ones(4096, device="cuda")
        comm.reduce_in_place(t)
        torch.cuda.current_stream().synchronize()  # returns: the kernel gave up after its timeout
        with pytest.raises(CommError, match="timed out"):
            comm.check()
        return "failed"

    # rank 2 maps the segment but never launches its kernel, like a crashed worker
    assert gpu_ranks(3, body, timeout_s=0.5, absent={2})[:2] == ["failed", "failed"]
