"""The cluster path: cluster.yaml passes Ray's own validator."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# cluster.yaml, offline


@pytest.fixture(scope="module")
def cluster_config() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_validator(cluster_config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(cluster_config))


def test_cluster_yaml_cpu_head_and_gpu_workers_from_zero(cluster_config):
    types = cluster_config["available_node_types"]
    head = cluster_config["head_node_type"]
    workers = {name: t for name, t in types.items() if name != head}
    assert workers, "no worker node types"
    for name, t in types.items():
        assert t["node_config"].get("ImageId", "").startswith("ami-"), f"{name}: set an explicit ImageId"
    assert not types[head]["node_config"]["InstanceType"].startswith(("g", "p")), "the head should be a CPU node"
    for name, t in workers.items():
        assert t["min_workers"] == 0, f"{name} should scale from zero"
        assert t["node_config"]["InstanceType"].startswith(("g", "p")), f"{name} should be a GPU instance"
        assert "IamInstanceProfile" in t["node_config"], f"{name} needs S3 access for checkpoints"


def test_cluster_yaml_installs_the_pinned_versions(cluster_config):
    setup = "\n".join(cluster_config["setup_commands"])
    assert "-c ~/ray-fer/constraints.txt ~/ray-fer" in setup
    assert cluster_config["file_mounts"]["~/ray-fer"] == "."
    import ray

    pins = (REPO / "constraints.txt").read_text()
    assert f"ray=={ray.__version__}" in pins, "the cluster must run the Ray version the client runs"


def test_cluster_yaml_turns_on_token_auth_on_every_node(cluster_config):
    assert "~/.ray/auth_token" in cluster_config["file_mounts"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cluster_config[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), key
