"""The Ray cluster a command runs on: joining or starting it, what it offers, what it refuses.

`connect()` joins the cluster named by RAY_ADDRESS (inside a Ray job, the job's own cluster) or
starts a private local instance, with the console's settings for every worker. Local paths are
refused on multi-node clusters, where other nodes cannot see them.
"""

from __future__ import annotations

import os
from typing import Any

from ray_fer import storage
from ray_fer.config import ConfigError


_private_instance = False  # this process started the Ray it runs on (set by connect)


def connect() -> bool:
    """Make sure Ray is running; True when this process started it as a private local instance,
    which nothing can autoscale (a request it cannot place would wait for ever)."""
    import ray

    from ray_fer import console

    global _private_instance
    if not ray.is_initialized():
        _private_instance = not os.environ.get("RAY_ADDRESS")
        ray.init(**console.ray_init_kwargs())  # joins RAY_ADDRESS or starts a local instance
    console.quiet_ray_in_process()
    return _private_instance


def alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n["Alive"]]


def refuse_local_paths(paths: dict[str, str], *, shared: bool = False, fix: str = "") -> None:
    """On a cluster of several nodes, refuse local paths (other nodes cannot see them) unless
    `shared` says they are on a filesystem mounted on every node. `paths` maps a setting's name to
    its value; `fix` says how to declare a shared filesystem, if there is a way."""
    local = {name: p for name, p in paths.items() if p and not storage.is_remote(p)}
    if not local or shared:
        return
    nodes = len(alive_nodes())
    if nodes <= 1:
        return
    name, path = next(iter(local.items()))
    raise ConfigError(
        f"{name} {path!r} is local, but the cluster has {nodes} nodes: files on one node are invisible "
        f"to the others. Use s3://BUCKET/PREFIX{fix}"
    )
