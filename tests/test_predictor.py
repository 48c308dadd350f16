"""label/predictor.py: the model call (predict_probs, precision, TTA, folded batch norms), the Predictor
called in this process, resource plans, and the compiled and bf16 fast paths."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from conftest import _fer_pixels
from ray_fer.label.decode import decode_image
from ray_fer.labels import CLASSES, PROB_COLUMNS
from ray_fer.model import load_bundle
from ray_fer.precision import cpu_has_native_bf16
from ray_fer.label.plan import CPU_CHUNK, PlanError, plan_predictors
from ray_fer.label.predictor import Predictor, fold_batchnorm, predict_probs


def _predictor(uri: str, **kwargs) -> Predictor:
    bundle, model_id = load_bundle(uri)
    return Predictor(bundle, model_id=model_id, device="cpu", **kwargs)


# --------------------------------------------------------------------------------------------
# predict_probs and precision


def test_predict_probs_shape_dtype_and_sum(tiny_bundle):
    bundle, _ = load_bundle(tiny_bundle)
    net = bundle.build_model()
    pixels = torch.randint(0, 256, (5, 48, 48), dtype=torch.uint8)
    probs = predict_probs(net, bundle.eval_preset(), pixels)
    assert probs.shape == (5, 7) and probs.dtype == torch.float32
    assert torch.allclose(probs.sum(1), torch.ones(5), atol=1e-5)
    bf16 = predict_probs(net, bundle.eval_preset(), pixels, autocast_dtype=torch.bfloat16)
    assert bf16.dtype == torch.float32 and torch.allclose(bf16.sum(1), torch.ones(5), atol=1e-5)


def test_bf16_near_ties_are_recomputed_in_fp32(random_bundle, fer_root, monkeypatch):
    """Rows whose two top classes are closer than NEAR_TIE under bf16 get fp32's probabilities;
    the others keep bf16's. The calibrated random model has many near-ties."""
    import ray_fer.label.predictor as predictor

    threshold = predictor.NEAR_TIE
    bundle, _ = load_bundle(random_bundle)
    net, preset = bundle.build_model(), bundle.eval_preset()
    pixels, _ = _fer_pixels(fer_root, "val", 20)
    fp32 = predict_probs(net, preset, pixels)
    checked = predict_probs(net, preset, pixels, autocast_dtype=torch.bfloat16)
    monkeypatch.setattr(predictor, "NEAR_TIE", 0.0)
    raw = predict_probs(net, preset, pixels, autocast_dtype=torch.bfloat16)
    top2 = raw.topk(2, dim=1).values
    near = (top2[:, 0] - top2[:, 1]) < threshold
    assert 0 < near.sum() < len(pixels), "the fixture should give some near-ties and some clear rows"
    assert torch.allclose(checked[near], fp32[near], atol=1e-6)
    assert torch.equal(checked[~near], raw[~near])
    agree = lambda probs: int((probs.argmax(1) == fp32.argmax(1)).sum())  # noqa: E731
    assert agree(checked) >= agree(raw)  # re-computed rows can only join fp32's labels


def test_a_batch_of_chunks_recomputes_its_near_ties_in_one_call(random_bundle, fer_root, monkeypatch):
    """The model sees `chunk` rows per call; a batch's near-ties, from all its chunks, go through
    the fp32 model together: three bf16 calls and one fp32 call for 280 faces in chunks of 128."""
    import ray_fer.label.predictor as predictor

    bundle, _ = load_bundle(random_bundle)
    net, preset = bundle.build_model(), bundle.eval_preset()
    pixels, _ = _fer_pixels(fer_root, "val", 40)
    whole = predict_probs(net, preset, pixels)
    assert torch.allclose(predict_probs(net, preset, pixels, chunk=128), whole, atol=1e-5)
    gaps = whole.topk(2, dim=1).values
    monkeypatch.setattr(predictor, "NEAR_TIE", float((gaps[:, 0] - gaps[:, 1]).quantile(0.15)))
    calls = []
    net.classifier.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    checked = predict_probs(net, preset, pixels, autocast_dtype=torch.bfloat16, chunk=128)
    assert calls[:3] == [128, 128, 24] and len(calls) == 4 and 0 < calls[3] <= 128, calls
    assert torch.allclose(checked.sum(1), torch.ones(len(pixels)), atol=1e-5)


def test_the_predictor_calls_the_model_cpu_chunk_rows_at_a_time(tiny_bundle):
    """A predictor batch of 300 faces (the CPU plan's batches hold 512): calls of CPU_CHUNK rows."""
    predictor = _predictor(tiny_bundle, precision="fp32", batch_size=512)
    calls = []
    predictor.net.classifier.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    predictor(_batch(300, []))
    assert calls == [CPU_CHUNK, CPU_CHUNK, 300 - 2 * CPU_CHUNK]


class _Overflow:
    """Hooks that make the model's logits infinite, as fp16 overflow does: for a white face only
    under autocast (fp32 gets it right), for a black face always."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.rows: tuple[torch.Tensor, torch.Tensor] | None = None
        net.features[0].register_forward_pre_hook(self.look)
        net.classifier.register_forward_hook(self.poison)

    def look(self, module, args) -> None:
        mean = args[0].float().mean(dim=(1, 2, 3))
        self.rows = (mean > 1.5, mean < -1.5)  # white, black (normalised pixels)

    def poison(self, module, args, out) -> torch.Tensor:
        white, black = self.rows
        out = out.clone()
        out[black, 0] = float("inf")
        if torch.is_autocast_enabled("cpu"):
            out[white, 0] = float("inf")
        return out


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_non_finite_outputs_are_recomputed_in_fp32_and_else_written_as_errors(tiny_bundle, precision):
    from ray_fer.label.predictor import NON_FINITE

    predictor = _predictor(tiny_bundle, precision=precision)
    _Overflow(predictor.net)
    batch = _batch(4, [])
    batch["image"][0], batch["image"][1] = 255, 0  # white: overflows under autocast only; black: always
    rows = predictor(batch).to_pylist()
    assert rows[0]["label"] in CLASSES and rows[0]["error"] is None  # re-computed in fp32 (or fp32 already)
    assert abs(sum(rows[0][c] for c in PROB_COLUMNS) - 1) < 1e-5
    assert rows[1]["error"] == NON_FINITE and rows[1]["label"] is None and rows[1]["confidence"] is None
    assert all(rows[1][c] is None for c in PROB_COLUMNS)
    assert all(r["label"] in CLASSES and r["error"] is None for r in rows[2:])


def test_cpu_plan_gives_the_actors_the_cores_decoding_does_not_need():
    two = plan_predictors({"CPU": 2})
    assert (two.actors, two.threads, two.decode_cpus, two.batch_size) == (2, 1, 0.25, 512)
    assert two.actors * two.num_cpus == 2 - 0.75  # decode tasks and the write stage keep 0.75
    big = plan_predictors({"CPU": 16})
    assert (big.actors, big.threads) == (8, 2) and big.actors * big.threads == 16
    assert plan_predictors({"CPU": 4}, actors=2).threads == 2  # a pool of the user's size still uses every core


def test_predict_probs_flip_averages_the_mirror_image(tiny_bundle):
    bundle, _ = load_bundle(tiny_bundle)
    net, preset = bundle.build_model(), bundle.eval_preset()
    pixels = torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8)
    expected = (predict_probs(net, preset, pixels) + predict_probs(net, preset, pixels.flip(-1))) / 2
    assert torch.allclose(predict_probs(net, preset, pixels, tta="flip"), expected, atol=1e-6)
    assert predict_probs(net, preset, pixels, tta="tencrop").shape == (3, 7)
    with pytest.raises(ValueError, match="none, flip, tencrop"):
        predict_probs(net, preset, pixels, tta="mirror")


def test_tta_equals_averaging_hand_made_views(small_model):
    from ray_fer.label.predictor import predict_probs

    net, preset = small_model
    x = torch.randint(0, 256, (6, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))

    def probs(pixels):
        with torch.no_grad():
            return torch.softmax(net(preset(pixels)), dim=1)

    plain = predict_probs(net, preset, x, tta="none")
    assert plain.std(dim=0).max() > 1e-3, "the test model must tell images apart"
    by_hand = (probs(x) + probs(torch.from_numpy(np.ascontiguousarray(x.numpy()[:, :, ::-1])))) / 2
    assert torch.allclose(predict_probs(net, preset, x, tta="flip"), by_hand, atol=1e-6)
    crops = [x[:, r:r + 43, c:c + 43] for r, c in ((0, 0), (0, 5), (5, 0), (5, 5), (2, 2))]
    crops += [torch.from_numpy(np.ascontiguousarray(c.numpy()[:, :, ::-1])) for c in crops]
    by_hand = torch.stack([probs(c) for c in crops]).mean(dim=0)
    assert torch.allclose(predict_probs(net, preset, x, tta="tencrop"), by_hand, atol=1e-6)


def test_folded_batchnorm_gives_the_same_probabilities(tiny_bundle):
    
    bundle, _ = load_bundle(tiny_bundle)
    pixels = torch.randint(0, 256, (4, 48, 48), dtype=torch.uint8)
    plain = predict_probs(bundle.build_model(), bundle.eval_preset(), pixels)
    folded = fold_batchnorm(bundle.build_model())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert torch.allclose(predict_probs(folded, bundle.eval_preset(), pixels), plain, atol=1e-5)


# --------------------------------------------------------------------------------------------
# The predictor, called in this process


def _batch(n_ok: int, errors: list[str], *, all_null_as_nan: bool = False) -> dict[str, np.ndarray]:
    n = n_ok + len(errors)
    error = np.array([None] * n_ok + errors, dtype=object)
    if all_null_as_nan and not errors:
        error = np.full(n, np.nan, dtype=np.float32)  # what Ray makes of an all-null column
    return {
        "path": np.array([f"/x/{i}.jpg" for i in range(n)], dtype=object),
        "image": np.random.default_rng(0).integers(0, 256, (n, 48, 48), dtype=np.uint8),
        "width": np.full(n, 48, dtype=np.int32),
        "true_label": np.arange(n) % 7,
        "error": error,
    }


def test_predictor_passes_columns_through_and_nulls_error_rows(tiny_bundle):
    out = _predictor(tiny_bundle, precision="fp32")(_batch(3, ["empty file", "not an image"]))
    assert isinstance(out, pa.Table) and out.num_rows == 5
    assert out.column_names == ["path", "width", "true_label", "label", "confidence", *PROB_COLUMNS,
                                "error", "model"]
    rows = out.to_pylist()
    assert [r["path"] for r in rows] == [f"/x/{i}.jpg" for i in range(5)]
    assert [r["true_label"] for r in rows] == [0, 1, 2, 3, 4]
    for r in rows[:3]:
        assert r["label"] in CLASSES and r["error"] is None
        assert abs(sum(r[c] for c in PROB_COLUMNS) - 1) < 1e-5
        assert r["confidence"] == max(r[c] for c in PROB_COLUMNS)
    for r, reason in zip(rows[3:], ["empty file", "not an image"]):
        assert r["error"] == reason and r["label"] is None and r["confidence"] is None
        assert all(r[c] is None for c in PROB_COLUMNS)
    assert out.schema.field("confidence").type == pa.float32()
    assert {r["model"] for r in rows} == {load_bundle(tiny_bundle)[1]}


def test_predictor_reads_ray_all_null_error_column_and_all_error_batches(tiny_bundle):
    predictor = _predictor(tiny_bundle)
    out = predictor(_batch(4, [], all_null_as_nan=True))
    assert out["error"].null_count == 4 and out["label"].null_count == 0
    out = predictor(_batch(0, ["empty file", "empty file"]))
    assert out["label"].null_count == 2 and out.schema.field("label").type == pa.string()


def test_predictor_refuses_a_column_it_would_overwrite(tiny_bundle):
    batch = _batch(2, [])
    batch["label"] = batch.pop("true_label")
    with pytest.raises(ValueError, match="'label' would be overwritten"):
        _predictor(tiny_bundle)(batch)


def test_predictor_loads_from_a_uri_and_checks_tta(tiny_bundle):
    predictor = Predictor(tiny_bundle, device="cpu", tta="flip")
    assert predictor.model_id == load_bundle(tiny_bundle)[1]
    with pytest.raises(ValueError, match="unknown test-time augmentation"):
        Predictor(tiny_bundle, device="cpu", tta="sideways")


# --------------------------------------------------------------------------------------------
# Resource plans: the pool never takes every CPU


@pytest.mark.parametrize("cpus", [1, 2, 3, 4, 8, 16, 64])
def test_cpu_plan_leaves_a_cpu_for_decoding(cpus):
    plan = plan_predictors({"CPU": cpus})
    assert plan.device == "cpu" and plan.num_gpus == 0
    assert plan.actors * plan.num_cpus + plan.decode_cpus <= cpus
    assert 1 <= plan.threads <= cpus and plan.memory > 0


@pytest.mark.parametrize("cpus", [1, 2, 3, 4, 8, 16, 64])
def test_face_plan_has_the_pool_shape_of_the_plain_one_with_smaller_batches(cpus):
    # the same shape: a pool of one actor per CPU left no room for decode tasks on a cluster of
    # 1-CPU nodes (the labelling job of test_cluster hung)
    plan, plain = plan_predictors({"CPU": cpus}, faces=True), plan_predictors({"CPU": cpus})
    assert plan.actors * plan.num_cpus + plan.decode_cpus <= cpus and plan.batch_size == CPU_CHUNK < plain.batch_size
    assert (plan.actors, plan.num_cpus, plan.threads, plan.decode_cpus) == (
        plain.actors, plain.num_cpus, plain.threads, plain.decode_cpus)
    gpu = plan_predictors({"CPU": cpus, "GPU": 2}, faces=True)
    assert (gpu.device, gpu.actors, gpu.batch_size) == ("gpu", 2, 256)


def test_cpu_plan_leaves_room_for_decoding_on_each_node_of_one_cpu():
    # two 1-CPU nodes (test_cluster's): one actor on each, and a decode task still fits beside it
    plan = plan_predictors({"CPU": 2})
    assert plan.actors == 2 and 1.0 - plan.num_cpus >= plan.decode_cpus


def test_plan_declares_memory_the_cluster_has():
    assert plan_predictors({"CPU": 2, "memory": 16 * 1024**3}).memory == 2 * 1024**3
    # the face detector's actors need more (measured by bench_faces.py), where the cluster has it
    assert plan_predictors({"CPU": 2, "memory": 16 * 1024**3}, faces=True).memory == 4 * 1024**3
    assert plan_predictors({"CPU": 2, "memory": 8 * 1024**3}, faces=True).memory == 2 * 1024**3
    small = plan_predictors({"CPU": 4, "memory": 2 * 1024**3}, actors=2)
    assert 0 < small.actors * small.memory <= 1024**3


def test_gpu_plan_is_one_actor_per_gpu():
    plan = plan_predictors({"CPU": 16, "GPU": 4})
    assert (plan.device, plan.actors, plan.num_gpus) == ("gpu", 4, 1)
    assert plan.tasks_in_flight > 2 and plan.actors * plan.num_cpus < 16
    assert plan_predictors({"CPU": 16, "GPU": 4}, device="cpu").device == "cpu"
    assert plan_predictors({"CPU": 2, "GPU": 1}).num_cpus <= 1


def test_plan_errors_name_the_fix():
    with pytest.raises(PlanError, match="no GPUs .*cannot add any.*; use --set device=auto"):
        plan_predictors({"CPU": 4}, device="gpu")
    with pytest.raises(PlanError, match="actors=3 but the Ray cluster has 2 GPUs"):
        plan_predictors({"CPU": 4, "GPU": 2}, actors=3)


def test_gpu_pool_grows_with_an_autoscaling_cluster():
    # GPU nodes scaled to zero: the pool waits for the first one, then grows to `actors`
    scaled_to_zero = plan_predictors({"CPU": 8}, device="gpu", actors=4, autoscaling=True)
    assert (scaled_to_zero.device, scaled_to_zero.min_actors, scaled_to_zero.actors) == ("gpu", 1, 4)
    # two GPUs now, up to six later
    growing = plan_predictors({"CPU": 8, "GPU": 2}, actors=6, autoscaling=True)
    assert (growing.min_actors, growing.actors, growing.num_gpus) == (2, 6, 1)
    # without an autoscaler the pool is what the cluster has
    fixed = plan_predictors({"CPU": 8, "GPU": 2})
    assert fixed.min_actors == fixed.actors == 2
    # auto still means CPUs on a cluster that has no GPU now
    assert plan_predictors({"CPU": 8}, autoscaling=True).device == "cpu"


# --------------------------------------------------------------------------------------------
# The bf16 and compiled fast paths on a trained model


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16 (auto precision is fp32 here)")
def test_bf16_labels_agree_with_fp32_on_fer_val(fer_root, trained_bundle):
    """The fast path exactly as the Predictor runs it (batch norms folded, channels_last, bf16)
    against the plain fp32 model."""
    bundle, _ = load_bundle(trained_bundle)
    net = bundle.build_model()
    fast = fold_batchnorm(bundle.build_model()).to(memory_format=torch.channels_last)
    preset = bundle.eval_preset()
    files = sorted((fer_root / "val").glob("*/*.jpg"))
    pixels = torch.from_numpy(np.stack([decode_image(f.read_bytes(), 48)[0] for f in files]))
    fp32, bf16 = [], []
    for i in range(0, len(pixels), 256):
        fp32.append(predict_probs(net, preset, pixels[i:i + 256]).argmax(1))
        bf16.append(predict_probs(fast, preset, pixels[i:i + 256], autocast_dtype=torch.bfloat16).argmax(1))
    agree = (torch.cat(fp32) == torch.cat(bf16)).float().mean().item()
    assert len(files) == 3589
    assert agree >= 0.995, f"bf16 and fp32 labels agree on {agree:.2%} of FER2013 val"


@pytest.mark.slow
def test_compiled_predictor_matches_eager_and_pads_short_batches(fer_root, trained_bundle):
    """compile=True: one compilation at construction, batches of any length padded to batch_size,
    the same labels as the eager predictor on FER2013 val faces (the compile takes ~1 min here)."""
    pixels, _ = _fer_pixels(fer_root, "val", 15)  # 105 faces: 3 full batches of 32 and one of 9
    n = len(pixels)
    batch = {"path": np.array([f"/x/{i}.jpg" for i in range(n)], dtype=object), "image": pixels.numpy(),
             "error": np.full(n, None, dtype=object)}
    eager = _predictor(trained_bundle)(batch)
    compiled = _predictor(trained_bundle, compile=True, batch_size=32)
    out = compiled(batch)
    assert out.num_rows == n and out["path"].to_pylist() == batch["path"].tolist()
    agree = np.mean(np.array(out["label"].to_pylist()) == np.array(eager["label"].to_pylist()))
    assert agree >= 0.98, f"compiled and eager labels agree on {agree:.1%}"
    probs = lambda t: np.stack([t[c].to_numpy() for c in PROB_COLUMNS], axis=1)  # noqa: E731
    assert np.abs(probs(out) - probs(eager)).max() < 0.05
    assert compiled(dict(batch, path=batch["path"][:5], image=batch["image"][:5], error=batch["error"][:5])).num_rows == 5


def test_compile_failure_falls_back_to_the_eager_model(tiny_bundle, monkeypatch, caplog):
    """Where inductor cannot run (no C++ compiler on a node, say), compile=true must not fail the job."""
    def broken_compile(fn, **kwargs):
        def call(x):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    with caplog.at_level("WARNING", logger="ray_fer.label.infer"):
        predictor = _predictor(tiny_bundle, compile=True, batch_size=4)
    assert predictor.forward is None and "No working C++ compiler" in caplog.text
    eager = _predictor(tiny_bundle)(_batch(3, []))
    out = predictor(_batch(3, []))
    assert out["label"].to_pylist() == eager["label"].to_pylist()
