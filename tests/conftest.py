"""Shared fixtures: the FER2013 data, one local Ray instance per session, a real S3 server on loopback,
a real MLflow tracking server on loopback, a real two-node Ray cluster started with `ray start`, the small models the tests make, and helpers
shared by several test files (imported as `from conftest import ...`)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Token authentication is on by default in Ray 2.60; these tests talk to Ray on loopback only.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory) -> Iterator[Path]:
    """What the driver keeps of the bundles it opened (model_ref.remember): this session's own,
    not the user's ~/.cache; each bundle is opened by a Ray task once in the session."""
    from ray_fer.model_ref import CACHE_ENV

    path = tmp_path_factory.mktemp("model-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(path))
        yield path


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
def photos_root(fer_root) -> Path:
    """24 real photos of people beside FER2013 (its README lists their faces); skipped where absent,
    a failure in CI."""
    root = fer_root.parent / "photos"
    if not (root / "README.md").is_file():
        message = f"the photos for face detection tests are not at {root}"
        if os.environ.get("CI"):
            pytest.fail(message + ": CI must have them")
        pytest.skip(message)
    return root


@pytest.fixture(scope="session")
def wild_root(fer_root) -> Path:
    """wild-faces beside FER2013: real news and film faces in the seven classes (dev/, train/);
    skipped where absent, a failure in CI."""
    root = fer_root.parent / "wild-faces"
    if not (root / "dev").is_dir() or not (root / "train").is_dir():
        message = f"the wild-faces data set is not at {root}"
        if os.environ.get("CI"):
            pytest.fail(message + ": CI must have it")
        pytest.skip(message)
    return root


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible HTTP server (moto) on 127.0.0.1 behind `FaultyS3Proxy`, with the
    standard AWS settings pointing at the proxy; yields the proxy (`.endpoint`, `.fail(...)`).
    Started before Ray so Ray's workers inherit the settings."""
    from moto.server import ThreadedMotoServer

    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one INFO line per S3 request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    proxy = FaultyS3Proxy(f"{host}:{port}")
    saved = {k: os.environ.get(k) for k in _AWS_VARS}
    os.environ.update(
        AWS_ENDPOINT_URL=proxy.endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1", AWS_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
    )
    try:
        yield proxy
    finally:
        proxy.close()
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class FaultyS3Proxy:
    """A real HTTP server on loopback in front of moto that forwards every request, and fails the
    requests for chosen keys as a troubled store does: `503 SlowDown`, or a connection reset
    without an answer. Off until `fail()` is called; `heal()` turns it off again."""

    def __init__(self, upstream: str) -> None:
        import http.server
        import threading

        self.upstream = upstream
        self.lock = threading.Lock()
        self.rules: dict[str, list] = {}  # "/bucket/key" -> [attempts left to fail, how]
        self.failed: dict[str, int] = {}  # "/bucket/key" -> requests failed so far
        # conditional PUTs and DELETEs (If-Match, If-None-Match), as some S3-compatible stores
        # treat them: None forwards them, "reject" answers 501 NotImplemented, "ignore" drops
        # the condition and forwards the request
        self.conditions: str | None = None
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _forward(self) -> None:
                import http.client
                import urllib.parse

                key = urllib.parse.unquote(self.path.split("?", 1)[0])
                how = proxy._should_fail(key) if self.command in ("GET", "HEAD") else None
                body = self._body()
                conditional = [h for h in ("If-Match", "If-None-Match") if h in self.headers]
                if conditional and self.command in ("PUT", "DELETE") and proxy.conditions == "reject":
                    payload = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>NotImplemented</Code>"
                               b"<Message>A header you provided implies functionality that is not implemented"
                               b"</Message></Error>")
                    self.send_response(501)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if conditional and proxy.conditions == "ignore":
                    for h in conditional:
                        del self.headers[h]
                if how == "reset":
                    import socket
                    import struct

                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                if how == "503":
                    payload = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code>"
                               b"<Message>Please reduce your request rate.</Message></Error>")
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding",)}
                if body is not None:
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                self.send_response(answer.status, answer.reason)
                for k, v in answer.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # a HEAD answer's Content-Length is the object's size, not this (empty) body's
                size = answer.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", size or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            def _body(self) -> bytes | None:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else (b"" if self.command in ("PUT", "POST") else None)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def fail(self, bucket: str, keys, *, times: int, how: str = "503") -> None:
        """Fail the next `times` GET/HEAD requests of each key ("503" or "reset"); -1: for ever."""
        with self.lock:
            for key in keys:
                self.rules[f"/{bucket}/{key}"] = [times, how]

    def heal(self) -> None:
        with self.lock:
            self.rules.clear()
            self.failed.clear()
            self.conditions = None

    def _should_fail(self, key: str) -> str | None:
        with self.lock:
            rule = self.rules.get(key)
            if rule is None or rule[0] == 0:
                return None
            rule[0] -= 1
            self.failed[key] = self.failed.get(key, 0) + 1
            return rule[1]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def dst(request, tmp_path) -> str:
    """An output that does not exist yet: a local folder, or a prefix in a bucket on loopback S3."""
    if request.param == "local":
        return str(tmp_path / "out")
    return f"s3://{request.getfixturevalue('s3_bucket')}/out/labels"


def _lease_timeout(dst: str) -> float:
    """Lease timeouts for tests: S3 dates (LastModified, Date) have a resolution of one second."""
    from ray_fer.store import storage

    return 2.0 if storage.is_remote(dst) else 0.6


def _past_lease_timeout(dst: str) -> float:
    """How long to wait for a lease no longer renewed to count as dead."""
    from ray_fer.store import storage

    return _lease_timeout(dst) + (1.1 if storage.is_remote(dst) else 0.3)


def _one_line(e: pytest.ExceptionInfo) -> str:
    """The text of a raised error, which must be one line."""
    text = str(e.value)
    assert len(text.splitlines()) == 1, text
    return text


@pytest.fixture
def s3_faults(s3_server):
    """The proxy in front of the loopback S3 server, healed again after the test."""
    yield s3_server
    s3_server.heal()


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


@dataclass
class MlflowServer:
    uri: str  # http://127.0.0.1:<port>: what MLFLOW_TRACKING_URI takes
    process: subprocess.Popen
    log: Path


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on loopback, as `mlflow server` runs it: runs and registered
    models in SQLite, artifacts in a temporary folder served through the server."""
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log = root / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = MlflowServer(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + 90
    while not _http_ok(f"{server.uri}/health"):
        if process.poll() is not None or time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL) if process.poll() is None else None
            raise RuntimeError(f"mlflow server did not start:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.3)
    yield server
    os.killpg(process.pid, signal.SIGTERM)  # the server and its uvicorn workers
    try:
        process.wait(timeout=3)
    except subprocess.TimeoutExpired:  # SQLite commits every request: nothing is lost
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


# --------------------------------------------------------------------------------------------
# A real multi-node Ray cluster on this machine, started with `ray start` as a user would


@dataclass
class LoopbackCluster:
    dashboard_url: str  # dashboard and job API on 127.0.0.1: JobSubmissionClient(dashboard_url)
    gcs_address: str  # what `ray start --address` and ray.init(address=...) take
    temp_dir: Path  # each node's --temp-dir (sessions, logs) and `ray start` output are under it
    env: dict[str, str]  # the environment every node (and so every job) runs with


CLUSTER_NODES = 2
CLUSTER_CPUS_PER_NODE = 1  # two 1-CPU nodes: a 2-worker training run must span both


@pytest.fixture(scope="module")  # gone before other modules start Ray instances of their own
def ray_cluster(s3_server) -> LoopbackCluster:
    """A two-node Ray cluster: a head (GCS, dashboard and job server on 127.0.0.1) and a second
    node joined with `ray start --address`, each a `ray start --block` process of its own.

    Its own ports and --temp-dir keep it apart from `ray_local`'s in-process instance (a plain
    `ray stop` would kill that one too, so it is never used). Every node runs from this venv with
    the loopback S3 settings in its environment. Stopped at the end of the session, also after a
    failure, and then checked: none of its processes may be left running.
    """
    from ray.util.state import list_nodes

    venv_bin = Path(sys.executable).parent
    # Short: Ray's Unix socket paths under it must stay within 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="rfc-", dir="/tmp"))
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # on SIGTERM, stop now: no 30 s drain per node
    env.pop("RAY_ADDRESS", None)
    gcs_port, dashboard_port = _free_port(), _free_port()
    dashboard_url = f"http://127.0.0.1:{dashboard_port}"
    nodes: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> None:
        # A --temp-dir per node, as on separate machines: nodes sharing one would each forward
        # every worker's log lines to the job driver, so a job's log would hold them twice.
        (temp_dir / name).mkdir()
        with open(temp_dir / f"{name}.out", "wb") as out:
            nodes.append(subprocess.Popen(
                [str(venv_bin / "ray"), "start", "--block", "--disable-usage-stats", f"--temp-dir={temp_dir / name}",
                 f"--num-cpus={CLUSTER_CPUS_PER_NODE}", "--num-gpus=0", f"--object-store-memory={256 * 2**20}",
                 f"--dashboard-agent-listen-port={_free_port()}", *args],
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: Ctrl-C in pytest does not reach it
            ))

    try:
        start("head", "--head", f"--port={gcs_port}", "--dashboard-host=127.0.0.1",
              f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={_free_port()}")
        # `ray start` writes the GCS address here once the head is up (Ray replaces 127.0.0.1
        # with this machine's address for node-to-node traffic).
        address_file = temp_dir / "head" / "ray_current_cluster"
        _wait_for("the head node", nodes, temp_dir, lambda: address_file.is_file() and _http_ok(
            dashboard_url + "/api/version"))
        gcs_address = address_file.read_text().strip()
        for i in range(1, CLUSTER_NODES):
            start(f"node{i}", f"--address={gcs_address}")
        _wait_for(f"{CLUSTER_NODES} alive nodes", nodes, temp_dir, lambda: len(
            list_nodes(address=dashboard_url, filters=[("state", "=", "ALIVE")])) == CLUSTER_NODES)
        yield LoopbackCluster(dashboard_url, gcs_address, temp_dir, env)
    finally:
        left = _stop_nodes(nodes, temp_dir)
    if left:
        raise AssertionError(f"processes of the test cluster were left running and got killed: {left}; "
                             f"its logs are kept in {temp_dir}")
    shutil.rmtree(temp_dir, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _wait_for(what: str, nodes: list[subprocess.Popen], temp_dir: Path, ready, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if ready():
                return
        except Exception:  # noqa: BLE001 - the servers are still coming up
            pass
        dead = [n for n in nodes if n.poll() is not None]
        if dead or time.monotonic() > deadline:
            outputs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                                for p in sorted(temp_dir.glob("*.out")))
            reason = f"`ray start` exited with {dead[0].returncode}" if dead else f"not ready after {timeout_s:.0f}s"
            raise RuntimeError(f"test cluster: waiting for {what}: {reason}\n{outputs}")
        time.sleep(0.5)


def _stop_nodes(nodes: list[subprocess.Popen], temp_dir: Path) -> list[str]:
    """Stop the `ray start --block` processes (each stops its node's Ray processes on SIGTERM),
    then kill whatever of theirs survived: workers, job drivers. Returns what had to be killed."""
    import ray  # noqa: F401 - puts Ray's bundled psutil on sys.path
    import psutil

    tree: dict[int, psutil.Process] = {}
    for node in nodes:
        try:
            root = psutil.Process(node.pid)
            tree.update({p.pid: p for p in [root, *root.children(recursive=True)]})
        except psutil.NoSuchProcess:
            pass
    for node in reversed(nodes):  # worker nodes first, the head last
        if node.poll() is None:
            node.terminate()
    for node in reversed(nodes):
        try:
            node.wait(timeout=30)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()
    # Helpers such as the dashboard's multiprocessing forkserver exit shortly after their parent.
    _, survivors = psutil.wait_procs([p for p in tree.values() if _alive(p)], timeout=10)
    # Anything else still working in the cluster's temp dir (e.g. a job driver's working_dir).
    survivors += [p for p in psutil.process_iter()
                  if p.pid not in tree and p.pid != os.getpid() and _uses_dir(p, str(temp_dir))]
    left = []
    for p in survivors:
        try:
            left.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(survivors, timeout=10)
    return left


def _alive(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _uses_dir(p, directory: str) -> bool:
    import psutil

    try:
        return directory in " ".join(p.cmdline()) or (p.cwd() + os.sep).startswith(directory + os.sep)
    except psutil.Error:
        return False


# --------------------------------------------------------------------------------------------
# Models made here (no downloads) and helpers shared by several test files


# A small known set: angry 4, disgust 2, fear 3, happy 1, neutral 0 (but predicted once), sad 2 (never
# predicted), surprise 0 (never predicted).
Y_TRUE = [0, 0, 0, 0, 1, 1, 2, 2, 2, 3, 5, 5]
Y_PRED = [0, 0, 1, 2, 1, 0, 2, 2, 4, 3, 0, 2]


def _png_size(data: bytes) -> tuple[int, int]:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG"
        im.load()
        return im.size


def _metrics_with_identity() -> dict:
    from ray_fer import metrics

    m = metrics.classification_metrics(Y_TRUE, Y_PRED)
    m.update(model={"uri": "runs/x/model.pt", "id": "0123456789abcdef", "image_size": 64},
             data="/data/val", tta="flip", num_errors=1)
    return m


def _run_cli(argv, capsys):
    from ray_fer import cli

    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _fer_pixels(root: Path, split: str, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np
    import torch

    from ray_fer.label.decode import decode_image
    from ray_fer.labels import CLASSES

    images, labels = [], []
    for label, name in enumerate(CLASSES):
        for path in sorted((root / split / name).glob("*.jpg"))[:per_class]:
            images.append(decode_image(path.read_bytes(), 48)[0])
            labels.append(label)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels)


@pytest.fixture(scope="module")
def random_bundle(fer_root, tmp_path_factory) -> str:
    """EfficientNet-B0 with random weights whose batch-norm statistics are calibrated on FER faces
    and a random head: varied labels for a fraction of a second of compute."""
    import torch

    from ray_fer.model import ModelBundle, build_model, save_bundle

    torch.manual_seed(0)
    model = build_model("none")
    torch.nn.init.normal_(model.classifier[1].weight, std=0.05)
    bundle = ModelBundle(state_dict={}, image_size=48, decode_size=48)
    x, _ = _fer_pixels(fer_root, "train", 24)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # a plain average over the calibration batches
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), 56):
            model(bundle.eval_preset()(x[i:i + 56]))
    bundle.state_dict = model.eval().state_dict()
    path = tmp_path_factory.mktemp("models") / "random.pt"
    save_bundle(bundle, str(path))
    return str(path)


TRAIN_RECIPE = {"per_class": 1000, "epochs": 5, "image_size": 48, "lr": 1e-3, "seed": 0}


@pytest.fixture(scope="module")
def trained_bundle(request, fer_root, tmp_path_factory) -> str:
    """EfficientNet-B0 trained from scratch on a balanced FER2013 subset (TRAIN_RECIPE; about two
    minutes on 2 cores), kept in pytest's cache so that later runs reuse it."""
    import torch

    from ray_fer.images import train_preset
    from ray_fer.model import ModelBundle, build_model, save_bundle
    from ray_fer.train.loop import train_one_epoch

    key = "-".join(f"{k}{v}" for k, v in TRAIN_RECIPE.items())
    cache = getattr(request.config, "cache", None)
    folder = cache.mkdir("ray-fer-models") if cache is not None else tmp_path_factory.mktemp("models")
    path = Path(folder) / f"trained-{key}.pt"
    if path.exists():
        return str(path)
    torch.manual_seed(TRAIN_RECIPE["seed"])
    x, y = _fer_pixels(fer_root, "train", TRAIN_RECIPE["per_class"])
    model = build_model("none").to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=TRAIN_RECIPE["lr"], weight_decay=0.05)
    preset = train_preset("flip_rotate", image_size=TRAIN_RECIPE["image_size"])
    for _ in range(TRAIN_RECIPE["epochs"]):
        order = torch.randperm(len(x))
        batches = [{"image": x[order[i:i + 64]], "label": y[order[i:i + 64]]} for i in range(0, len(x), 64)]
        train_one_epoch(model, batches, preset, optimizer, device=torch.device("cpu"))
    bundle = ModelBundle(state_dict=model.eval().state_dict(), image_size=TRAIN_RECIPE["image_size"], decode_size=48)
    save_bundle(bundle, str(path))
    return str(path)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> str:
    """Random weights, no data: for shape and plumbing tests."""
    import torch

    from ray_fer.model import ModelBundle, build_model, save_bundle

    torch.manual_seed(1)
    model = build_model("none")
    torch.nn.init.normal_(model.classifier[1].weight, std=0.05)
    path = tmp_path_factory.mktemp("models") / "tiny.pt"
    save_bundle(ModelBundle(state_dict=model.eval().state_dict(), image_size=32, decode_size=48), str(path))
    return str(path)


def _small_bundle(seed: int = 0) -> ModelBundle:
    """An EfficientNet-B0 bundle whose predictions depend on the image, built in seconds.

    A freshly initialised network in eval mode maps every image to nearly the same features
    (BatchNorm's running statistics are 0 and 1); calibrating them on a few random batches and
    drawing a random head makes the outputs differ from image to image, as a trained model's do.
    """
    import torch

    from ray_fer.images import EvalPreset
    from ray_fer.model import ModelBundle, build_model

    torch.manual_seed(seed)
    model = build_model("none")
    preset = EvalPreset(image_size=48, channels_last=False)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: the statistics of exactly these batches
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(preset(torch.randint(0, 256, (32, 48, 48), dtype=torch.uint8)))
        model.classifier[1].weight.normal_(0.0, 0.3)
        model.classifier[1].bias.zero_()
    history = [{"epoch": 1, "train_loss": 1.9, "val_loss": 1.8, "train_acc": 0.3, "val_acc": 0.32},
               {"epoch": 2, "train_loss": 1.7, "val_loss": 1.75, "train_acc": 0.36, "val_acc": 0.35}]
    return ModelBundle(state_dict=model.state_dict(), image_size=48, decode_size=48,
                       metrics=history[1], history=history)


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory) -> str:
    from ray_fer.model import save_bundle

    path = tmp_path_factory.mktemp("run") / "model.pt"
    save_bundle(_small_bundle(), str(path))
    return str(path)


@pytest.fixture(scope="module")
def small_model(bundle_path):
    from ray_fer.model import load_bundle

    bundle, _ = load_bundle(bundle_path)
    return bundle.build_model(), bundle.eval_preset(channels_last=False)
