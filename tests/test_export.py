"""`ray-fer export`: bundles copied with float16 weights only when the labels survive it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from conftest import _run_cli
from ray_fer.config import UserError
from ray_fer.label.export import export_model
from ray_fer.model import load_bundle


@pytest.mark.slow  # scans all of FER2013 val twice
def test_half_export_is_checked_on_every_val_image_and_halves_the_file(fer_root, tmp_path):
    # the packaged model, widened to float32, is a trained model whose float16 copy is known: the
    # packaged file itself (same id), with the same labels on every val image
    from ray_fer.model import save_bundle
    from ray_fer.model_ref import DEFAULT_MODEL
    from ray_fer.model_ref import resolve_model

    packaged, packaged_id = load_bundle(resolve_model(DEFAULT_MODEL))
    wide = str(tmp_path / "fp32.pt")
    save_bundle(dataclasses.replace(packaged, state_dict={k: v.float() if v.is_floating_point() else v
                                                          for k, v in packaged.state_dict.items()}), wide)
    out = tmp_path / "exported" / "model.pt"
    summary = export_model(wide, str(out), half=True, check_data=str(fer_root / "val"))
    assert summary["images"] == 3589 and summary["agreement"] == 1.0 and summary["changed"] == 0
    assert summary["accuracy"] == summary["exported_accuracy"] > 0.5
    bundle, ident = load_bundle(str(out))
    assert ident == summary["output_model_id"] == packaged_id != summary["model_id"]
    assert all(v.dtype == torch.float16 for v in bundle.state_dict.values() if v.is_floating_point())
    assert summary["bytes"] == out.stat().st_size < 0.55 * Path(wide).stat().st_size


@pytest.mark.slow  # scans all of FER2013 val twice
def test_an_export_that_changes_labels_writes_nothing(fer_root, bundle_path, tmp_path):
    # an untrained network (random head on calibrated features) has near-ties everywhere: rounding
    # its weights to float16 changes about one label in ten, and the export is refused
    out = tmp_path / "model.pt"
    with pytest.raises(UserError, match=r"change \d+ of 3589 labels .* export without --half"):
        export_model(bundle_path, str(out), half=True, check_data=str(fer_root / "val"))
    assert not out.exists()


def test_half_needs_data_to_check_on(bundle_path, tmp_path, capsys):
    rc, _, err = _run_cli(["export", "--model", bundle_path, "--output", str(tmp_path / "m.pt"), "--half"], capsys)
    assert rc == 2 and "--half needs --check-data" in err and not (tmp_path / "m.pt").exists()
    rc, out, _ = _run_cli(["export", "--model", bundle_path, "--output", str(tmp_path / "m.pt")], capsys)
    assert rc == 0 and load_bundle(str(tmp_path / "m.pt"))[1] == load_bundle(bundle_path)[1]


def test_blend_is_the_weight_space_average_and_refuses_other_architectures(tmp_path):
    from ray_fer.model import save_bundle
    from ray_fer.model_ref import resolve_model

    packaged, packaged_id = load_bundle(resolve_model("fer2013"))
    torch.manual_seed(0)
    moved = dataclasses.replace(packaged, state_dict={k: v + torch.randn_like(v.float()).to(v.dtype) * 0.01
                                                      if v.is_floating_point() else v
                                                      for k, v in packaged.state_dict.items()})
    save_bundle(moved, str(tmp_path / "tuned.pt"))
    summary = export_model(str(tmp_path / "tuned.pt"), str(tmp_path / "blend.pt"), blend_with="fer2013", alpha=0.25)
    blended, _ = load_bundle(str(tmp_path / "blend.pt"))
    name = "features.0.0.weight"
    expected = 0.75 * packaged.state_dict[name].float() + 0.25 * moved.state_dict[name].float()
    assert torch.allclose(blended.state_dict[name].float(), expected, atol=1e-3)
    assert blended.config["blend"] == {"with": packaged_id, "alpha": 0.25} and summary["blend_with_id"] == packaged_id
    # alpha 0 is the other model itself: its labels, its id once stored the same way
    export_model(str(tmp_path / "tuned.pt"), str(tmp_path / "zero.pt"), blend_with="fer2013", alpha=0.0)
    zero, _ = load_bundle(str(tmp_path / "zero.pt"))
    assert all(torch.equal(zero.state_dict[k], v) for k, v in packaged.state_dict.items() if v.is_floating_point())
    other = dataclasses.replace(moved, stem_stride=2)
    save_bundle(other, str(tmp_path / "other.pt"))
    with pytest.raises(UserError, match="differ in stem_stride"):
        export_model(str(tmp_path / "other.pt"), str(tmp_path / "x.pt"), blend_with="fer2013")
    with pytest.raises(UserError, match="--alpha must be in"):
        export_model(str(tmp_path / "tuned.pt"), str(tmp_path / "x.pt"), blend_with="fer2013", alpha=1.5)
