"""The cluster path: cluster.yaml passes Ray's own validator, and training and labelling run as Ray
jobs on a real two-node Ray cluster (`ray start`, loopback) with runs and outputs in a real
S3-compatible server (moto)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


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
    import ray

    setup = "\n".join(cluster_config["setup_commands"])
    assert "-c ~/ray-fer/constraints.txt ~/ray-fer" in setup
    assert cluster_config["file_mounts"]["~/ray-fer"] == "."
    pins = (REPO / "constraints.txt").read_text()
    assert f"ray=={ray.__version__}" in pins, "the cluster must run the Ray version the client runs"


def test_cluster_yaml_turns_on_token_auth_on_every_node(cluster_config):
    assert "~/.ray/auth_token" in cluster_config["file_mounts"]
    assert any("export RAY_AUTH_MODE=token" in c for c in cluster_config["setup_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cluster_config[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), key


# --------------------------------------------------------------------------------------------
# The job entrypoints and their configs, without a cluster


@pytest.mark.parametrize("job", ["train", "infer", "evaluate"])
def test_job_entrypoint_is_the_cli_command(job):
    out = subprocess.run([sys.executable, f"jobs/{job}.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: ray-fer {job} "), out.stdout


@pytest.mark.parametrize("job, cls", [("train", "TrainJobConfig"), ("infer", "InferConfig")])
def test_job_configs_are_valid_and_point_at_s3(job, cls):
    from ray_fer import config

    cfg = config.to_dict(config.load_config(getattr(config, cls), REPO / "jobs" / f"{job}.yaml"))
    paths = [v for section in cfg.values() for v in (section.values() if isinstance(section, dict) else [section])
             if isinstance(v, str) and "/" in v]
    assert paths and all(p.startswith("s3://") for p in paths), paths


# --------------------------------------------------------------------------------------------
# Jobs on a real two-node cluster


def _submit(cluster, entrypoint: str, submission_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard_url)
    return client.submit_job(
        entrypoint=entrypoint,
        submission_id=submission_id,
        runtime_env={
            # As `--working-dir .` does: Ray leaves out .git, .venv and what .gitignore names (runs/, out/).
            "working_dir": str(REPO),
            # As for an S3-compatible store: a job's env_vars reach its driver and every worker.
            "env_vars": {k: cluster.env[k] for k in cluster.env if k.startswith("AWS_")},
        },
    )


def _wait(cluster, job_id: str, timeout_s: float) -> tuple[str, str]:
    """(final status, logs) of a job; stops it and fails the test if it runs past timeout_s."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard_url)
    deadline = time.monotonic() + timeout_s
    while (status := str(client.get_job_status(job_id).value)) not in TERMINAL:
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            pytest.fail(f"job {job_id} still {status} after {timeout_s:.0f}s; logs:\n"
                        + client.get_job_logs(job_id)[-5000:])
        time.sleep(1)
    return status, client.get_job_logs(job_id)


PER_CLASS = 6  # images per class and split uploaded to the bucket


@pytest.fixture
def fer_in_s3(s3_bucket, fer_root) -> dict[str, int]:
    """A small FER2013 subset uploaded to the bucket as s3://BUCKET/fer/<split>/<class>/*.jpg;
    returns the image count per split."""
    import boto3

    client = boto3.client("s3")
    counts = {}
    for split in ("train", "val"):
        files = [f for d in sorted((fer_root / split).iterdir()) for f in sorted(d.glob("*.jpg"))[:PER_CLASS]]
        for f in files:
            client.put_object(Bucket=s3_bucket, Key=f"fer/{split}/{f.parent.name}/{f.name}", Body=f.read_bytes())
        counts[split] = len(files)
    return counts


@pytest.mark.cluster
@pytest.mark.slow  # ~90 s: jobs submitted to the loopback cluster; make test-all runs it
def test_train_then_label_as_ray_jobs_on_two_nodes_with_s3(ray_cluster, s3_bucket, fer_in_s3):
    import boto3
    import pyarrow.parquet as pq
    from ray.util.state import list_actors

    from ray_fer.store import storage

    bucket = f"s3://{s3_bucket}"
    train = _submit(ray_cluster, " ".join([
        "python jobs/train.py --config jobs/train.yaml",
        f"--set data.train={bucket}/fer/train --set data.val={bucket}/fer/val",
        "--set data.image_size=32 --set model.weights=none --set train.epochs=1 --set train.batch_size=8",
        f"--set run.name=cluster --set run.storage_path={bucket}/runs --set run.num_workers=2 --set run.use_gpu=false",
    ]), "train")
    status, logs = _wait(ray_cluster, train, 240)
    assert status == "SUCCEEDED", logs[-5000:]
    summary = json.loads(logs.splitlines()[-1])
    assert summary["model"] == f"{bucket}/runs/cluster/model.pt"
    listing = boto3.client("s3").list_objects_v2(Bucket=s3_bucket, Prefix="runs/cluster/")
    keys = {o["Key"] for o in listing["Contents"]}
    assert {"runs/cluster/model.pt", "runs/cluster/config.yaml"} <= keys
    assert any(k.startswith("runs/cluster/checkpoint_") for k in keys), sorted(keys)
    workers = list_actors(address=ray_cluster.dashboard_url, filters=[("class_name", "=", "RayTrainWorker")])
    assert len({w.node_id for w in workers}) == 2, "the two training workers should run on different nodes"

    label = _submit(ray_cluster, " ".join([
        "python jobs/infer.py --config jobs/infer.yaml",
        f"--set model={summary['model']} --set input={bucket}/fer/val --set output={bucket}/labels",
        "--set device=auto",
    ]), "label")
    status, logs = _wait(ray_cluster, label, 180)
    assert status == "SUCCEEDED", logs[-5000:]
    assert json.loads(logs.splitlines()[-1])["images"] == fer_in_s3["val"]
    fs, path = storage.filesystem(f"{bucket}/labels")
    labels = pq.read_table(path, filesystem=fs)  # the Parquet files; _SUCCESS is skipped
    assert labels.num_rows == fer_in_s3["val"]
    assert labels["error"].null_count == labels.num_rows


@pytest.mark.cluster
def test_a_bad_config_fails_the_job_with_the_error_in_its_logs(ray_cluster):
    from ray.job_submission import JobSubmissionClient

    job = _submit(ray_cluster, "python jobs/train.py --config jobs/train.yaml --set train.optimizer=sgdd", "bad")
    status, logs = _wait(ray_cluster, job, 60)
    assert status == "FAILED", logs
    assert "train.optimizer: 'sgdd' is not valid; choose one of: adam, adamw, sgd" in logs
    assert JobSubmissionClient(ray_cluster.dashboard_url).get_job_info(job).driver_exit_code == 2


@pytest.mark.cluster
def test_local_storage_on_several_nodes_fails_the_job_with_the_fix(ray_cluster, fer_root, tmp_path):
    job = _submit(ray_cluster, " ".join([
        "python jobs/train.py --config jobs/train.yaml",
        f"--set data.train={fer_root}/train --set data.val={fer_root}/val --set data.limit_per_class=1",
        "--set train.batch_size=1",  # 7 images over 4 workers: a step each
        f"--set model.weights=none --set run.storage_path={tmp_path}",
    ]), "local-storage")
    status, logs = _wait(ray_cluster, job, 60)
    assert status == "FAILED", logs
    assert f"run.storage_path {str(tmp_path)!r} is local, but the cluster has 2 nodes" in logs
    assert "Use s3://BUCKET/PREFIX" in logs


@pytest.mark.cluster
def test_labelling_and_evaluation_refuse_local_paths_on_several_nodes(ray_cluster, fer_root, tiny_bundle, tmp_path):
    """Decode tasks on the other node could not read a local folder: refused before any work,
    and an existing local output is left alone."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("untouched")
    label = _submit(ray_cluster, f"python jobs/infer.py --model {tiny_bundle} --input {fer_root}/val/disgust "
                                 f"--output {tmp_path}/out --overwrite", "label-local")
    evaluate = _submit(ray_cluster, f"python jobs/evaluate.py --model {tiny_bundle} --data {fer_root}/val "
                                    f"--limit-per-class 2 --output {tmp_path}/eval", "evaluate-local")
    for job, what in ((label, f"input '{fer_root}/val/disgust'"), (evaluate, f"--data '{fer_root}/val'")):
        status, logs = _wait(ray_cluster, job, 90)
        assert status == "FAILED", logs
        assert f"{what} is local, but the cluster has 2 nodes" in logs and "Use s3://BUCKET/PREFIX" in logs
    assert (tmp_path / "out" / "keep.txt").read_text() == "untouched"
    assert not (tmp_path / "eval").exists()
