"""Shared fixtures: the FER2013 data, one local Ray instance per session, a real S3 server on loopback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Token authentication is on by default in Ray 2.60; these tests talk to Ray on loopback only.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

REPO = Path(__file__).resolve().parents[1]
FER_ROOT = Path(os.environ.get("RAY_FER_DATA", REPO.parent / "shared" / "data" / "fer2013"))


@pytest.fixture(scope="session")
def fer_root() -> Path:
    """The FER2013 image folders (train/ and val/); skipped where absent, a failure in CI."""
    if not (FER_ROOT / "train").is_dir() or not (FER_ROOT / "val").is_dir():
        message = f"FER2013 data not found at {FER_ROOT} (set RAY_FER_DATA to its folder)"
        if os.environ.get("CI"):
            pytest.fail(message + ": CI must have it")
        pytest.skip(message)
    return FER_ROOT


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible HTTP server (moto) on 127.0.0.1, with the standard AWS settings
    pointing at it; yields the endpoint URL. Started before Ray so Ray's workers inherit them."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in _AWS_VARS}
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1", AWS_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
    )
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
             "AWS_REGION", "AWS_EC2_METADATA_DISABLED")


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket on the loopback S3 server; yields its name."""
    import boto3

    name = "t-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:50].strip("-")
    client = boto3.client("s3")
    client.create_bucket(Bucket=name)
    yield name
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=name, Key=obj["Key"])
    client.delete_bucket(Bucket=name)


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray instance with 2 CPUs for the whole session."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {k: os.environ[k] for k in _AWS_VARS}})
    yield ray
    ray.shutdown()
