"""cluster.yaml is a valid Ray cluster-launcher config: checked against the JSON schema Ray itself validates with
(ray/autoscaler/ray-schema.json, shipped in the ray package), and the check is shown to catch broken copies."""

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

CLUSTER_YAML = Path(__file__).resolve().parent.parent / "cluster.yaml"


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_matches_rays_schema(schema, config):
    jsonschema.validate(config, schema)


def test_rays_own_config_loader_accepts_it(config):
    """What `ray up` does before it contacts AWS: fill in the defaults, then validate (private Ray API)."""
    util = pytest.importorskip("ray.autoscaler._private.util")
    util.validate_config(util.prepare_config(copy.deepcopy(config)))


def test_cluster_is_heterogeneous_and_installs_raytp(config):
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    instance_types = {t["node_config"]["InstanceType"] for t in workers.values()}
    assert len(instance_types) >= 2, "at least two kinds of GPU node"
    assert config["max_workers"] <= sum(t["max_workers"] for t in workers.values())
    assert sum(t.get("min_workers", 0) for t in workers.values()) <= config["max_workers"]
    setup = "\n".join(config["setup_commands"])
    assert "pip install" in setup and "torch" in setup and "raytp" in setup


@pytest.mark.parametrize("breakage", [
    "max_workers is a string",
    "unknown top-level key",
    "node type without node_config",
    "resource count is not an integer",
])
def test_broken_copies_fail_validation(schema, config, breakage):
    broken = copy.deepcopy(config)
    worker = next(n for n in broken["available_node_types"] if n != broken["head_node_type"])
    if breakage == "max_workers is a string":
        broken["max_workers"] = "three"
    elif breakage == "unknown top-level key":
        broken["max_wokers"] = 3  # a typo Ray must refuse, not ignore
    elif breakage == "node type without node_config":
        del broken["available_node_types"][worker]["node_config"]
    else:
        broken["available_node_types"][worker]["resources"]["a10g_or_a100"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_every_node_uses_token_auth_and_the_dashboard_stays_on_the_head(config):
    """Ray without authentication runs code for anyone who reaches its ports: every `ray start` turns token auth
    on, with the token copied to every node, and the dashboard listens on the head's loopback (reached through
    `ray dashboard`'s SSH tunnel)."""
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"]
              if "ray start" in c]
    assert len(starts) == 2
    assert all("RAY_AUTH_MODE=token ray start" in c for c in starts), starts
    assert any(target.endswith("/.ray/auth_token") for target in config["file_mounts"]), config["file_mounts"]
    head = next(c for c in starts if "--head" in c)
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head, head
