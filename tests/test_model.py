"""The model: forward shapes, head initialisation, weights loading, and the bundle round trip."""

from __future__ import annotations

import torch

import pytest

from ray_fer.labels import CLASSES, NUM_CLASSES, PROB_COLUMNS, class_index
from ray_fer.model import BUNDLE_FORMAT, ModelBundle, ModelLoadError, build_model, load_bundle, model_id, save_bundle


def test_labels_are_the_seven_expressions_in_order():
    assert CLASSES == ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
    assert PROB_COLUMNS[0] == "prob_angry" and len(PROB_COLUMNS) == NUM_CLASSES == 7
    assert class_index("Happy") == 3 and class_index(" SURPRISE ") == 6
    with pytest.raises(ValueError, match="unknown expression class 'contempt'; expected one of: angry"):
        class_index("contempt")


def test_forward_gives_seven_finite_logits_and_starts_at_uniform_loss():
    model = build_model("none").eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.inference_mode():
        logits = model(x)
    assert logits.shape == (4, 7) and torch.isfinite(logits).all()
    # zero-initialised head: the first loss is ln(7), not the 3-4 of torchvision's default head
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3]))
    assert abs(loss.item() - torch.log(torch.tensor(7.0)).item()) < 1e-4


def _trained_bundle() -> ModelBundle:
    torch.manual_seed(0)
    model = build_model("none")
    torch.nn.init.normal_(model.classifier[1].weight, std=0.05)
    return ModelBundle(state_dict=model.state_dict(), image_size=64, decode_size=48,
                       config={"train": {"epochs": 1}}, metrics={"val_loss": 1.5, "epoch": 1},
                       history=[{"epoch": 1, "val_loss": 1.5}])


def test_bundle_round_trip_keeps_weights_and_metadata(tmp_path):
    bundle = _trained_bundle()
    uri = str(tmp_path / "sub" / "model.pt")
    ident = save_bundle(bundle, uri)
    loaded, ident2 = load_bundle(uri)
    assert ident == ident2 == model_id(loaded) == model_id(bundle) and len(ident) == 16
    assert (loaded.image_size, loaded.decode_size, loaded.classes) == (64, 48, CLASSES)
    assert loaded.metrics == {"val_loss": 1.5, "epoch": 1} and loaded.config == {"train": {"epochs": 1}}
    x = torch.randn(2, 3, 64, 64)
    ref = bundle.build_model()
    with torch.inference_mode():
        assert torch.equal(ref(x), loaded.build_model()(x))
    # weights_only loading: the file holds only tensors and plain types
    raw = torch.load(uri, weights_only=True)
    assert raw["format"] == "ray-fer-bundle/1"


def test_model_id_follows_the_weights_and_preprocessing_not_the_record(tmp_path):
    bundle = _trained_bundle()
    first = save_bundle(bundle, str(tmp_path / "a.pt"))
    # the same weights exported again by a run with other settings and a longer history: same id
    again = ModelBundle(state_dict=bundle.state_dict, image_size=64, decode_size=48,
                        config={"train": {"epochs": 9}, "run": {"max_failures": 3}}, metrics={"val_loss": 1.2},
                        history=bundle.history * 3)
    assert save_bundle(again, str(tmp_path / "b.pt")) == first
    assert (tmp_path / "a.pt").read_bytes() != (tmp_path / "b.pt").read_bytes()
    # other weights, or the same weights fed other pixels, are another model
    other_weights = dict(bundle.state_dict, **{"classifier.1.bias": bundle.state_dict["classifier.1.bias"] + 1e-3})
    variants = [
        ModelBundle(state_dict=other_weights, image_size=64, decode_size=48),
        ModelBundle(state_dict=bundle.state_dict, image_size=96, decode_size=48),
        ModelBundle(state_dict=bundle.state_dict, image_size=64, decode_size=64),
        ModelBundle(state_dict=bundle.state_dict, image_size=64, decode_size=48, mean=(0.5, 0.5, 0.5)),
    ]
    ids = {first} | {model_id(v) for v in variants}
    assert len(ids) == 1 + len(variants)


def test_a_bundle_written_before_the_content_id_loads_and_gets_one(tmp_path):
    bundle = _trained_bundle()
    old = {"format": BUNDLE_FORMAT, "state_dict": bundle.state_dict, "image_size": 64, "decode_size": 48,
           "classes": list(CLASSES), "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
           "architecture": "efficientnet_b0", "config": {}, "metrics": {}, "history": []}
    torch.save(old, tmp_path / "old.pt")
    loaded, ident = load_bundle(str(tmp_path / "old.pt"))
    assert ident == model_id(bundle) and (loaded.image_size, loaded.decode_size) == (64, 48)


def test_weights_from_a_bundle_or_a_state_dict(tmp_path):
    bundle = _trained_bundle()
    save_bundle(bundle, str(tmp_path / "model.pt"))
    from_bundle = build_model(str(tmp_path / "model.pt"))
    assert torch.equal(from_bundle.classifier[1].weight, bundle.state_dict["classifier.1.weight"])
    # a 1000-class state dict (a local copy of ImageNet weights): body kept, fresh zero head
    imagenet_like = build_model("none", num_classes=1000)
    torch.save(imagenet_like.state_dict(), tmp_path / "in1k.pth")
    model = build_model(str(tmp_path / "in1k.pth"))
    assert model.classifier[1].out_features == 7 and not model.classifier[1].weight.any()
    assert torch.equal(model.features[0][0].weight, imagenet_like.features[0][0].weight)


def test_bad_weights_fail_with_the_path_and_the_fix(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot read model file .*nope.pt"):
        build_model(str(tmp_path / "nope.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="not a loadable PyTorch weights file"):
        load_bundle(str(junk))
    torch.save({"w": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ModelLoadError, match="not a ray-fer model bundle"):
        load_bundle(str(tmp_path / "other.pt"))


def test_imagenet_weights_offline_say_how_to_pass_a_file(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache: torchvision must download
    with pytest.raises(ModelLoadError, match=r"pass model.weights=/path/to/efficientnet_b0"):
        build_model("imagenet")


def test_a_stem_without_stride_doubles_every_feature_map_and_travels_in_the_bundle(tmp_path):
    x = torch.randn(1, 3, 48, 48)
    plain, small = build_model("none").eval(), build_model("none", stem_stride=1).eval()
    with torch.inference_mode():
        assert plain.features(x).shape[-2:] == (2, 2)  # 48 / 32, rounded up
        assert small.features(x).shape[-2:] == (3, 3)  # 48 / 16
    bundle = ModelBundle(state_dict=small.state_dict(), image_size=48, decode_size=48, stem_stride=1)
    uri = str(tmp_path / "s1.pt")
    ident = save_bundle(bundle, uri)
    loaded, _ = load_bundle(uri)
    assert loaded.stem_stride == 1 and loaded.build_model().features[0][0].stride == (1, 1)
    # the same weights through the published stem are another model; stride-2 ids are as before
    assert ident != model_id(ModelBundle(state_dict=small.state_dict(), image_size=48, decode_size=48))


def test_a_half_bundle_stores_float16_and_runs_in_float32(tmp_path):
    bundle = _trained_bundle()
    half = bundle.half()
    assert half.state_dict["classifier.1.weight"].dtype == torch.float16
    assert bundle.state_dict["classifier.1.weight"].dtype == torch.float32  # the original is untouched
    save_bundle(bundle, str(tmp_path / "full.pt"))
    save_bundle(half, str(tmp_path / "half.pt"))
    assert (tmp_path / "half.pt").stat().st_size < 0.55 * (tmp_path / "full.pt").stat().st_size
    net = load_bundle(str(tmp_path / "half.pt"))[0].build_model()
    assert net.classifier[1].weight.dtype == torch.float32
    x = torch.randn(4, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(net(x), bundle.build_model()(x), atol=5e-2)


def test_weights_from_a_bundle_keep_the_stem_they_were_trained_with(tmp_path):
    small = build_model("none", stem_stride=1)
    uri = str(tmp_path / "s1.pt")
    save_bundle(ModelBundle(state_dict=small.state_dict(), image_size=40, decode_size=48, stem_stride=1), uri)
    assert build_model(uri, stem_stride=1).features[0][0].stride == (1, 1)
    with pytest.raises(ModelLoadError, match=r"trained with model.stem_stride=1; set model.stem_stride=1"):
        build_model(uri)
