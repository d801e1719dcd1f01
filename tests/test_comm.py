"""Collectives of every CPU backend: exact sums in a fixed order, identical bits on all ranks, no leftovers."""

import os
import threading

import pytest
import torch

from raytp.parallel.comm import CommError, InProcessGroup
from raytp.parallel.comm.hoststaged import HostStagedCommunicator, segment_bytes
from raytp.parallel.comm.shm import SHM_DIR, SharedSegment, new_segment_name


def run_ranks(world_size, make_comm, body):
    """Run body(comm) on world_size threads; return the per-rank results (re-raising any failure)."""
    results, errors = [None] * world_size, []

    def target(rank):
        try:
            results[rank] = body(make_comm(rank))
        except Exception as e:  # noqa: BLE001 - handed to the test thread
            errors.append(e)

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def hoststaged_factory(world_size, slot_bytes=4096, timeout_s=10.0):
    name = new_segment_name()
    size = segment_bytes(world_size, slot_bytes)
    leader = SharedSegment.create(name, size)
    segments = [leader] + [SharedSegment.attach(name, size) for _ in range(world_size - 1)]
    leader.unlink()  # every rank has it mapped: the name can go
    return lambda rank: HostStagedCommunicator(segments[rank], rank, world_size, slot_bytes=slot_bytes,
                                               timeout_s=timeout_s)


def inprocess_factory(world_size):
    group = InProcessGroup(world_size)
    return group.communicator


BACKENDS = {"hoststaged": hoststaged_factory, "inprocess": inprocess_factory}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 12])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_all_reduce_sums_in_rank_order_with_identical_bits(backend, world_size, dtype):
    # 3000 float32 elements are 12000 bytes: three chunks of the 4096-byte slots
    inputs = [(torch.randn(3, 1000) * 100).to(dtype) for _ in range(world_size)]
    expected = inputs[0].to(torch.float32 if dtype.is_floating_point else dtype)
    for x in inputs[1:]:
        expected = expected + x
    results = run_ranks(world_size, BACKENDS[backend](world_size), lambda c: c.all_reduce(inputs[c.rank].clone()))
    for r in results:
        assert r.dtype == dtype
        assert torch.equal(r, expected.to(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_gather_of_uneven_pieces(backend):
    world_size = 4
    pieces = [torch.arange(r * 7, dtype=torch.float32).view(-1, 1).repeat(1, 3) + r for r in range(world_size)]

    def body(comm):
        out = comm.all_gather(pieces[comm.rank])
        # a broadcast after the gather keeps the sequence numbers in step
        return out, comm.broadcast(torch.tensor([comm.rank * 10 + 1]), src=2)

    for gathered, bcast in run_ranks(world_size, BACKENDS[backend](world_size), body):
        assert [g.shape[0] for g in gathered] == [0, 7, 14, 21]
        for g, p in zip(gathered, pieces):
            assert torch.equal(g, p)
        assert bcast.item() == 21


def test_hoststaged_segment_name_is_gone_once_mapped():
    before = {n for n in os.listdir(SHM_DIR) if n.startswith("raytp-")}
    comms = run_ranks(3, hoststaged_factory(3), lambda c: c)
    after = {n for n in os.listdir(SHM_DIR) if n.startswith("raytp-")}
    assert after <= before
    for c in comms:
        c.close()


def test_segment_is_private_to_its_owner():
    name = new_segment_name()
    seg = SharedSegment.create(name, 4096)
    try:
        assert os.stat(seg.path).st_mode & 0o777 == 0o600
        with pytest.raises(FileExistsError):
            SharedSegment.create(name, 4096)
    finally:
        seg.close()
    assert not os.path.exists(seg.path)


def test_hoststaged_missing_rank_times_out_and_aborts_the_others():
    make = hoststaged_factory(3, timeout_s=0.5)

    def body(comm):
        if comm.rank == 2:
            return "absent"  # never joins the collective, like a killed worker
        with pytest.raises(CommError, match=r"ranks \[2\] did not arrive|aborted"):
            comm.all_reduce(torch.ones(4))
        return "failed"

    assert run_ranks(3, make, body) == ["failed", "failed", "absent"]
