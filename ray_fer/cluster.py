"""The Ray cluster a command runs on: joining or starting it, what it offers, what it refuses.

`connect()` joins the cluster named by RAY_ADDRESS (inside a Ray job, the job's own cluster) or
starts a private local instance, with the console's settings for every worker. Local paths are
refused on multi-node clusters, where other nodes cannot see them.
"""

from __future__ import annotations

import os
from typing import Any

from ray_fer.store import storage
from ray_fer.config import ConfigError, UserError


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


# --------------------------------------------------------------------------------------------
# Small jobs beside the pipeline: Ray tasks when Ray runs, plain calls when it does not


def submit(fn: Any, *args: Any, num_returns: int = 1, num_cpus: float = 0.25) -> Any:
    """`fn(*args)` as a Ray task (ObjectRefs as arguments are resolved by Ray; returns the task's
    ref, or refs with `num_returns` > 1), or a plain call where this process runs no Ray (the
    output protocol's own tests), returning the values themselves. `fetch` takes either."""
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            return _remote(fn, num_returns, num_cpus).remote(*args)
    return fn(*args)


def fetch(refs: Any) -> Any:
    """The values of what `submit` returned (a ref, a list of refs, or plain values). A task
    that failed with a UserError (a bad manifest, say) raises that error itself: one line."""
    import sys

    if "ray" not in sys.modules:
        return refs
    import ray

    if not (isinstance(refs, ray.ObjectRef) or (isinstance(refs, list) and refs and isinstance(refs[0], ray.ObjectRef))):
        return refs
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, UserError):
            raise e.cause from None
        raise


_REMOTES: dict[tuple[Any, int, float], Any] = {}


def _remote(fn: Any, num_returns: int, num_cpus: float) -> Any:
    import ray

    key = (fn, num_returns, num_cpus)
    if key not in _REMOTES:  # registered once per process, not per call
        _REMOTES[key] = ray.remote(num_returns=num_returns, num_cpus=num_cpus, max_retries=3)(fn)
    return _REMOTES[key]
