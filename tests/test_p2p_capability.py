"""Whether P2P can run, and which GPU a rank selects: the decisions, with fake devices (CPU only)."""

import pytest
import ray
import torch

from raytp.actors import worker
from raytp.actors.group import RANK_ENV, GroupSettings, WorkerGroup
from raytp.parallel.comm.p2p import p2p_unavailable
from raytp.parallel.devices import parse_devices


def links(*pairs):
    """can_access for a host whose GPU pairs in `pairs` (both directions) reach each other."""
    ok = {frozenset(p) for p in pairs}
    return lambda a, b: frozenset((a, b)) in ok


def test_p2p_runs_where_every_pair_of_distinct_gpus_reaches_each_other():
    assert p2p_unavailable([0, 1, 2], [10, 11, 12], links((0, 1), (0, 2), (1, 2)), environ={}) is None
    assert p2p_unavailable([3], [13], links(), environ={}) is None  # one rank has no peer to reach


@pytest.mark.parametrize("devices, gpus, can, environ, reason", [
    ([0, 1], [10, 11], links((0, 1)), {"NCCL_P2P_DISABLE": "1"}, "NCCL_P2P_DISABLE is set"),
    ([0, 0, 1], [10, 10, 11], links((0, 1)), {}, "3 ranks share 2 GPUs"),
    ([0, 0], [10, 11], links(), {}, "each rank sees only its own GPU"),
    ([0, 1, 2], [10, 11, 12], links((0, 1), (1, 2)), {}, "cuda:0 cannot access cuda:2"),
])
def test_p2p_declines_with_the_reason(devices, gpus, can, environ, reason):
    assert reason in p2p_unavailable(devices, gpus, can, environ=environ)


def test_p2p_disable_set_to_zero_does_not_decline():
    assert p2p_unavailable([0, 1], [10, 11], links((0, 1)), environ={"NCCL_P2P_DISABLE": "0"}) is None


@pytest.mark.parametrize("ids, visible, index", [
    (["2"], None, 2),  # Ray's id is the CUDA index when nothing narrows the node's GPUs
    (["6"], "4,5,6,7", 2),  # Ray started on GPUs 4-7: id 6 is this process's third device
    (["3"], "3", 0),  # a Ray that narrowed CUDA_VISIBLE_DEVICES after all: the one device left
    ([], "0,1", 0),  # outside Ray
])
def test_a_rank_selects_the_gpu_ray_assigned_it(monkeypatch, ids, visible, index):
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: ids)
    environ = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    assert worker.assigned_gpu(environ) == torch.device("cuda", index)


def test_an_assigned_gpu_that_is_not_visible_is_an_error(monkeypatch):
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: ["5"])
    with pytest.raises(RuntimeError, match="Ray assigned GPU 5, which CUDA_VISIBLE_DEVICES='0,1' does not list"):
        worker.assigned_gpu({"CUDA_VISIBLE_DEVICES": "0,1"})


@pytest.mark.parametrize("no_p2p", [False, True])
def test_gpu_ranks_see_the_node_and_no_p2p_reaches_every_rank(no_p2p):
    devices = tuple(parse_devices("cuda,cpu"))
    group = WorkerGroup(GroupSettings(model="synthetic:tiny", devices=devices, no_p2p=no_p2p), config=None)
    gpu, cpu = (group._rank_env(d) for d in devices)
    assert gpu["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] == "1" and "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES" \
        not in cpu  # a CPU rank keeps Ray's empty CUDA_VISIBLE_DEVICES
    assert all(gpu[k] == v for k, v in RANK_ENV.items()) and all(cpu[k] == v for k, v in RANK_ENV.items())
    assert all((env.get("NCCL_P2P_DISABLE") == "1") == no_p2p for env in (gpu, cpu))
