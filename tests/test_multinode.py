"""Ranks on two Ray nodes: host-staged within each node, gloo between the node leaders, the same tokens as one device.

Both "nodes" are raylets on this machine (ray.cluster_utils.Cluster), each with 2 CPU slots, so the group's
PACK placement must put 2 of the 4 cpu ranks on each. They share this machine's /dev/shm, which changes nothing:
every node's segment has its own random name, and what makes a node is the Ray node id each rank reports.
"""

import os

import pytest
import ray
from ray.cluster_utils import Cluster

from raytp.actors.driver import DriverActor
from raytp.actors.group import GroupSettings
from raytp.parallel.devices import parse_devices
from raytp.runtime.options import RuntimeOptions
from raytp.runtime.sampling import SamplingParams
from tests.util import raytp_segments, transformers_greedy

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def two_nodes():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def expected_greedy(smollm2_dir):
    return transformers_greedy(smollm2_dir, PROMPT, MAX_TOKENS)


def test_two_nodes_uneven_ranks_match_one_device(two_nodes, smollm2_dir, expected_greedy):
    before = raytp_segments()
    settings = GroupSettings(model="smollm2", devices=tuple(parse_devices("cpu@3GiB,cpu@1GiB,cpu@2GiB,cpu@2GiB")),
                             dtype="float32", max_batch=1, max_context=256, timeout_s=20, progress=False,
                             # every rank compares its bits with every other rank's after every all-reduce
                             options=RuntimeOptions(check_identical=True))
    driver = DriverActor.remote(settings)
    try:
        info = ray.get(driver.start.remote())
        assert info["backend"] == "hierarchical"
        nodes = [r["node_id"] for r in info["ranks"]]
        assert len(set(nodes)) == 2 and all(nodes.count(n) == 2 for n in nodes), nodes
        assert [r["budget_bytes"] for r in info["plan"]["ranks"]] == [3 << 30, 1 << 30, 2 << 30, 2 << 30]
        prompt_ids = ray.get(driver.encode.remote(prompt=PROMPT))
        *_, final = [ray.get(ref) for ref in driver.submit.remote(prompt_ids, SamplingParams(max_tokens=MAX_TOKENS))]
        assert final["token_ids"] == expected_greedy
    finally:
        ray.get(driver.shutdown.remote())
    assert raytp_segments() <= before
