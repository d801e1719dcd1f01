"""A device lost for good: the driver re-plans over the devices that remain and serves again.

Three Ray "nodes" on this machine (ray.cluster_utils.Cluster) with one CPU slot each hold one rank each. Removing
a node takes its rank's device away: the request in flight fails with the rank's name, the same three devices
cannot be placed again (two CPU slots are left), so the group is re-planned over the two survivors and the next
request gets transformers' greedy tokens.
"""

import os
import time

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raytp.actors.driver import DriverActor
from raytp.actors.group import GroupSettings
from raytp.parallel.devices import parse_devices
from raytp.runtime.sampling import SamplingParams
from tests.util import transformers_greedy

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def cluster():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def three_nodes(cluster):
    """The head and two nodes beside it, one CPU slot each: a node that an earlier test removed is replaced."""
    while len(cluster.worker_nodes) < 2:
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    return cluster, list(cluster.worker_nodes)


def _driver_on_head(settings: GroupSettings):
    """As `raytp serve` places it: on the node it was started from, which here is the head."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return DriverActor.options(scheduling_strategy=here).remote(settings)


def _run(driver, max_tokens: int) -> dict:
    *_, final = [ray.get(ref) for ref in driver.submit.remote(
        ray.get(driver.encode.remote(prompt=PROMPT)), SamplingParams(temperature=0.0, max_tokens=max_tokens))]
    return final


def test_lost_node_replans_over_the_survivors(three_nodes, smollm2_dir):
    cluster, nodes = three_nodes
    expected = transformers_greedy(smollm2_dir, PROMPT, 16)
    settings = GroupSettings(model="smollm2", devices=tuple(parse_devices("cpu@3GiB,cpu@2GiB,cpu@1GiB")),
                             dtype="float32", max_batch=1, max_context=256, timeout_s=10, progress=False)
    driver = _driver_on_head(settings)
    try:
        info = ray.get(driver.start.remote())
        assert len(info["ranks"]) == 3 and len({r["node_id"] for r in info["ranks"]}) == 3
        victim = next(n for n in nodes if n.node_id in {r["node_id"] for r in info["ranks"]})
        lost_rank = next(r["rank"] for r in info["ranks"] if r["node_id"] == victim.node_id)

        in_flight = driver.submit.remote(ray.get(driver.encode.remote(prompt=PROMPT)),
                                         SamplingParams(temperature=0.0, max_tokens=200))
        assert "text" in ray.get(next(in_flight))  # it is decoding
        cluster.remove_node(victim)
        with pytest.raises(ray.exceptions.RayTaskError, match=rf"rank {lost_rank} \(cpu@\dGiB\) failed"):
            for ref in in_flight:
                ray.get(ref)

        final = _run(driver, 16)  # waits out the rebuild
        assert final["token_ids"] == expected
        info = ray.get(driver.info.remote())
        assert len(info["ranks"]) == 2
        survivors = [d for i, d in enumerate(["cpu@3GiB", "cpu@2GiB", "cpu@1GiB"]) if i != lost_rank]
        assert [r["device"] for r in info["plan"]["ranks"]] == survivors
        assert any("re-planning over the 2 devices that remain" in e for e in info["history"])
    finally:
        ray.get(driver.shutdown.remote())


def test_a_model_that_no_longer_fits_says_what_is_missing(three_nodes, smollm2_dir):
    """Three 200 MiB devices hold float32 SmolLM2 (513 MB) only all together: after one is lost, requests get
    UnavailableError naming each survivor's shortfall."""
    cluster, nodes = three_nodes
    settings = GroupSettings(model="smollm2", devices=tuple(parse_devices("cpu@200MiB,cpu@200MiB,cpu@200MiB")),
                             dtype="float32", max_batch=1, max_context=64, timeout_s=10, progress=False)
    driver = _driver_on_head(settings)
    try:
        info = ray.get(driver.start.remote())
        victim = next(n for n in nodes if n.node_id in {r["node_id"] for r in info["ranks"]})
        cluster.remove_node(victim)
        deadline = time.monotonic() + 120
        while True:
            try:
                _run(driver, 4)
            except ray.exceptions.RayTaskError as e:
                if "cannot be served on the devices that remain" in str(e):
                    assert "short" in str(e)
                    break
            assert time.monotonic() < deadline, "the driver never gave up on the lost device"
            time.sleep(1)
    finally:
        ray.get(driver.shutdown.remote())
